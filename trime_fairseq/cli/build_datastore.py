"""``trime-build-datastore``: the external memory of kNN-LM / TRIMELM_ext / kNN-MT / TRIME-MT.

Runs the checkpoint over a split exactly as ``fairseq-eval-lm`` does (same
``task.eval_lm_dataloader``, ``--context-window``), stores for every scored
position (target != pad) its key -- g (``trime_key``, TRIME and kNN-LM) or f
(``trime_feature``) -- and its next token, then trains and fills a FAISS index.
For a language model, entry n is the split's n-th token (blocks in stream order, also
without a context window), which SPALM's neighbour files rely on::

    trime-build-datastore --path checkpoints/checkpoint_best.pt --data data-bin/wikitext-103 \\
        --gen-subset train --context-window 1536 --tokens-per-sample 3072 \\
        --output dstore/wt103-train --index-factory IVF4096,PQ64 --metric ip

A translation checkpoint (task ``translation`` or ``trime_translation``, read from the
checkpoint) gives a translation datastore: a teacher-forced pass over the split stores, for
every target position, the decoder's key (g: the input of its last feed-forward block, as
kNN-MT and TRIME Appendix B; ``--key-type trime_feature``: the decoder output) and the target
token -- EOS included, never padding -- so N = target tokens + one EOS per sentence (IWSLT'14
train as fairseq's prepare-iwslt14.sh makes it: 3,949,114 entries)::

    trime-build-datastore --path checkpoints/mt/checkpoint_best.pt --gen-subset train \
        --output dstore/iwslt14-train --index-factory IVF1024,PQ64 --metric l2

An interrupted run resumes when started again with the same arguments
(``--overwrite`` rebuilds a complete datastore). Load the result with
``trime_fairseq.memory.datastore.Datastore.load``.

Sharded (N GPUs or machines extract the keys in parallel; part i runs the model on
the i-th of N contiguous ranges of the single build's batches), then one merge that
checks the parts, concatenates them (row for row the single build) and builds the
index. Every part walks the batches before its range without running the model:
fairseq's ``--context-window`` takes a batch's context from the batch collated
before it (so fairseq's own round-robin sharding would change the keys)::

    for i in 0 1 2 3; do trime-build-datastore --path ckpt.pt ... --output dstore/train \
        --num-shards 4 --shard-id $i & done; wait          # writes dstore/train/part-i-of-4
    trime-build-datastore --output dstore/train --merge-shards 4 --index-factory IVF4096,PQ64 [--use-gpu-index]
"""

import argparse
import ast
import logging
import os
import time

import numpy as np
import torch
from tqdm import tqdm

from trime_fairseq.cli import setup_logging
from trime_fairseq.checksums import dictionary_checksum, loaded_model_checksum
from trime_fairseq.data.eval_order import StreamOrderDataset
from trime_fairseq.memory import faiss_index as fi
from trime_fairseq.memory.datastore import (KEY_DTYPES, KEY_TYPES, DatastoreSpec, DatastoreWriter, merge_parts,
                                            part_folder, read_part)
from trime_fairseq.memory.keys import ensure_key_capture, get_keys

