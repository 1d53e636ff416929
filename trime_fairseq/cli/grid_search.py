"""The grid search of ``trime-tune`` (perplexity, lower is better) and ``trime-tune-mt`` (BLEU, higher).

A grid is a product of axes, each a :class:`~trime_fairseq.memory.options.MemoryOptions`
field and its sorted values, on top of the command line's options. :func:`search` scores
it, and while the best value of an axis lies on an edge of its grid it extends that axis
past the edge and scores the new points, at most ``rounds`` more times, so that the
reported best is an interior point or lies at a bound of the option itself:

| axis | past the upper edge | past the lower edge | bound |
|---|---|---|---|
| λ (``cache_lambda``, ``knn_lambda``, ``interpolation_lambda``) | + the grid's last step, at most 1 | halved (0 below 0.01) | 0, 1 |
| K (``knn_k``) | doubled | halved | 1 |
| temperatures, θ | doubled | halved | none |

Which options a mode grids over is its record's (:mod:`trime_fairseq.memory.modes`): ``axes``
for ``trime-tune``, ``decoding_axes`` for ``trime-tune-mt``. :data:`GRIDS` names the
command-line option that lists an axis' values; :func:`add_grid_args` adds one per option that
some registered mode tunes, :func:`grid_axes` reads those of the mode asked for.
"""

import logging
from dataclasses import replace
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from trime_fairseq.memory.modes import REGISTRY, modes_where
from trime_fairseq.memory.options import MemoryOptions

logger = logging.getLogger("trime_fairseq.grid_search")

LAMBDAS = frozenset({"cache_lambda", "knn_lambda", "interpolation_lambda"})
COUNTS = frozenset({"knn_k"})

#: tunable option -> (the grid option listing its values, what the values are)
GRIDS: Dict[str, Tuple[str, str]] = {
    "memory_temperature": ("temperatures", "τ values of Eq. 6"),
    "cache_lambda": ("cache_lambdas", "λ values"),
    "cache_theta": ("cache_thetas", "θ values"),
    "knn_temperature": ("knn_temperatures", "T values"),
    "knn_lambda": ("knn_lambdas", "λ values"),
    "interpolation_temperature": ("interpolation_temperatures", "τ' values of Eq. 7"),
    "interpolation_lambda": ("interpolation_lambdas", "λ values of Eq. 8"),
    "knn_k": ("ks", "K values (neighbours retrieved per step)"),
    "sk_lambda_temperature": ("sk_lambda_temperatures", "τ_λ values of SK-MT's λ = ReLU(1 - d_0/τ_λ)"),
}


def add_grid_args(group, kind: str, defaults: Mapping[str, str]) -> None:
    """One grid option per option that a registered mode tunes (``kind``: ``axes`` or ``decoding_axes``
    of the records), with this tool's ``defaults``."""
    tuned = [name for name in GRIDS if any(name in getattr(mode, kind) for mode in REGISTRY.values())]
    for name in tuned:
        option, what = GRIDS[name]
        modes = modes_where(lambda mode: name in getattr(mode, kind))
        group.add_argument("--" + option.replace("_", "-"), default=defaults[name],
                           help=f"{what} ({', '.join(modes)})")


def grid_values(name: str, text: str) -> List[float]:
    """The sorted values of a grid option (whole numbers for counts)."""
    cast = int if name in COUNTS else float
    values = sorted({cast(x) for x in text.split(",") if x.strip()})
    if not values:
        raise ValueError(f"empty grid '{text}'")
    return values


def grid_axes(base: MemoryOptions, args, kind: str, needs: str, after: str = "") -> Dict[str, List[float]]:
    """The axes of ``base``'s mode (its record's ``kind``) with the values of ``args``' grid options;
    for a mode without any, the error ``needs`` + the modes that have some + ``after``."""
    names = getattr(base.record, kind)
    if not names:
        raise ValueError(f"{needs} {' or '.join(modes_where(lambda mode: getattr(mode, kind)))}{after}")
    return {name: grid_values(name, getattr(args, GRIDS[name][0])) for name in names}


#: scores of a list of grid points, given the number of the round (1, 2, ...)
Score = Callable[[List[MemoryOptions], int], Dict[MemoryOptions, float]]


