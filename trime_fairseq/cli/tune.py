"""``trime-tune``: grid-search the evaluation-memory hyper-parameters on a split.

Takes every ``fairseq-eval-lm`` option (the same data, checkpoint, context
window, batching and ``--task trime_lm`` memory options) plus the grids below,
runs the model over the split once, and scores every grid point on the same
forward passes (``EvalMemory.target_log_probs``: the distribution
``fairseq-eval-lm`` reports, evaluated at the target only).

    trime-tune data-bin/wikitext-2 --user-dir trime_fairseq --task trime_lm \\
        --path checkpoints/trime/checkpoint_best.pt --gen-subset valid \\
        --eval-memory trime --temperatures 0.5,1,2

kNN-LM (T x λ) and TRIMELM_ext (τ x τ' x λ) take the datastore options of
fairseq-eval-lm; the datastore is searched once per batch for all grid points:

    trime-tune data-bin/wikitext-2 --user-dir trime_fairseq --task trime_lm \\
        --path checkpoints/trime_ext/checkpoint_best.pt --gen-subset valid \\
        --eval-memory trime_ext --datastore dstore/train --knn-k 1024
"""

import logging
import math
import sys
from dataclasses import replace
from typing import Dict, List

import torch

from trime_fairseq.cli.loading import eval_batches, eval_lm_config, load_eval_models
from trime_fairseq.memory.eval_memory import EvalMemory, MemoryOptions

logger = logging.getLogger("trime_fairseq.tune")


def _floats(text: str) -> List[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def add_args(parser):
    group = parser.add_argument_group("trime-tune grids")
    group.add_argument("--temperatures", default="0.25,0.5,1,2,4", help="τ values (--eval-memory trime, trime_ext)")
    group.add_argument("--cache-lambdas", default="0.02,0.05,0.1,0.2,0.3", help="λ values (--eval-memory cache)")
    group.add_argument("--cache-thetas", default="0.05,0.1,0.3,0.5,1.0", help="θ values (--eval-memory cache)")
    group.add_argument("--knn-temperatures", default="0.5,1,2,5,10,20",
                       help="T values (--eval-memory knn), τ' values (--eval-memory trime_ext)")
    group.add_argument("--knn-lambdas", default="0.05,0.1,0.25,0.4,0.6",
                       help="λ values of the kNN interpolation (--eval-memory knn, trime_ext)")


def grid(base: MemoryOptions, args) -> List[MemoryOptions]:
    """The options to score: the plain model, then the grid of the chosen memory
    (knn: T x λ, the cache options as given; trime_ext: τ x τ' x λ)."""
    if base.mode == "trime":
        points = [replace(base, temperature=t) for t in _floats(args.temperatures)]
    elif base.mode == "cache":
        points = [
            replace(base, cache_lambda=lam, cache_theta=theta)
            for lam in _floats(args.cache_lambdas)
            for theta in _floats(args.cache_thetas)
        ]
    elif base.mode == "knn":
        points = [
            replace(base, knn_temperature=t, knn_lambda=lam)
            for t in _floats(args.knn_temperatures)
            for lam in _floats(args.knn_lambdas)
        ]
    elif base.mode == "trime_ext":
        points = [
            replace(base, temperature=tau, knn_temperature=t, knn_lambda=lam)
            for tau in _floats(args.temperatures)
            for t in _floats(args.knn_temperatures)
            for lam in _floats(args.knn_lambdas)
        ]
    else:
        raise ValueError("trime-tune needs --eval-memory trime, cache, knn or trime_ext")
    return [MemoryOptions("none")] + points


def describe(opt: MemoryOptions) -> str:
    """The fairseq-eval-lm flags that select ``opt`` (grid values; the fixed options are the command line's)."""
    if opt.mode == "trime":
        return f"--eval-memory trime --memory-temperature {opt.temperature:g}"
    if opt.mode == "cache":
        return f"--eval-memory cache --cache-lambda {opt.cache_weight:g} --cache-theta {opt.cache_theta:g}"
    if opt.mode == "knn":
        cache = f" --cache-lambda {opt.cache_weight:g} --cache-theta {opt.cache_theta:g}" if opt.uses_cache else ""
        return f"--eval-memory knn --knn-temperature {opt.knn_temperature:g} --knn-lambda {opt.knn_lambda:g}{cache}"
    if opt.mode == "trime_ext":
        return (f"--eval-memory trime_ext --memory-temperature {opt.temperature:g} "
                f"--knn-temperature {opt.knn_temperature:g} --knn-lambda {opt.knn_lambda:g}")
    return "--eval-memory none"


@torch.no_grad()
def score_grid(cfg, points: List[MemoryOptions]) -> Dict[MemoryOptions, float]:
    """Perplexity of every option set on ``cfg.dataset.gen_subset``."""
    models, task = load_eval_models(cfg)
    if len(models) != 1:
        raise ValueError("trime-tune scores one model; pass a single --path")
    model = models[0]  # in eval mode: prepare_for_inference_ did it
    pad = task.target_dictionary.pad()
    # the task's memory (built from the command line's options: datastore, stream) scores every point
    memory = getattr(model, "trime_eval_memory", None) or EvalMemory(points[0], pad)
    totals = {opt: 0.0 for opt in points}
    count = 0
    for sample in eval_batches(cfg, task, models):
        net_output = model(**sample["net_input"])
        scored = sample["target"].ne(pad)
        count += int(scored.sum())
        for opt in points:
            log_prob = memory.target_log_probs(model.decoder, net_output, sample, opt)
            totals[opt] += float(log_prob[scored].double().sum())
        memory.advance(net_output, sample)  # the long-term memory (if any) moves on
    if count == 0:
        raise ValueError(f"no tokens to score in split '{cfg.dataset.gen_subset}'")
    return {opt: math.exp(-total / count) for opt, total in totals.items()}


def main(argv=None):
    cfg, args = eval_lm_config(sys.argv[1:] if argv is None else argv, add_args)
    from trime_fairseq.tasks.trime_lm import memory_options

    points = grid(memory_options(cfg.task), args)
    ppl = score_grid(cfg, points)
    rows = sorted(ppl.items(), key=lambda kv: kv[1])
    print(f"{'perplexity':>12}  options ({cfg.dataset.gen_subset})")
    for opt, value in rows:
        print(f"{value:12.2f}  {describe(opt)}")
    best = min((opt for opt in points if opt.mode != "none"), key=ppl.get)
    print(f"best: {describe(best)}  ({cfg.dataset.gen_subset} perplexity {ppl[best]:.2f}; "
          f"without memory {ppl[points[0]]:.2f})")
    return best, ppl


def cli_main():
    logging.basicConfig(format="%(asctime)s | %(levelname)s | %(name)s | %(message)s", level=logging.INFO)
    main()


if __name__ == "__main__":
    cli_main()