logger = logging.getLogger("trime_fairseq.cli.build_datastore")


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="trime-build-datastore", description=__doc__.split("\n\n")[0])
    m = p.add_argument_group("model and data")
    m.add_argument("--path", help="fairseq checkpoint of a language model (trime_lm, language_modeling) "
                   "or a translation model (trime_translation, translation); not with --merge-shards")
    m.add_argument("--data", default=None, help="binarized data folder (default: the checkpoint's)")
    m.add_argument("--gen-subset", default="train", help="split whose positions become memory entries")
    m.add_argument("--tokens-per-sample", type=int, default=None,
                   help="language models: input length (default: the checkpoint's)")
    m.add_argument("--context-window", type=int, default=0, help="language models, as fairseq-eval-lm: context "
                   "tokens before the scored ones (scored per input: tokens-per-sample - context-window)")
    m.add_argument("--max-tokens", type=int, default=None, help="tokens per batch (default 36000 as eval-lm)")
    m.add_argument("--batch-size", type=int, default=None)
    m.add_argument("--model-overrides", default="{}", help="dict of model args to override, as eval-lm")
    m.add_argument("--cpu", action="store_true", help="run the LM on the CPU even if CUDA is available")
    m.add_argument("--fp16", action="store_true", help="run the LM in float16")
    m.add_argument("--num-workers", type=int, default=0)
    d = p.add_argument_group("datastore")
    d.add_argument("--output", required=True, help="datastore folder to write")
    d.add_argument("--key-type", default="trime_key", choices=KEY_TYPES,
                   help="trime_key: g, input of the last feed-forward block (TRIME, kNN-LM); "
                   "trime_feature: f, the output representation")
    d.add_argument("--key-dtype", default="float16", choices=KEY_DTYPES,
                   help="storage of the keys: float16 (half the disk; a key beyond ±65504 is refused) or float32")
    d.add_argument("--metric", default="ip", choices=sorted(fi.METRICS),
                   help="ip: inner product (TRIME's sim); l2: negative squared distance (kNN-LM)")
    d.add_argument("--index-factory", default="IVF4096,PQ64", help="FAISS index factory string ('Flat': exact)")
    d.add_argument("--pca", type=int, default=None, metavar="D",
                   help="compress the keys the index searches to D dimensions by PCA (metric l2): the factory "
                   "becomes 'PCA<D>,' + --index-factory; FAISS projects every query the same way. For metric ip "
                   "use an OPQ prefix instead, e.g. --index-factory OPQ32_64,IVF1024,PQ32")
    d.add_argument("--ntrain", type=int, default=1_000_000, help="keys sampled to train the index")
    d.add_argument("--nprobe", type=int, default=32, help="default lists probed per query (stored in metadata)")
    d.add_argument("--seed", type=int, default=1, help="seed of the training sample")
    d.add_argument("--add-chunk", type=int, default=1_000_000, help="keys added to the index at a time")
    d.add_argument("--save-every", type=int, default=10, help="save the partial index every N added chunks")
    d.add_argument("--commit-every", type=int, default=50, help="record key-writing progress every N batches")
    d.add_argument("--use-gpu-index", action="store_true", help="train / add on the GPU (needs faiss-gpu)")
    d.add_argument("--gpu-device", type=int, default=0)
    d.add_argument("--overwrite", action="store_true", help="rebuild a complete datastore at --output")
    d.add_argument("--num-shards", type=int, default=1, help="split the key extraction into N parts: this run "
                   "writes part --shard-id (keys and values only) to OUTPUT/part-i-of-N; then --merge-shards N")
    d.add_argument("--shard-id", type=int, default=0, help="which part this run writes (0 .. N-1)")
    d.add_argument("--merge-shards", type=int, default=None, metavar="N", help="merge the N complete parts in "
                   "OUTPUT into the datastore OUTPUT and build its index (no model, no data needed)")
    d.add_argument("--no-progress-bar", action="store_true")
    return p


LM_TASKS = ("trime_lm", "language_modeling")
MT_TASKS = ("trime_translation", "translation")


def load_model(args):
    """(model, task, state) for the checkpoint: a language model with the task set up as
    fairseq-eval-lm would, or a translation model with its (trime_)translation task."""
    from fairseq import checkpoint_utils, tasks
    from omegaconf import open_dict

    import trime_fairseq  # noqa: F401  (registers the tasks)
    from trime_fairseq.data.batching import EVALUATION_ORDER

    if not os.path.isfile(args.path):
        raise FileNotFoundError(f"checkpoint not found: {args.path}")
    overrides = ast.literal_eval(args.model_overrides)
    state = checkpoint_utils.load_checkpoint_to_cpu(args.path, overrides)
    cfg = state.get("cfg")
    if cfg is None:
        raise ValueError(f"{args.path} has no fairseq config ('cfg'); re-save it with fairseq >= 0.10")
    task_cfg = cfg.task
    if task_cfg._name not in LM_TASKS + MT_TASKS:
        raise ValueError(f"{args.path} was trained with task '{task_cfg._name}'; a language model "
                         f"({' / '.join(LM_TASKS)}) or a translation model ({' / '.join(MT_TASKS)}) is needed")
    translation = task_cfg._name in MT_TASKS
    with open_dict(task_cfg):
        task_cfg._name = "trime_translation" if translation else "trime_lm"
        if args.data is not None:
            task_cfg.data = args.data
        if translation:
            if args.tokens_per_sample is not None or args.context_window:
                raise ValueError("--tokens-per-sample / --context-window are language-model options; a translation "
                                 "datastore stores every target position of the split's sentence pairs")
        else:
            length = args.tokens_per_sample or task_cfg.tokens_per_sample
            if args.context_window < 0 or args.context_window >= length:
                raise ValueError(f"--context-window must lie in [0, {length}), got {args.context_window}")
            task_cfg.tokens_per_sample = length - args.context_window  # as fairseq-eval-lm
        for key, value in {**EVALUATION_ORDER, "eval_memory": "none"}.items():
            if key in task_cfg:
                task_cfg[key] = value
    task = tasks.setup_task(task_cfg)
    models, _, task = checkpoint_utils.load_model_ensemble_and_task([args.path], arg_overrides=overrides,
                                                                    task=task, state=state)
    model = models[0]
    ensure_key_capture(model)
    return model, task, state


