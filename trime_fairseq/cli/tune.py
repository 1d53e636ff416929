"""``trime-tune``: grid-search the evaluation-memory hyper-parameters on a split.

Takes every ``fairseq-eval-lm`` option (the same data, checkpoint, context
window, batching and ``--task trime_lm`` memory options) plus the grids below,
runs the model over the split once, and scores every grid point on the same
forward passes (``EvalMemory.target_log_probs``: the distribution
``fairseq-eval-lm`` reports, evaluated at the target only; each distinct memory
summary -- per τ, θ, T, τ′ -- is computed once per batch and shared by the
grid points that use it, and the datastore is searched once per batch).

    trime-tune data-bin/wikitext-2 --user-dir trime_fairseq --task trime_lm \\
        --path checkpoints/trime/checkpoint_best.pt --gen-subset valid \\
        --eval-memory trime --temperatures 0.5,1,2 --results-json tune.json

Each mode grids over its record's ``axes`` (:mod:`trime_fairseq.memory.modes`):

| mode | grid |
|---|---|
| trime | τ (``--temperatures``) |
| cache | λ_c × θ (``--cache-lambdas``, ``--cache-thetas``) |
| knn | T × λ (``--knn-temperatures``, ``--knn-lambdas``); a cache given on the command line is kept |
| trime_ext | τ × τ′ × λ (``--temperatures``, ``--interpolation-temperatures``, ``--interpolation-lambdas``) |
| neighbour_knn | T × λ (``--knn-temperatures``, ``--knn-lambdas``) over the batch's precomputed neighbours |

``--widen-edges R`` (default 2): when the best value of an axis lies on the edge
of its grid, the axis is extended past that edge (temperatures and θ by a factor
2, λ towards 0 or 1) and the split is scored again, at most R more times, so
that the reported best is an interior point of the grid or lies at a bound of
the option itself (λ = 0 or 1), which the output says
(:mod:`trime_fairseq.cli.grid_search`, shared with ``trime-tune-mt``).
"""

import json
import logging
import math
import sys
import time
from dataclasses import asdict
from typing import Dict, List

import torch

from trime_fairseq.atomic import atomic_write_text
from trime_fairseq.cli import setup_logging
from trime_fairseq.cli.grid_search import add_grid_args, check_rounds, edge_note, grid_axes, search
from trime_fairseq.cli.loading import eval_batches, eval_lm_config, load_eval_models
from trime_fairseq.memory.eval_memory import EvalMemory, local_key_names
from trime_fairseq.memory.options import MemoryOptions

logger = logging.getLogger("trime_fairseq.tune")

#: the values each grid option lists unless given (the options a mode grids over are its record's ``axes``)
DEFAULT_GRIDS = {
    "memory_temperature": "0.25,0.5,1,2,4",
    "cache_lambda": "0.02,0.05,0.1,0.2,0.3",
    "cache_theta": "0.05,0.1,0.3,0.5,1.0",
    "knn_temperature": "0.5,1,2,5,10,20",
    "knn_lambda": "0.05,0.1,0.25,0.4,0.6",
    "interpolation_temperature": "0.5,1,2,5,10",
    "interpolation_lambda": "0.05,0.1,0.25,0.4,0.6",
}


def add_args(parser):
    group = parser.add_argument_group("trime-tune grids")
    add_grid_args(group, "axes", DEFAULT_GRIDS)
    group.add_argument("--widen-edges", type=int, default=2,
                       help="rounds of extending an axis whose best value lies on its grid's edge (0: never)")
    group.add_argument("--results-json", default=None, help="write every grid point and the best to this file")


def get_parser():
    """trime-tune's parser: fairseq-eval-lm's plus the grids (parse it with ``options.parse_args_and_arch``)."""
    from fairseq import options

    parser = options.get_eval_lm_parser()
    add_args(parser)
    return parser


def checked(cfg, args):
    """(base options, grid axes) of a parsed command line, after every check that needs no model and no data."""
    from trime_fairseq.tasks.memory_config import memory_options

    base = memory_options(cfg.task)
    axes = axes_of(base, args)
    check_rounds(args.widen_edges)
    return base, axes


