"""``trime-sweep-memory``: perplexity vs long-term memory size (TRIME's Figure 3).

Takes every ``fairseq-eval-lm`` option (data, ``--path``, ``--context-window``,
``--tokens-per-sample``, ``--gen-subset``, batching, and the ``--task trime_lm``
memory options of the main model: ``--eval-memory trime --memory-temperature τ``
[``--memory-reset document``]) plus the sizes below. Every model runs over the
split once; each batch is scored for every size N with
``EvalMemory.target_log_probs`` (the distribution ``fairseq-eval-lm
--long-memory-size N`` reports, at the target) on one stream memory of
``max(N)`` entries, which then advances. The optional baseline (a vanilla LM)
is scored as a continuous cache extended to the same long-term memory sizes
(``--eval-memory cache``, the paper's "cache extended to long-term memory").

    trime-sweep-memory data-bin/wikitext-2 --user-dir trime_fairseq --task trime_lm \\
        --path checkpoints/trime_long/checkpoint_best.pt --eval-memory trime --memory-temperature 1 \\
        --baseline-path checkpoints/vanilla/checkpoint_best.pt --baseline-lambda 0.1 --baseline-theta 0.3 \\
        --sizes 0,1024,4096,16384 --tokens-per-sample 512 --context-window 256 --gen-subset valid \\
        --out-dir results/sweep_wikitext2

Writes ``sweep.csv``, ``sweep.json``, ``sweep.md`` and ``sweep.png`` (perplexity vs memory size) in
``--out-dir``.
"""

import copy
import json
import logging
import math
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Dict, List

import torch

from trime_fairseq.atomic import atomic_path, atomic_write_text
from trime_fairseq.cli import setup_logging
from trime_fairseq.cli.loading import eval_batches, eval_lm_config, load_eval_models
from trime_fairseq.memory.documents import DocumentBoundaries
from trime_fairseq.memory.eval_memory import EvalMemory, local_key_names
from trime_fairseq.memory.options import MemoryOptions

logger = logging.getLogger("trime_fairseq.sweep_memory")


def _sizes(text: str) -> List[int]:
    sizes = sorted({int(x) for x in text.split(",") if x.strip()})
    if not sizes or sizes[0] < 0:
        raise ValueError(f"--sizes must be a comma-separated list of sizes >= 0, got '{text}'")
    return sizes


def add_args(parser):
    group = parser.add_argument_group("trime-sweep-memory")
    group.add_argument("--sizes", default="0,1024,4096,16384", help="long-term memory sizes N to evaluate")
    group.add_argument("--out-dir", required=True, help="folder for sweep.csv, sweep.md, sweep.png")
    group.add_argument("--label", default="TRIMELM_long", help="name of the --path model in the table / plot")
    group.add_argument("--baseline-path", default=None, help="a vanilla LM checkpoint, scored with a long cache")
    group.add_argument("--baseline-label", default="Transformer + cache")
    group.add_argument("--baseline-lambda", type=float, default=0.1, help="λ of the baseline's cache")
    group.add_argument("--baseline-theta", type=float, default=0.3, help="θ of the baseline's cache")


@torch.no_grad()
def sweep_model(cfg, base: MemoryOptions, sizes: List[int]) -> List[Dict]:
    """Perplexity of ``base`` with every long-term memory size, one pass over the split."""
    cfg = copy.deepcopy(cfg)  # load_eval_models shortens tokens_per_sample by the context window
    cfg.task.long_memory_size = max(sizes) if max(sizes) > 0 else None  # the task keeps the stream order
    models, task = load_eval_models(cfg)
    if len(models) != 1:
        raise ValueError("trime-sweep-memory scores one model per --path")
    model = models[0]
    pad = task.target_dictionary.pad()
    documents = DocumentBoundaries.from_dictionary(task.target_dictionary) if base.memory_reset == "document" else None
    capacity = replace(base, long_memory_size=max(sizes))
    memory = EvalMemory(capacity, pad, documents=documents, stream_keys=local_key_names(base))
    points = [replace(base, long_memory_size=n) for n in sizes]
    totals = {n: 0.0 for n in sizes}
    seconds = {n: 0.0 for n in sizes}
    count, forward_seconds, batches = 0, 0.0, 0
    for sample in eval_batches(cfg, task, models):
        start = time.perf_counter()
        net_output = model(**sample["net_input"])
        forward_seconds += time.perf_counter() - start
        scored = sample["target"].ne(pad)
        count += int(scored.sum())
        for n, opt in zip(sizes, points):
            start = time.perf_counter()
            log_prob = memory.target_log_probs(model.decoder, net_output, sample, opt)
            totals[n] += float(log_prob[scored].double().sum())
            seconds[n] += time.perf_counter() - start
        memory.advance(net_output, sample)
        batches += 1
        if batches % 50 == 0:
            logger.info(f"{batches} batches, {count} tokens scored for {len(sizes)} memory sizes")
    if count == 0:
        raise ValueError(f"no tokens to score in split '{cfg.dataset.gen_subset}'")
    rows = []
    for n in sizes:
        loss = -totals[n] / count / math.log(2)
        rows.append(dict(long_memory_size=n, loss_base2=loss, perplexity=2**loss, tokens=count,
                         tokens_per_second=count / (forward_seconds + seconds[n])))
    return rows