load_lm = load_model  # the name the language-model tests use


def is_translation(task) -> bool:
    from fairseq.tasks.translation import TranslationTask

    return isinstance(task, TranslationTask)


def dummy_input(task, device) -> dict:
    """A one-token net_input for the model of ``task`` (to read the key dimension)."""
    eos = torch.full((1, 1), task.target_dictionary.eos(), dtype=torch.long, device=device)
    if is_translation(task):
        return dict(src_tokens=eos, src_lengths=torch.ones(1, dtype=torch.long, device=device), prev_output_tokens=eos)
    return dict(src_tokens=eos)


def key_dim(model, key_type: str, task, device) -> int:
    with torch.no_grad():
        out = model(**dummy_input(task, device))
    return int(get_keys(out, key_type).size(-1))


def scored_batches(args, task, model, dataset, max_tokens):
    """The batches whose positions become entries, in a fixed order (resumable), and their number."""
    from fairseq import utils

    max_positions = utils.resolve_max_positions(task.max_positions(), model.max_positions())
    if is_translation(task):  # teacher-forced: every target position of every pair, fairseq's length order
        itr = task.get_batch_iterator(
            dataset=dataset, max_tokens=max_tokens, max_sentences=args.batch_size, max_positions=max_positions,
            ignore_invalid_inputs=False, required_batch_size_multiple=1, seed=args.seed, num_shards=1, shard_id=0,
            num_workers=args.num_workers, disable_iterator_cache=True,
        ).next_epoch_itr(shuffle=False)
    else:  # as fairseq-eval-lm, with the blocks in stream order also without a context window
        itr = task.eval_lm_dataloader(
            dataset=dataset if args.context_window > 0 else StreamOrderDataset(dataset), max_tokens=max_tokens,
            batch_size=args.batch_size, max_positions=max_positions, num_shards=1, shard_id=0,
            num_workers=args.num_workers, data_buffer_size=0, context_window=args.context_window,
        )
    return itr, len(itr)


def default_max_tokens(args, translation: bool):
    """Tokens per batch: --max-tokens, else fairseq's default (eval-lm 36000, translation 8000) unless
    --batch-size is given."""
    return args.max_tokens or (None if args.batch_size else (8000 if translation else 36000))


def scored_keys(model, task, itr, num_batches: int, key_type: str, device, skip_batches: int = 0,
                progress: bool = True, desc: str = "keys", stop_batches=None):
    """Keys of the scored positions (target != pad) of the batches of ``itr`` (:func:`scored_batches`),
    in its order -- for a language model the split's token order. Yields (batches done, keys (n, d),
    targets (n,)) per batch; the first ``skip_batches`` batches are read but not run (resuming, or a later
    part of a sharded build), and batches from ``stop_batches`` on are not read."""
    from fairseq import utils

    pad = task.target_dictionary.pad()
    stop = num_batches if stop_batches is None else stop_batches
    bar = tqdm(itr, total=stop, desc=desc, unit="batch", disable=not progress, mininterval=2.0)
    with torch.no_grad():
        for i, sample in enumerate(bar):  # batches before skip_batches are collated only (context window state)
            if i >= stop:
                break
            if i < skip_batches or "net_input" not in sample:
                continue
            sample = utils.move_to_cuda(sample) if device.type == "cuda" else sample
            net_output = model(**sample["net_input"])
            keys = get_keys(net_output, key_type)  # (B, T, d)
            target = sample["target"]  # (B, T); context positions and padding are pad
            scored = target.ne(pad)
            yield i + 1, keys[scored], target[scored]


