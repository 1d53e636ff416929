"""One composition per evaluation mode: which memory parts, at which scale, joint or interpolated.

A mode is data, not a code path. :func:`composition` turns :class:`MemoryOptions`
into a :class:`Composition`:

* ``joint`` -- terms that share one softmax with the token scores (Eq. 5/6);
  empty: the model's own softmax;
* ``interpolations`` -- applied in order, each log((1 − λ)·p + λ·q) with q the
  distribution of its terms' entries alone (Eq. 7-8, kNN-LM, continuous cache).

A term is one memory *part* -- entries a driver gathers for its queries, with
*raw* scores -- times a scale:

| part | entries | raw score |
|---|---|---|
| ``LOCAL_G`` | the scored row's earlier positions (+ the stream's long-term memory) | g·g_j |
| ``LOCAL_F`` | the same positions | f·f_j |
| ``DATASTORE`` | the K retrieved entries of the external memory | the index's: q·k (ip) or −‖q−k‖² (l2) |
| ``NEIGHBOURS`` | the position's precomputed neighbours, carried in the batch (SPALM's ``--neighbours``) | the datastore's, stored by trime-neighbours |

| mode | joint | interpolations |
|---|---|---|
| none | — | — |
| trime | LOCAL_G / (√d·τ) | — |
| cache | — | (LOCAL_F · θ, λ_c) |
| knn | — | (DATASTORE / T, λ), then (LOCAL_F · θ, λ_c) with a cache |
| trime_ext | LOCAL_G, DATASTORE / (√d·τ) | (LOCAL_G, DATASTORE / (√d·τ′), λ) |
| neighbour_knn | — | (NEIGHBOURS / T, λ): SPALM + kNN; with another model, kNN-LM over the same neighbours |

Without a local memory (``local=False``: translation, where TRIME-MT uses the
external memory only) the LOCAL terms are left out of trime_ext, and modes that
consist of local memory only are refused.

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

from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Dict, FrozenSet, Mapping, Optional, Tuple

from torch import Tensor

from trime_fairseq.memory.blockwise import summary_batch
from trime_fairseq.memory.keys import TRIME_FEATURE, TRIME_KEY
from trime_fairseq.memory.mixing import (
    fp32,
    interpolate,
    interpolate_memory_,
    joint_log_probs_,
    joint_target_log_prob,
    memory_target_log_prob,
)
from trime_fairseq.memory.options import MemoryOptions
from trime_fairseq.memory.sources import MemoryBatch, concat_memory, dot_scale

LOCAL_G = "local_g"
LOCAL_F = "local_f"
DATASTORE = "datastore"
NEIGHBOURS = "neighbours"
#: parts that are not the scored sequence's own positions
RETRIEVED = frozenset({DATASTORE, NEIGHBOURS})
#: the key kind each local part searches with
LOCAL_KEYS: Dict[str, str] = {LOCAL_G: TRIME_KEY, LOCAL_F: TRIME_FEATURE}


@dataclass(frozen=True)
class Term:
    part: str  # LOCAL_G, LOCAL_F, DATASTORE or NEIGHBOURS
    scale: float  # multiplier of the part's raw scores


@dataclass(frozen=True)
class Interpolation:
    terms: Tuple[Term, ...]  # the entries of q
    weight: float  # λ


@dataclass(frozen=True)
class Composition:
    joint: Tuple[Term, ...] = ()
    interpolations: Tuple[Interpolation, ...] = ()

    @property
    def terms(self) -> Tuple[Term, ...]:
        return self.joint + tuple(t for step in self.interpolations for t in step.terms)

    @property
    def parts(self) -> FrozenSet[str]:
        return frozenset(t.part for t in self.terms)


@lru_cache(maxsize=1024)
def composition(options: MemoryOptions, dim: Optional[int] = None, local: bool = True) -> Composition:
    """The composition of ``options``; ``dim``: dimension of g (trime, trime_ext)."""
    mode = options.mode
    if not local and mode in ("trime", "cache") or (mode == "knn" and options.uses_cache and not local):
        raise ValueError(f"--eval-memory {mode} needs a local memory (the scored sequence's own earlier "
                         "positions), which this task does not have")
    if mode in ("trime", "trime_ext") and dim is None:
        raise ValueError(f"--eval-memory {mode} scales similarities by 1/√d: the key dimension is needed")
    if mode == "none":
        return Composition()
    if mode == "trime":
        return Composition(joint=(Term(LOCAL_G, dot_scale(dim, options.memory_temperature)),))
    cache = Interpolation((Term(LOCAL_F, options.cache_theta),), options.cache_weight)
    if mode == "cache":
        return Composition(interpolations=(cache,))
    if mode == "knn":
        knn = Interpolation((Term(DATASTORE, 1.0 / options.knn_temperature),), options.knn_lambda)
        return Composition(interpolations=(knn, cache) if options.uses_cache else (knn,))
    if mode == "neighbour_knn":
        knn = Interpolation((Term(NEIGHBOURS, 1.0 / options.knn_temperature),), options.knn_lambda)
        return Composition(interpolations=(knn,))
    if mode == "trime_ext":
        parts = (LOCAL_G, DATASTORE) if local else (DATASTORE,)
        eq6 = dot_scale(dim, options.memory_temperature)
        eq7 = dot_scale(dim, options.interpolation_temperature)
        return Composition(
            joint=tuple(Term(p, eq6) for p in parts),
            interpolations=(Interpolation(tuple(Term(p, eq7) for p in parts), options.interpolation_lambda),),
        )
    raise ValueError(f"unknown eval memory '{mode}'")


def _entries(terms: Tuple[Term, ...], parts: Mapping[str, MemoryBatch]) -> MemoryBatch:
    return concat_memory([parts[t.part].scaled(t.scale) for t in terms])


def full_log_probs(comp: Composition, token_log_probs: Tensor, token_lse: Tensor,
                   parts: Mapping[str, MemoryBatch]) -> Tensor:
    """(Q, V) float32 log-probabilities, computed in place.

    ``token_log_probs`` (Q, V) float32: the model's own token distribution (log-softmax of
    the token scores, exact where it is read; a view is fine), overwritten and returned;
    ``token_lse`` (Q,) the log-partition of the token scores (scores = log-probs + lse);
    ``parts``: name -> raw MemoryBatch (Q, M).
    """
    out = token_log_probs
    if comp.joint:
        out = joint_log_probs_(out, token_lse, *_entries(comp.joint, parts))  # Eq. 5/6
    for step in comp.interpolations:  # Eq. 7-8, kNN-LM, cache
        out = interpolate_memory_(out, *_entries(step.terms, parts), step.weight)
    return out


Sums = Tuple[Tensor, Tensor]  # (match, other): log Σ exp(score) over visible entries with / without the target


def target_log_prob(comp: Composition, token_target: Tensor, token_lse: Tensor, target: Tensor,
                    summarize: Callable[[Term], Sums]) -> Tensor:
    """(Q,) float32 log P(target): what :func:`full_log_probs` gives at the target.

    ``summarize(term)`` returns the term's (match, other) log-sums (Q,) at its scale;
    each term is asked for once per call (callers memoise across calls).
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
        memory = summary(step.terms)
        out = interpolate(out, memory_target_log_prob(*memory, target), step.weight, memory.mask.any(-1))
    return out