def grid(base: MemoryOptions, axes: Dict[str, Sequence[float]]) -> List[MemoryOptions]:
    """The plain model, then every combination of the axes' values on top of ``base``."""
    points = [base]
    for name, values in axes.items():
        points = [replace(p, **{name: v}) for p in points for v in values]
    return [MemoryOptions()] + points  # the default options: no memory


def widen(axes: Dict[str, List[float]], best: MemoryOptions) -> Tuple[Dict[str, List[float]], List[str]]:
    """The axes extended past the edge their best value lies on (the module's table), and the axes
    whose best value is the option's own bound (nothing further to try)."""
    new, at_bound = {}, []
    for name, values in axes.items():
        value, values = getattr(best, name), list(values)
        if value == values[-1]:
            if name not in LAMBDAS:
                values.append(value * 2)
            elif value >= 1.0:
                at_bound.append(name)
            else:
                values.append(min(1.0, value + (value - values[-2] if len(values) > 1 else 0.1)))
        if value == values[0]:
            if name in COUNTS:
                if value <= 1:
                    at_bound.append(name)
                else:
                    values.insert(0, value // 2)
            elif name not in LAMBDAS:
                values.insert(0, value / 2)
            elif value <= 0.0:
                at_bound.append(name)
            else:
                values.insert(0, value / 2 if value > 0.01 else 0.0)
        new[name] = values
    return new, at_bound


def on_edge(axes: Dict[str, List[float]], best: MemoryOptions) -> List[str]:
    """Names of the axes whose best value is the first or last of its grid."""
    edges = []
    for name, values in axes.items():
        value = getattr(best, name)
        if len(values) == 1 or value in (values[0], values[-1]):
            edges.append(name)
    return edges


def check_rounds(rounds: int) -> None:
    """``--widen-edges``: the tuners call it before loading anything, :func:`search` again."""
    if rounds < 0:
        raise ValueError(f"--widen-edges must be >= 0, got {rounds}")


def search(base: MemoryOptions, axes: Dict[str, List[float]], score: Score, rounds: int, metric: str,
           higher_is_better: bool, describe: Callable[[MemoryOptions], str] = str,
           known: Optional[Mapping[MemoryOptions, float]] = None):
    """Score the grid (the plain model's point included), widening edges up to ``rounds`` times.

    ``score(points, round)`` answers for the points not scored yet; ``known``: scores of an earlier, interrupted
    run of the same tuning (:class:`~trime_fairseq.cli.score_log.ScoreLog`), whose points are not scored again
    (only those of the grid count). Returns (the score of every point of the grids, the best point with memory,
    one record per round: axes, best, its ``metric``, axes on an edge)."""
    check_rounds(rounds)
    known = dict(known or {})
    scores: Dict[MemoryOptions, float] = {}
    history = []
    pick = max if higher_is_better else min
    for r in range(1, rounds + 2):
        points = [p for p in grid(base, axes) if p not in scores]
        reused = {p: known[p] for p in points if p in known}
        points = [p for p in points if p not in reused]
        logger.info(f"round {r}: {len(points)} new grid points"
                    f"{f' ({len(reused)} more scored by an earlier run)' if reused else ''} "
                    f"({', '.join(f'{k}={v}' for k, v in axes.items())})")
        scores.update(reused)
        if points:
            scores.update(score(points, r))
        best = pick((p for p in scores if not p.plain), key=scores.get)
        edges = on_edge(axes, best)
        history.append(dict(round=r, axes={k: list(v) for k, v in axes.items()}, best=describe(best),
                            **{metric: scores[best]}, on_edge=edges))
        if not edges or r == rounds + 1:
            break
        axes, at_bound = widen(axes, best)
        if set(edges) <= set(at_bound):
            history[-1]["at_bound"] = at_bound
            break
    return scores, best, history


def edge_note(history) -> str:
    """The line saying where a best value that is still on an edge lies ('' when none is)."""
    edges = history[-1]["on_edge"]
    if not edges:
        return ""
    where = "at the option's bound" if history[-1].get("at_bound") else "on the edge of the widened grid"
    return f"note: the best value of {', '.join(edges)} lies {where}"
