"""``trime-recall``: the long-range recall benchmark (docs/results_recall.md).

``trime-recall make``: a raw-text corpus folder (``wiki.{train,valid,test}.tokens`` like WikiText's, plus
``memory.{valid,test}.tokens``: the first occurrences alone) and the indexes ``{split}.recall.json``, seeded::

    trime-recall make --source ../shared/data/wikitext-2 --output runs/recall/raw --seed 1 \\
        --gaps 16,64,512,3072,8192,32768 --episodes 8

``trime-recall score``: every ``fairseq-eval-lm`` option (data, ``--path``, ``--gen-subset``, ``--context-window``
or ``--batching stream``, ``--task trime_lm`` with any ``--eval-memory`` and its options, ``--neighbours``,
``--model-overrides``) plus the index; the split is scored in-process as ``fairseq-eval-lm`` scores it
(``cli/loading.py``: the same model loading, task, batches and ``get_normalized_probs``), every position's
log-probability and top-1 mapped to its stream position, then reported per (variant, gap) for the scored
tokens' second and first occurrences::

    trime-recall score data-bin/recall --user-dir trime_fairseq --task trime_lm --path vanilla.pt \\
        --gen-subset test --tokens-per-sample 256 --context-window 128 --batch-size 8 --cpu \\
        --recall-index runs/recall/raw/test.recall.json --label "vanilla + cache" --control vanilla \\
        --reach 128:255 --output runs/recall/scores/cache.json --eval-memory cache

``trime-recall report SCORES.json...``: one markdown table of every system against its control, with the
verdicts (gain inside the reach, none beyond). ``trime-recall plot SCORES.json... --output recall.png``:
perplexity of the second occurrences vs gap, one line per system, each memory's control dashed.
"""

import json
import logging
import sys
from pathlib import Path

import numpy as np
import torch

from trime_fairseq.atomic import atomic_write_text
from trime_fairseq.cli import setup_logging

logger = logging.getLogger("trime_fairseq.cli.recall")

COMMANDS = ("make", "score", "report", "plot")


# -- make ---------------------------------------------------------------------------------------------------------

def make_parser():
    import argparse

    from trime_fairseq.recall.corpus import VARIANTS

    p = argparse.ArgumentParser(prog="trime-recall make", description="write the recall corpus (raw text) and its index")
    p.add_argument("--source", required=True, help="folder with wiki.{train,valid,test}.tokens (WikiText)")
    p.add_argument("--output", required=True, help="folder to write the corpus to")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--span-length", type=int, default=16, help="S, words of a span (variant span)")
    p.add_argument("--key-length", type=int, default=4, help="keys of a pass key (variant passkey)")
    p.add_argument("--gaps", default="16,64,512,3072,8192,32768",
                   help="valid / test: tokens between the end of the first occurrence and the start of the second")
    p.add_argument("--episodes", type=int, default=8, help="valid / test: episodes per (variant, gap)")
    p.add_argument("--variants", default=",".join(VARIANTS), help="span, passkey or both")
    p.add_argument("--train-gaps", default="16,64,256,512,1024,3072", help="train: gaps drawn uniformly")
    p.add_argument("--train-rate", type=float, default=1.0, help="train: episodes per 1,000 tokens of text")
    p.add_argument("--train-passkey-share", type=float, default=0.5, help="train: share of passkey episodes")
    p.add_argument("--train-lines", type=int, default=0, help="use the first N lines of train (0: all)")
    p.add_argument("--eval-lines", type=int, default=0, help="use the first N lines of valid / test (0: all)")
    p.add_argument("--key-min-count", type=int, default=20, help="pass-key words occur >= N times in train")
    p.add_argument("--margin", type=int, default=4, help="filler tokens kept between any two occurrences")
    return p


def make_main(argv):
    from trime_fairseq.recall.corpus import make_corpus

    a = make_parser().parse_args(argv)
    manifest = make_corpus(
        Path(a.source), Path(a.output), seed=a.seed, span_length=a.span_length, key_length=a.key_length,
        gaps=a.gaps, episodes=a.episodes, variants=[v for v in a.variants.split(",") if v],
        train_gaps=a.train_gaps, train_rate=a.train_rate, train_passkey_share=a.train_passkey_share,
        train_lines=a.train_lines, eval_lines=a.eval_lines, key_min_count=a.key_min_count, margin=a.margin)
    for split, info in manifest["splits"].items():
        print(f"{split}: {info['tokens']} tokens, {info['episodes']} episodes, {info['scored']} scored tokens")
    return manifest


# -- score --------------------------------------------------------------------------------------------------------

