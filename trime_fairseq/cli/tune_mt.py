"""``trime-tune-mt``: grid-search kNN-MT / TRIME-MT's memory options on a validation split by BLEU.

Takes every ``fairseq-generate`` option (data, ``--path``, ``--gen-subset valid``, beam,
``--task trime_translation --eval-memory knn|trime_ext --datastore DIR``) plus the grids
below, decodes the split (or its first ``--max-sentences-for-tuning`` sentences) once per
grid point and prints the flags with the best BLEU (sacrebleu, on the BPE-removed
tokenised text, as ``fairseq-generate --scoring sacrebleu``)::

    trime-tune-mt data-bin/multi30k --user-dir trime_fairseq --task trime_translation \\
        --path checkpoints/mt/checkpoint_best.pt --gen-subset valid --beam 5 --remove-bpe \\
        --eval-memory knn --datastore dstore/multi30k-train --max-sentences-for-tuning 300

Each mode grids over its record's ``decoding_axes`` (:mod:`trime_fairseq.memory.modes`):

| mode | grid |
|---|---|
| knn | K (``--ks``, paper: 1, 2, ..., 64 after Zheng et al. 2021) x T x λ |
| trime_ext | K x τ (``--temperatures``) x τ' x λ |
| sk_mt | K x T x τ_λ (``--sk-lambda-temperatures``) of λ = ReLU(1 − d_0/τ_λ) |

The datastore is searched once per decoding step at the largest K of the round; smaller K
keep that search's best-first hits (the same as searching for K).

``--widen-edges R`` (default 2), as ``trime-tune``'s: while the best value of an axis lies on
an edge of its grid, that axis is extended past the edge (K and temperatures doubled or
halved, λ towards 0 or 1; :mod:`trime_fairseq.cli.grid_search`) and the new points are
decoded, at most R more times; the output says when a best value is still on an edge.

With ``--results-json FILE`` every point is also logged to ``FILE.points.jsonl`` as soon as it is
decoded: an interrupted tuning started again with the same arguments decodes only the points it lacks
(:mod:`trime_fairseq.cli.score_log`); the log is removed once FILE is written.
"""

import json
import logging
import os
import sys
import time
from dataclasses import asdict

import torch

from trime_fairseq.atomic import atomic_write_text
from trime_fairseq.cli import setup_logging
from trime_fairseq.cli.grid_search import add_grid_args, check_rounds, edge_note, grid_axes, search
from trime_fairseq.cli.score_log import ScoreLog

logger = logging.getLogger("trime_fairseq.tune_mt")

#: the values each grid option lists unless given (the options a mode grids over are its record's
#: ``decoding_axes``)
DEFAULT_GRIDS = {
    "knn_k": "1,2,4,8,16,32,64",
    "knn_temperature": "10,100",
    "knn_lambda": "0.2,0.4,0.6",
    "memory_temperature": "1",
    "interpolation_temperature": "1,10",
    "interpolation_lambda": "0.2,0.4,0.6",
    "sk_lambda_temperature": "10,100",
}


def add_args(parser):
    group = parser.add_argument_group("trime-tune-mt grids")
    add_grid_args(group, "decoding_axes", DEFAULT_GRIDS)
    group.add_argument("--max-sentences-for-tuning", type=int, default=None,
                       help="decode only the first N sentences of the split (by sentence id)")
    group.add_argument("--widen-edges", type=int, default=2,
                       help="rounds of extending an axis whose best value lies on its grid's edge (0: never)")
    group.add_argument("--results-json", default=None, help="write every grid point and the best to this file")


def get_parser():
    """trime-tune-mt's parser: fairseq-generate's plus the grids (parse it with ``options.parse_args_and_arch``)."""
    from fairseq import options

    parser = options.get_generation_parser()
    add_args(parser)
    return parser


def checked(cfg, args):
    """(base options, grid axes) of a parsed command line, after every check that needs no model and no data."""
    from trime_fairseq.tasks.memory_config import RETRIEVAL_FLAGS, memory_options

    check_rounds(args.widen_edges)
    base = memory_options(cfg.task, RETRIEVAL_FLAGS)
    axes = grid_axes(base, args, "decoding_axes", "trime-tune-mt needs --task trime_translation --eval-memory",
                     " (and --datastore, or --sk-pairs for sk_mt)")
    return base, axes


def describe(opt) -> str:
    """The fairseq-generate flags that select ``opt`` (grid values; the fixed options are the command line's)."""
    return opt.record.flags(opt, opt.record.decoding_axes)


def bleu(cfg, task, model, samples, generator) -> float:
    """Corpus BLEU (sacrebleu, 13a) of the hypotheses of ``samples`` against their references.

    Scored on the dictionary's text after ``--post-process`` (e.g. ``--remove-bpe``), i.e. still
    Moses-tokenised when the data was, as ``fairseq-generate --scoring sacrebleu`` without
    ``--tokenizer`` scores it: a tuning criterion, not the detokenised figure to report
    (scripts/sacrebleu_from_generate.py gives that one)."""
    import sacrebleu

    tgt_dict = task.target_dictionary
    hyps, refs = {}, {}
    for sample in samples:
        with torch.no_grad():
            out = task.inference_step(generator, [model], sample)
        for i, sid in enumerate(sample["id"].tolist()):
            ref = sample["target"][i][sample["target"][i].ne(tgt_dict.pad())]
            refs[sid] = tgt_dict.string(ref.int().cpu(), cfg.common_eval.post_process, escape_unk=True)
            hyps[sid] = tgt_dict.string(out[i][0]["tokens"].int().cpu(), cfg.common_eval.post_process)
    ids = sorted(refs)
    return sacrebleu.corpus_bleu([hyps[i] for i in ids], [[refs[i] for i in ids]], tokenize="13a").score