def axes_of(base: MemoryOptions, args) -> Dict[str, List[float]]:
    return grid_axes(base, args, "axes", "trime-tune needs --eval-memory")


def describe(opt: MemoryOptions) -> str:
    """The fairseq-eval-lm flags that select ``opt`` (grid values; the fixed options are the command line's)."""
    return opt.record.flags(opt, opt.record.axes)


@torch.no_grad()
def score_grid(cfg, points: List[MemoryOptions], loaded=None, label: str = "") -> Dict[MemoryOptions, float]:
    """Perplexity of every option set on ``cfg.dataset.gen_subset``, one pass over the split."""
    models, task = loaded or load_eval_models(cfg)
    if len(models) != 1:
        raise ValueError("trime-tune scores one model; pass a single --path")
    model = models[0]  # in eval mode: prepare_for_inference_ did it
    pad = task.target_dictionary.pad()
    # the task's memory (built from the command line's options: datastore, stream) scores every point
    memory = getattr(model, "trime_eval_memory", None)
    if memory is None:
        keys = sorted({k for p in points for k in local_key_names(p)})
        memory = EvalMemory(points[-1], pad, stream_keys=keys or None)
    memory.reset()
    totals = {opt: 0.0 for opt in points}
    count, batches, started = 0, 0, time.time()
    for sample in eval_batches(cfg, task, models):
        net_output = model(**sample["net_input"])
        scored = sample["target"].ne(pad)
        count += int(scored.sum())
        for opt in points:
            log_prob = memory.target_log_probs(model.decoder, net_output, sample, opt)
            totals[opt] += float(log_prob[scored].double().sum())
        memory.advance(net_output, sample)  # the long-term memory (if any) moves on
        batches += 1
        if batches % 50 == 0:
            logger.info(f"{label}{batches} batches, {count} tokens scored for {len(points)} grid points "
                        f"({count / (time.time() - started):.0f} tokens/s)")
    if count == 0:
        raise ValueError(f"no tokens to score in split '{cfg.dataset.gen_subset}'")
    return {opt: math.exp(-total / count) for opt, total in totals.items()}


def tune(cfg, base: MemoryOptions, axes: Dict[str, List[float]], rounds: int):
    """Score the grid; widen edges up to ``rounds`` times. Returns (ppl of every point, best, history)."""
    check_rounds(rounds)
    loaded = load_eval_models(cfg)

    def score(points, r):
        return score_grid(cfg, points, loaded, label=f"round {r}: ")

    return search(base, axes, score, rounds, metric="perplexity", higher_is_better=False, describe=describe)


def main(argv=None):
    cfg, args = eval_lm_config(sys.argv[1:] if argv is None else argv, add_args)
    base, axes = checked(cfg, args)
    ppl, best, history = tune(cfg, base, axes, args.widen_edges)
    plain = next(p for p in ppl if p.plain)
    subset = cfg.dataset.gen_subset
    print(f"{'perplexity':>12}  options ({subset})")
    for opt, value in sorted(ppl.items(), key=lambda kv: kv[1]):
        print(f"{value:12.2f}  {describe(opt)}")
    edges = history[-1]["on_edge"]
    if edges:
        print(edge_note(history))
    print(f"best: {describe(best)}  ({subset} perplexity {ppl[best]:.2f}; without memory {ppl[plain]:.2f})")
    if args.results_json:
        atomic_write_text(args.results_json, json.dumps(dict(
            split=subset, checkpoint=cfg.common_eval.path, best=describe(best), best_perplexity=ppl[best],
            plain_perplexity=ppl[plain], on_edge=edges, rounds=history,
            points=[dict(flags=describe(p), perplexity=v, options=asdict(p)) for p, v in
                    sorted(ppl.items(), key=lambda kv: kv[1])],
        ), indent=2) + "\n")
    return best, ppl


def cli_main():
    setup_logging()
    main()


if __name__ == "__main__":
    cli_main()