def add_score_args(parser):
    g = parser.add_argument_group("trime-recall score")
    g.add_argument("--recall-index", required=True, help="the split's {split}.recall.json (trime-recall make)")
    g.add_argument("--output", required=True, help="JSON of the per-gap results (a .md table is written beside it)")
    g.add_argument("--label", required=True, help="the system's name in tables and plots")
    g.add_argument("--control", default=None, help="label of this system's no-memory control (its own run)")
    g.add_argument("--reach", default=None, help="LO[:HI] tokens: a copy at distance <= LO is always within the "
                   "memory, one beyond HI never ('inf': unbounded)")
    g.add_argument("--tokens-output", default=None, help="also write every position's log-prob / top-1 (.npz)")


def get_parser():
    """``trime-recall score``'s parser: fairseq-eval-lm's plus the options above."""
    from fairseq import options

    parser = options.get_eval_lm_parser()
    add_score_args(parser)
    return parser


def parse_reach(text):
    """'LO[:HI]' -> (lo, hi) floats (inf allowed), or None."""
    if text in (None, ""):
        return None
    lo, _, hi = str(text).partition(":")
    lo_v, hi_v = float(lo), float(hi or lo)
    if not 0 <= lo_v <= hi_v:
        raise ValueError(f"--reach LO[:HI] needs 0 <= LO <= HI, got {text}")
    return [lo_v, hi_v]


def check_memory_sources(cfg) -> None:
    """Causality of a retrieval memory: a datastore (or a neighbour file's datastore) built from the scored split
    itself would hold the scored positions and the ones after them; build it from the memory split instead."""
    import os

    from trime_fairseq.memory.datastore.reading import read_metadata

    split, data = cfg.dataset.gen_subset, os.path.abspath(cfg.task.data)
    sources = []
    if getattr(cfg.task, "datastore", None):
        sources.append(("--datastore", read_metadata(cfg.task.datastore)["source"]))
    neighbours = getattr(cfg.task, "neighbours", None)
    if neighbours and (Path(neighbours) / split / "neighbours.json").is_file():
        meta = json.loads((Path(neighbours) / split / "neighbours.json").read_text())
        store = meta["datastore"]
        sources.append(("--neighbours", read_metadata(store["path"])["source"] if Path(store["path"]).is_dir()
                        else dict(split=store.get("split"), data=None)))
    for name, source in sources:
        same_data = source.get("data") in (None, data)
        if source.get("split") == split and same_data:
            raise ValueError(f"{name}: its datastore was built from the scored split '{split}' itself, so it holds "
                             "every scored position and the ones after it; build it from the split's memory split "
                             f"('{split}_memory': the first occurrences only)")


@torch.no_grad()
def score_stream(cfg):
    """Run the model over ``cfg.dataset.gen_subset`` as ``fairseq-eval-lm`` does; returns (log_probs, correct,
    targets, dictionary): (tokens,) arrays by stream position -- log p(x_t | x_<t) under the evaluation memory,
    whether x_t was the top-1, and x_t as read from the batches (every position exactly once)."""
    from trime_fairseq.cli.loading import eval_batches, load_eval_models
    from trime_fairseq.data.neighbours import token_blocks

    models, task = load_eval_models(cfg)
    if len(models) != 1:
        raise ValueError("trime-recall score scores one model per --path")
    model = models[0]
    model.eval()
    pad = task.target_dictionary.pad()
    log_probs = targets = correct = blocks = None
    for sample in eval_batches(cfg, task, models):
        if blocks is None:
            blocks = token_blocks(task.dataset(cfg.dataset.gen_subset))
            n = int(np.sum(blocks.sizes))
            log_probs, targets, correct = np.full(n, np.nan), np.full(n, -1, dtype=np.int64), np.zeros(n, bool)
        net_output = model(**sample["net_input"])
        lprobs = model.get_normalized_probs(net_output, log_probs=True, sample=sample)  # (B, T, V), as SequenceScorer
        target = sample["target"]
        scored = target.ne(pad)
        at_target = lprobs.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1).float()
        top1 = lprobs.argmax(-1).eq(target)
        for row, block in enumerate(sample["id"].tolist()):
            count = int(scored[row].sum())
            if block < 0:  # an ended stream's padding row (--batching stream)
                if count:
                    raise AssertionError("a padding row with targets")
                continue
            start, end = (int(x) for x in blocks.slice_indices[block])
            if count != end - start:
                raise AssertionError(f"block {block}: {count} scored positions for stream positions {start}..{end}")
            where = slice(start, end)
            if not np.isnan(log_probs[where]).all():
                raise AssertionError(f"stream positions {start}..{end} scored twice")
            log_probs[where] = at_target[row][scored[row]].cpu().double().numpy()
            correct[where] = top1[row][scored[row]].cpu().numpy()
            targets[where] = target[row][scored[row]].cpu().numpy()
    if blocks is None:
        raise ValueError(f"no tokens to score in split '{cfg.dataset.gen_subset}'")
    if np.isnan(log_probs).any():
        raise AssertionError(f"{int(np.isnan(log_probs).sum())} stream positions were never scored")
    return log_probs, correct, targets, task.target_dictionary