def main(argv=None):
    from fairseq import checkpoint_utils, options, tasks, utils
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf

    from trime_fairseq.memory.eval_memory import EvalMemory, route_normalized_probs

    args = options.parse_args_and_arch(get_parser(), input_args=sys.argv[1:] if argv is None else argv)
    cfg = convert_namespace_to_omegaconf(args)
    utils.import_user_module(cfg.common)
    base, axes = checked(cfg, args)
    # the task opens the datastore (and checks the largest K against its size); each round searches
    # once per step at its largest K, which serves every K of the round
    cfg.task.knn_k = max(axes["knn_k"])
    task = tasks.setup_task(cfg.task)
    models, _ = checkpoint_utils.load_model_ensemble([cfg.common_eval.path], task=task,
                                                     arg_overrides=eval(cfg.common_eval.model_overrides))
    model = models[0].eval()
    if torch.cuda.is_available() and not cfg.common.cpu:
        model.cuda()
    memory = model.trime_eval_memory
    task.load_dataset(cfg.dataset.gen_subset)
    dataset = task.dataset(cfg.dataset.gen_subset)
    from fairseq.data import data_utils

    limit = args.max_sentences_for_tuning
    indices = dataset.ordered_indices()  # length order, as fairseq-generate batches
    if limit is not None:
        indices = indices[indices < limit]  # the first N sentences by id
    indices = task.filter_indices_by_size(
        indices, dataset, utils.resolve_max_positions(task.max_positions(), model.max_positions()),
        ignore_invalid_inputs=cfg.dataset.skip_invalid_size_inputs_valid_test)
    batches = data_utils.batch_by_size(indices, dataset.num_tokens, max_tokens=cfg.dataset.max_tokens,
                                       max_sentences=cfg.dataset.batch_size)
    samples = [dataset.collater([dataset[i] for i in batch]) for batch in batches]
    if next(model.parameters()).is_cuda:
        samples = [utils.move_to_cuda(s) for s in samples]
    if not samples:
        raise ValueError(f"no sentences to decode in '{cfg.dataset.gen_subset}'")
    generator = task.build_generator([model], cfg.generation)
    pad = task.target_dictionary.pad()
    log, known = None, {}
    if args.results_json:  # what a point's BLEU depends on besides its options: a resumed run must match it
        from omegaconf import OmegaConf

        from trime_fairseq.memory.datastore.reading import read_metadata

        checkpoint = os.stat(cfg.common_eval.path)
        log = ScoreLog(args.results_json + ".points.jsonl", dict(
            checkpoint=os.path.abspath(cfg.common_eval.path), checkpoint_bytes=checkpoint.st_size,
            checkpoint_mtime_ns=checkpoint.st_mtime_ns, data=cfg.task.data, split=cfg.dataset.gen_subset,
            sentences=sorted(int(i) for s in samples for i in s["id"].tolist()), post_process=cfg.common_eval.post_process,
            model_overrides=cfg.common_eval.model_overrides,
            generation=OmegaConf.to_container(cfg.generation, resolve=True),
            # a datastore rebuilt at the same path (another index, another model) scores differently
            datastore=read_metadata(args.datastore) if getattr(args, "datastore", None) else None))
        known = log.load()
        if known:
            logger.info(f"{len(known)} points already scored in {log.path}: not decoded again")

    def score(points, r):
        external = None
        if memory.external is not None:
            external = memory.external.with_k(max((p.knn_k for p in points if not p.plain), default=1))
        results = {}
        for n, opt in enumerate(points):
            start = time.time()
            pairs = memory.sentence_pairs if opt.uses_sentence_pairs else None  # sk_mt: the task prepares its bank
            route_normalized_probs(model, EvalMemory(opt, pad, external=external, local=False,
                                                     sentence_pairs=pairs))  # none: plain
            results[opt] = bleu(cfg, task, model, samples, generator)
            if log is not None:
                log.append(opt, results[opt])
            logger.info(f"round {r}: {n + 1}/{len(points)}: BLEU {results[opt]:.2f}  {describe(opt)} "
                        f"({time.time() - start:.0f}s)")
        return results

    results, best, history = search(base, axes, score, args.widen_edges, metric="bleu", higher_is_better=True,
                                    describe=describe, known=known)
    plain = results.pop(next(p for p in results if p.plain))
    sentences = sum(len(s["id"]) for s in samples)
    print(f"{'BLEU':>8}  options ({cfg.dataset.gen_subset}, {sentences} sentences)")
    for opt, value in sorted(results.items(), key=lambda kv: -kv[1]):
        print(f"{value:8.2f}  {describe(opt)}")
    if history[-1]["on_edge"]:
        print(edge_note(history))
    print(f"best: {describe(best)}  ({cfg.dataset.gen_subset} BLEU {results[best]:.2f}; without memory {plain:.2f})")
    if args.results_json:
        atomic_write_text(args.results_json, json.dumps(dict(
            split=cfg.dataset.gen_subset, sentences=sentences, best=describe(best), best_bleu=results[best],
            plain_bleu=plain, on_edge=history[-1]["on_edge"], rounds=history,
            points=[dict(flags=describe(p), bleu=v, options=asdict(p))
                    for p, v in sorted(results.items(), key=lambda kv: -kv[1])],
        ), indent=2) + "\n")
        log.remove()
    return best, results


def cli_main():
    setup_logging()
    main()


if __name__ == "__main__":
    cli_main()