def write_outputs(out_dir: Path, results: Dict[str, List[Dict]], subset: str) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    header = "model,long_memory_size,perplexity,loss_base2,tokens,tokens_per_second"
    lines = [header] + [
        f"{label},{r['long_memory_size']},{r['perplexity']:.4f},{r['loss_base2']:.6f},{r['tokens']},"
        f"{r['tokens_per_second']:.1f}"
        for label, rows in results.items()
        for r in rows
    ]
    atomic_write_text(out_dir / "sweep.csv", "\n".join(lines) + "\n")
    atomic_write_text(out_dir / "sweep.json", json.dumps(dict(split=subset, results=results), indent=2) + "\n")

    labels = list(results)
    sizes = sorted({r["long_memory_size"] for rows in results.values() for r in rows})
    by = {label: {r["long_memory_size"]: r for r in rows} for label, rows in results.items()}
    md = [f"Perplexity on `{subset}` vs long-term memory size N (N = 0: the input row only).", "",
          "| N | " + " | ".join(labels) + " |", "|---:|" + "---:|" * len(labels)]
    for n in sizes:
        cells = [f"{by[label][n]['perplexity']:.2f}" if n in by[label] else "" for label in labels]
        md.append(f"| {n} | " + " | ".join(cells) + " |")
    atomic_write_text(out_dir / "sweep.md", "\n".join(md) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for label, rows in results.items():
        ax.plot([r["long_memory_size"] for r in rows], [r["perplexity"] for r in rows], marker="o", label=label)
    ax.set_xlabel("long-term memory size (tokens)")
    ax.set_ylabel(f"perplexity ({subset})")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(out_dir / "sweep.png") as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def get_parser():
    """trime-sweep-memory's parser: fairseq-eval-lm's plus the sweep's options (parse it with
    ``options.parse_args_and_arch``)."""
    from fairseq import options

    parser = options.get_eval_lm_parser()
    add_args(parser)
    return parser


def checked(cfg, args):
    """(base options, sizes) of a parsed command line, after every check that needs no model and no data."""
    from trime_fairseq.tasks.memory_config import memory_options

    if getattr(cfg.task, "long_memory_size", None) is not None:
        raise ValueError("trime-sweep-memory sets the long-term memory size itself: give --sizes, not --long-memory-size")
    base = memory_options(cfg.task)
    if "long_memory_size" not in base.record.options:
        raise ValueError("trime-sweep-memory needs an --eval-memory with a long-term memory (trime or cache) for the "
                         "--path model")
    return base, _sizes(args.sizes)


def main(argv=None):
    cfg, args = eval_lm_config(sys.argv[1:] if argv is None else argv, add_args)
    base, sizes = checked(cfg, args)
    results = {args.label: sweep_model(cfg, base, sizes)}
    if args.baseline_path:
        baseline_cfg = copy.deepcopy(cfg)
        baseline_cfg.common_eval.path = args.baseline_path
        baseline_cfg.task.eval_memory = "cache"
        baseline_cfg.task.memory_temperature = None
        baseline_cfg.task.cache_lambda, baseline_cfg.task.cache_theta = args.baseline_lambda, args.baseline_theta
        cache = MemoryOptions("cache", cache_lambda=args.baseline_lambda, cache_theta=args.baseline_theta,
                              memory_reset=base.memory_reset)
        results[args.baseline_label] = sweep_model(baseline_cfg, cache, sizes)
    out_dir = Path(args.out_dir)
    write_outputs(out_dir, results, cfg.dataset.gen_subset)
    print((out_dir / "sweep.md").read_text(encoding="utf-8"))
    return results


def cli_main():
    setup_logging()
    main()


if __name__ == "__main__":
    cli_main()