def index_factory(args) -> str:
    """The FAISS factory string: --index-factory, after 'PCA<D>,' with --pca D."""
    if args.pca is None:
        return args.index_factory
    if fi.key_transforms(args.index_factory, 1 << 30)[0]:
        raise ValueError(f"--pca {args.pca} and --index-factory {args.index_factory} both transform the keys: "
                         "give one of them")
    return f"PCA{args.pca},{args.index_factory}"


def check_args(args) -> None:
    """The checks of :func:`main` / :func:`merge_main` that need no model, data or datastore part."""
    if args.merge_shards is not None:
        if args.path is not None or args.num_shards != 1:
            raise ValueError("--merge-shards reads the parts' keys: it takes no --path / --num-shards")
        if args.merge_shards < 2:
            raise ValueError(f"--merge-shards N merges N >= 2 parts, got {args.merge_shards}")
        return
    if args.path is None:
        raise ValueError("--path CHECKPOINT is required (except with --merge-shards)")
    num_shards, shard_id = int(args.num_shards), int(args.shard_id)
    if num_shards < 1 or not 0 <= shard_id < num_shards:
        raise ValueError(f"--shard-id must lie in [0, --num-shards), got {shard_id} of {num_shards}")
    index_factory(args)  # --pca with a transforming --index-factory


def main(args) -> dict:
    check_args(args)
    if args.merge_shards is not None:
        return merge_main(args)
    num_shards, shard_id = int(args.num_shards), int(args.shard_id)
    progress = not args.no_progress_bar
    use_cuda = torch.cuda.is_available() and not args.cpu
    device = torch.device("cuda" if use_cuda else "cpu")
    t0 = time.time()
    model, task, state = load_model(args)
    translation = is_translation(task)
    model_sha = loaded_model_checksum(model)  # as loaded (upgraded), before --fp16: what evaluation checks
    del state
    if args.fp16:
        model.half()
    model.to(device).eval()
    dictionary = task.target_dictionary

    task.load_dataset(args.gen_subset)
    dataset = task.dataset(args.gen_subset)
    max_tokens = default_max_tokens(args, translation)
    if translation:  # every target position, EOS included: target tokens + one EOS per sentence
        capacity = int(np.sum(dataset.tgt_sizes))
        source = dict(data=os.path.abspath(task.cfg.data), split=args.gen_subset, task="translation",
                      source_lang=task.cfg.source_lang, target_lang=task.cfg.target_lang, sentences=len(dataset),
                      max_tokens=max_tokens, batch_size=args.batch_size)
    else:
        capacity = int(np.sum(dataset.sizes))  # every token is scored once (also with a context window)
        source = dict(data=os.path.abspath(task.args.data), split=args.gen_subset,
                      tokens_per_sample=int(task.args.tokens_per_sample) + args.context_window,
                      context_window=args.context_window, max_tokens=max_tokens, batch_size=args.batch_size,
                      order="stream")
    itr, num_batches = scored_batches(args, task, model, dataset, max_tokens)
    output, first, stop = args.output, 0, num_batches  # the batches [first, stop) this run scores
    if num_shards > 1:  # a contiguous range of the batches; at most max_tokens / B x longest scored tokens each
        bounds = np.cumsum([0] + [len(r) for r in np.array_split(np.arange(num_batches), num_shards)])
        first, stop = int(bounds[shard_id]), int(bounds[shard_id + 1])
        source.update(num_shards=num_shards, shard_id=shard_id, batches=[first, stop], num_batches=num_batches)
        longest = int(np.max(dataset.tgt_sizes if translation else dataset.sizes))
        per_batch = max_tokens if max_tokens else args.batch_size * longest
        capacity = max(1, min(capacity, (stop - first) * per_batch))
        output = part_folder(args.output, shard_id, num_shards)
    spec = DatastoreSpec(
        dim=key_dim(model, args.key_type, task, device), key_type=args.key_type, metric=args.metric,
        dictionary_size=len(dictionary), dictionary_sha256=dictionary_checksum(dictionary),
        model_path=os.path.abspath(args.path), model_sha256=model_sha, source=source, key_dtype=args.key_dtype,
    )
    if num_shards == 1:  # (a part has no index: the merge checks the index options)
        fi.check_factory(index_factory(args), spec.dim, capacity, args.ntrain, args.metric)  # before the forward pass
        if args.use_gpu_index and not fi.gpu_available():
            raise RuntimeError("--use-gpu-index needs faiss-gpu and a CUDA GPU")
    writer = DatastoreWriter(output, spec, capacity, overwrite=args.overwrite)

    if writer.stage == "keys":
        done = max(writer.batches_done, first)
        if writer.batches_done:
            logger.info(f"resuming: {writer.rows} keys from batches [{first}, {done}) already written")
        desc = f"keys of {args.gen_subset}" + (
            f" (part {shard_id} of {num_shards}: batches {first}-{stop - 1})" if num_shards > 1 else "")
        for batches, keys, targets in scored_keys(model, task, itr, num_batches, args.key_type, device, done,
                                                  progress, desc=desc, stop_batches=stop):
            writer.add(keys, targets.int())  # refuses keys its dtype cannot hold
            if batches % args.commit_every == 0:
                writer.commit(batches)
        writer.commit(stop)
    if num_shards > 1:
        part = writer.finish_part(shard_id, num_shards)
        logger.info(f"part {shard_id} of {num_shards} complete: {part['rows']} keys in {output} ({time.time() - t0:.1f}s); "
                    f"when every part is, run: trime-build-datastore --output {args.output} --merge-shards {num_shards}")
        return part
    n = writer.finish_keys()
    if translation and n != capacity:
        raise RuntimeError(f"{n} entries written for {capacity} target tokens of {args.gen_subset}: a sentence was "
                           "skipped (longer than the model's max positions?)")
    logger.info(f"{n} keys of dimension {spec.dim} written ({capacity} tokens in {args.gen_subset})")
    t1 = time.time()
    writer.build_index(index_factory(args), ntrain=args.ntrain, seed=args.seed, add_chunk=args.add_chunk,
                       save_every=args.save_every, use_gpu=args.use_gpu_index, gpu_device=args.gpu_device,
                       progress_bar=progress)
    t2 = time.time()
    meta = writer.finalize(nprobe=args.nprobe, extra=dict(seconds=dict(keys=round(t1 - t0, 2),
                                                                          index=round(t2 - t1, 2))))
    logger.info(f"datastore complete: {args.output} ({n} entries; keys {t1 - t0:.1f}s, index {t2 - t1:.1f}s)")
    return meta


