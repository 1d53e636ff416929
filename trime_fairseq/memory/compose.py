"""One composition per evaluation mode: which memory parts, at which scale, joint or interpolated.

A mode is data, not a code path: its record (:mod:`trime_fairseq.memory.modes`, one module per
mode) holds a recipe that :func:`composition` evaluates for :class:`MemoryOptions` into a
:class:`~trime_fairseq.memory.composition.Composition`:

* ``joint`` -- terms that share one softmax with the token scores (Eq. 5/6);
  empty: the model's own softmax;
* ``interpolations`` -- applied in order, each log((1 − λ)·p + λ·q) with q the
  distribution of its terms' entries alone (Eq. 7-8, kNN-LM, continuous cache).

A term is one memory *part* (``LOCAL_G``, ``LOCAL_F``, ``DATASTORE``, ``NEIGHBOURS``:
:mod:`trime_fairseq.memory.composition`) times a scale. The registered modes:

| mode | joint | interpolations |
|---|---|---|
| none | — | — |
| trime | LOCAL_G / (√d·τ) | — |
| cache | — | (LOCAL_F · θ, λ_c) |
| knn | — | (DATASTORE / T, λ), then (LOCAL_F · θ, λ_c) with a cache |
| trime_ext | LOCAL_G, DATASTORE / (√d·τ) | (LOCAL_G, DATASTORE / (√d·τ′), λ) |
| neighbour_knn | — | (NEIGHBOURS / T, λ): SPALM + kNN; with another model, kNN-LM over the same neighbours |
| adaptive_knn | — | (DATASTORE / T, λ(x) and q's weights from a Meta-k network: adaptive kNN-MT) |

(``Mode.describe()`` writes each row from the record.) Without a local memory (``local=False``:
translation, where TRIME-MT uses the external memory only) the LOCAL terms are left out of a
step that has retrieved ones too (trime_ext), and a mode whose record says it needs a local
memory -- or a step made of local terms only (knn's cache) -- is refused.

Two combiners evaluate a composition, and every driver uses one of them:

* :func:`full_log_probs` -- (Q, V) log-probabilities from gathered parts
  ((Q, M) raw memory batches): ``get_normalized_probs`` under
  ``fairseq-eval-lm`` / ``--score-reference``, and per decoding step under
  ``fairseq-generate``;
* :func:`target_log_prob` -- (Q,) log P(target) from per-term target summaries
  (tuning: a driver computes each distinct (part, scale) summary once and every
  grid point reuses it).

All the math is :mod:`trime_fairseq.memory.mixing`'s.
"""

from functools import lru_cache
from typing import Callable, Mapping, Optional, Tuple

from torch import Tensor

from trime_fairseq.memory.blockwise import summary_batch
from trime_fairseq.memory.composition import (  # noqa: F401  (re-exported: the parts and terms of a composition)
    DATASTORE,
    LOCAL_F,
    LOCAL_G,
    LOCAL_KEYS,
    NEIGHBOURS,
    RETRIEVED,
    Composition,
    Interpolation,
    Term,
)
from trime_fairseq.memory.mixing import (
    fp32,
    interpolate,
    interpolate_memory_,
    joint_log_probs_,
    joint_target_log_prob,
    memory_target_log_prob,
)
from trime_fairseq.memory.options import MemoryOptions
from trime_fairseq.memory.sources import MemoryBatch, concat_memory


@lru_cache(maxsize=1024)
def composition(options: MemoryOptions, dim: Optional[int] = None, local: bool = True) -> Composition:
    """The composition of ``options`` (its mode's record evaluated); ``dim``: dimension of g, needed by
    modes that scale by 1/√d (trime, trime_ext)."""
    return options.record.compose(options, dim, local)


def _entries(terms: Tuple[Term, ...], parts: Mapping[str, MemoryBatch]) -> MemoryBatch:
    return concat_memory([parts[t.part].scaled(t.scale) for t in terms])


def full_log_probs(comp: Composition, token_log_probs: Tensor, token_lse: Optional[Tensor],
                   parts: Mapping[str, MemoryBatch]) -> Tensor:
    """(Q, V) float32 log-probabilities, computed in place.

    ``token_log_probs`` (Q, V) float32: the model's own token distribution (log-softmax of
    the token scores, exact where it is read; a view is fine), overwritten and returned;
    ``token_lse`` (Q,) the log-partition of the token scores (scores = log-probs + lse; only a
    composition with joint terms reads it, None otherwise);
    ``parts``: name -> raw MemoryBatch (Q, M).
    """
    out = token_log_probs
    if comp.joint:
        if token_lse is None:
            raise ValueError("a composition with joint terms (Eq. 5/6) needs the token scores' log-partition")
        out = joint_log_probs_(out, token_lse, *_entries(comp.joint, parts))  # Eq. 5/6
    for step in comp.interpolations:  # Eq. 7-8, kNN-LM, cache; adaptive steps: λ per row
        entries, lam = step.apply(_entries(step.terms, parts))
        out = interpolate_memory_(out, *entries, lam)
    return out


Sums = Tuple[Tensor, Tensor]  # (match, other): log Σ exp(score) over visible entries with / without the target


def target_log_prob(comp: Composition, token_target: Tensor, token_lse: Tensor, target: Tensor,
                    summarize: Callable[[Term], Sums],
                    entries: Optional[Callable[[Tuple[Term, ...]], MemoryBatch]] = None) -> Tensor:
    """(Q,) float32 log P(target): what :func:`full_log_probs` gives at the target.

    ``summarize(term)`` returns the term's (match, other) log-sums (Q,) at its scale;
    each term is asked for once per call (callers memoise across calls). An adaptive step (a
    rule) reads its entries themselves: ``entries(terms)`` gives the scaled (Q, M) entries of the
    terms, concatenated.
    """

    def summary(terms):
        match = other = None
        for term in terms:
            m, o = summarize(term)
            match = m if match is None else match.logaddexp(m)
            other = o if other is None else other.logaddexp(o)
        return summary_batch(match, other, target)  # (Q, 2)

    if comp.joint:
        out = joint_target_log_prob(token_target, token_lse, *summary(comp.joint), target)
    else:
        out = fp32(token_target) - fp32(token_lse)
    for step in comp.interpolations:
        if step.rule is None:
            memory, lam = summary(step.terms), step.weight
        elif entries is None:
            raise ValueError("an adaptive interpolation step needs its entries (the driver passes entries=)")
        else:
            memory, lam = step.apply(entries(step.terms))
        out = interpolate(out, memory_target_log_prob(*memory, target), lam, memory.mask.any(-1))
    return out
