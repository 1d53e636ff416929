"""What a composition is made of: memory parts, terms (a part times a scale) and interpolation steps.

A *part* is a set of memory entries a driver gathers for its queries, with raw scores:

| part | entries | raw score | options it reads |
|---|---|---|---|
| ``LOCAL_G`` | the scored row's earlier positions (+ the stream's long-term memory) | g·g_j | long-term memory, reset |
| ``LOCAL_F`` | the same positions | f·f_j | cache size, long-term memory, reset |
| ``DATASTORE`` | the K retrieved entries of the external memory | the index's: q·k (ip) or −‖q−k‖² (l2) | datastore, K, search |
| ``NEIGHBOURS`` | the position's precomputed neighbours, carried in the batch (SPALM's ``--neighbours``) | the datastore's, stored by trime-neighbours | -- |

A :class:`Composition` is what an evaluation mode computes from them (see
:mod:`trime_fairseq.memory.modes` for each mode's recipe, :mod:`trime_fairseq.memory.compose`
for the combiners).
"""

from dataclasses import dataclass
from typing import Dict, FrozenSet, Tuple

from trime_fairseq.memory.keys import TRIME_FEATURE, TRIME_KEY

LOCAL_G = "local_g"
LOCAL_F = "local_f"
DATASTORE = "datastore"
NEIGHBOURS = "neighbours"
#: parts that are the scored sequence's own earlier positions (absent in translation)
LOCAL = frozenset({LOCAL_G, LOCAL_F})
#: parts that are not the scored sequence's own positions
RETRIEVED = frozenset({DATASTORE, NEIGHBOURS})
#: the key kind each local part searches with
LOCAL_KEYS: Dict[str, str] = {LOCAL_G: TRIME_KEY, LOCAL_F: TRIME_FEATURE}

_LONG = frozenset({"long_memory_size", "memory_reset"})
#: the MemoryOptions fields that decide which entries a part holds (besides the composition's scales)
PART_OPTIONS: Dict[str, FrozenSet[str]] = {
    LOCAL_G: _LONG,
    LOCAL_F: frozenset({"cache_size"}) | _LONG,
    DATASTORE: frozenset({"datastore", "knn_k", "knn_nprobe", "knn_rescore", "knn_gpu"}),
    NEIGHBOURS: frozenset(),
}


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
    joint: Tuple[Term, ...] = ()  # terms sharing one softmax with the token scores (Eq. 5/6)
    interpolations: Tuple[Interpolation, ...] = ()  # applied in order: log((1 − λ)·p + λ·q)

    @property
    def terms(self) -> Tuple[Term, ...]:
        return self.joint + tuple(t for step in self.interpolations for t in step.terms)

    @property
    def parts(self) -> FrozenSet[str]:
        return frozenset(t.part for t in self.terms)