def merge_main(args) -> dict:
    """Merge the complete parts in ``args.output`` and build the index."""
    progress = not args.no_progress_bar
    check_args(args)
    parts = [read_part(part_folder(args.output, i, args.merge_shards)) for i in range(args.merge_shards)]
    rows, dim = sum(p["rows"] for p in parts), int(parts[0]["spec"]["dim"])
    fi.check_factory(index_factory(args), dim, rows, args.ntrain, parts[0]["spec"]["metric"])  # fail before copying
    if args.use_gpu_index and not fi.gpu_available():
        raise RuntimeError("--use-gpu-index needs faiss-gpu and a CUDA GPU")
    t0 = time.time()
    writer = merge_parts(args.output, args.merge_shards, overwrite=args.overwrite, progress_bar=progress)
    t1 = time.time()
    writer.build_index(index_factory(args), ntrain=args.ntrain, seed=args.seed, add_chunk=args.add_chunk,
                       save_every=args.save_every, use_gpu=args.use_gpu_index, gpu_device=args.gpu_device,
                       progress_bar=progress)
    t2 = time.time()
    meta = writer.finalize(nprobe=args.nprobe, extra=dict(seconds=dict(merge=round(t1 - t0, 2), index=round(t2 - t1, 2)),
                                                          parts=args.merge_shards))
    logger.info(f"datastore complete: {args.output} ({rows} entries from {args.merge_shards} parts; merge "
                f"{t1 - t0:.1f}s, index {t2 - t1:.1f}s)")
    return meta


def cli_main(argv=None):
    setup_logging(stdout=True)
    main(get_parser().parse_args(argv))


if __name__ == "__main__":
    cli_main()
