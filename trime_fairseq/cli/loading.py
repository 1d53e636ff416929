"""Load a model and an evaluation stream exactly as ``fairseq-eval-lm`` does.

Entry points that run a trained LM over a split (tuning, sweeps, datastore
building) share this so their numbers match ``fairseq-eval-lm``'s.
"""

import logging
from argparse import Namespace
from typing import Iterator, List, Tuple

import torch
from fairseq import checkpoint_utils, options, tasks, utils
from fairseq.dataclass.utils import convert_namespace_to_omegaconf
from fairseq.logging import progress_bar
from omegaconf import DictConfig

logger = logging.getLogger(__name__)


def eval_lm_config(argv: List[str], add_args=None) -> Tuple[DictConfig, Namespace]:
    """Parse ``fairseq-eval-lm`` options (plus ``add_args(parser)``) into (cfg, args)."""
    parser = options.get_eval_lm_parser()
    if add_args is not None:
        add_args(parser)
    args = options.parse_args_and_arch(parser, input_args=argv)
    return convert_namespace_to_omegaconf(args), args


def load_eval_models(cfg: DictConfig):
    """(models, task) built by the command-line task, on GPU/fp16 when asked; like eval_lm.main."""
    utils.import_user_module(cfg.common)
    if cfg.eval_lm.context_window > 0:
        cfg.task.tokens_per_sample -= cfg.eval_lm.context_window
    task = tasks.setup_task(cfg.task)
    models, _, task = checkpoint_utils.load_model_ensemble_and_task(
        [cfg.common_eval.path],
        arg_overrides=eval(cfg.common_eval.model_overrides),
        suffix=cfg.checkpoint.checkpoint_suffix,
        task=task,
    )
    use_cuda = torch.cuda.is_available() and not cfg.common.cpu
    for model in models:
        if cfg.common.fp16:
            model.half()
        if use_cuda:
            model.cuda()
        model.prepare_for_inference_(cfg)
    return models, task


def eval_batches(cfg: DictConfig, task, models) -> Iterator[dict]:
    """The batches ``fairseq-eval-lm`` scores, in its order, moved to the models' device."""
    task.load_dataset(cfg.dataset.gen_subset)
    dataset = task.dataset(cfg.dataset.gen_subset)
    itr = task.eval_lm_dataloader(
        dataset=dataset,
        max_tokens=cfg.dataset.max_tokens or 36000,
        batch_size=cfg.dataset.batch_size,
        max_positions=utils.resolve_max_positions(*[m.max_positions() for m in models]),
        num_shards=max(cfg.dataset.num_shards, cfg.distributed_training.distributed_world_size),
        shard_id=max(cfg.dataset.shard_id, cfg.distributed_training.distributed_rank),
        num_workers=cfg.dataset.num_workers,
        data_buffer_size=cfg.dataset.data_buffer_size,
        context_window=cfg.eval_lm.context_window,
    )
    itr = progress_bar.progress_bar(
        itr,
        log_format=cfg.common.log_format,
        log_interval=cfg.common.log_interval,
        default_log_format=("tqdm" if not cfg.common.no_progress_bar else "simple"),
    )
    device = next(models[0].parameters()).device
    for sample in itr:
        if sample and "net_input" in sample:
            yield utils.move_to_cuda(sample, device=device) if device.type == "cuda" else sample