def score_main(argv):
    from trime_fairseq.cli.loading import eval_lm_config
    from trime_fairseq.recall.index import RecallIndex, split_tokens
    from trime_fairseq.recall.stats import bucket_stats, markdown, summarise

    cfg, args = eval_lm_config(argv, add_score_args)
    index = RecallIndex.load(args.recall_index)
    reach = parse_reach(args.reach)
    split = cfg.dataset.gen_subset
    if index.split != split:
        raise ValueError(f"--recall-index is the index of '{index.split}', --gen-subset is '{split}'")
    check_memory_sources(cfg)
    data = cfg.task.data.split(":")[0]
    stream = split_tokens(data, split)
    log_probs, correct, targets, dictionary = score_stream(cfg)
    if not np.array_equal(targets, stream):
        raise AssertionError("the scored targets differ from the binarised split's tokens")
    memory_split = index.memory.get("split")
    memory_ids = split_tokens(data, memory_split) if memory_split and Path(data, memory_split + ".bin").is_file() else None
    index.check_stream(stream, dictionary, memory_ids)
    rows = bucket_stats(index, log_probs, correct)
    overall = summarise(log_probs, correct)
    result = dict(label=args.label, control=args.control, reach=reach, split=split, data=data,
                  checkpoint=cfg.common_eval.path, lengths={e.variant: e.length for e in index.episodes},
                  recall_index=str(args.recall_index), argv=list(argv), overall=overall, buckets=rows,
                  eval_memory=getattr(cfg.task, "eval_memory", None))
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    table = markdown(rows, f"{args.label} on `{split}` (all tokens: ppl {overall['ppl']:.2f})")
    atomic_write_text(out, json.dumps(result, indent=1) + "\n")
    atomic_write_text(out.with_suffix(".md"), table)
    if args.tokens_output:
        np.savez_compressed(args.tokens_output, log_probs=log_probs, correct=correct, targets=targets)
    print(table)
    return result


# -- report and plot ----------------------------------------------------------------------------------------------

def _scores_parser(command: str, description: str, **output):
    """The parser of a command that reads score files (``--output`` as ``output`` says)."""
    import argparse

    p = argparse.ArgumentParser(prog=f"trime-recall {command}", description=description)
    p.add_argument("scores", nargs="+", help="JSON files of trime-recall score")
    p.add_argument("--output", **output)
    return p


def report_parser():
    p = _scores_parser("report", "compare every system with its control", default=None,
                       help="markdown file to write (default: print only)")
    p.add_argument("--tolerance", type=float, default=0.05,
                   help="nats: beyond the reach, the memory's gain on second occurrences may exceed its gain on "
                   "first occurrences by at most this much (plus two standard errors)")
    return p


def report_main(argv):
    from trime_fairseq.recall.report import load_scores, report_markdown

    a = report_parser().parse_args(argv)
    text = report_markdown(load_scores(a.scores), a.tolerance)
    if a.output:
        atomic_write_text(a.output, text)
    print(text)
    return text


def plot_parser():
    return _scores_parser("plot", "perplexity of second occurrences vs gap", required=True, help="PNG to write")


def plot_main(argv):
    from trime_fairseq.recall.report import load_scores, plot

    a = plot_parser().parse_args(argv)
    plot(load_scores(a.scores), a.output)
    print(f"plot: {a.output}")


#: the argparse parsers of the subcommands but ``score`` (whose parser is fairseq-eval-lm's: :func:`get_parser`)
PARSERS = dict(make=make_parser, report=report_parser, plot=plot_parser)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] not in COMMANDS:
        print(f"usage: trime-recall {{{','.join(COMMANDS)}}} ...  (trime-recall COMMAND --help)", file=sys.stderr)
        raise SystemExit(2)
    command, rest = argv[0], argv[1:]
    return dict(make=make_main, score=score_main, report=report_main, plot=plot_main)[command](rest)


def cli_main():
    setup_logging()
    main()


if __name__ == "__main__":
    cli_main()
