"""What a composition is made of: memory parts, terms (a part times a scale) and interpolation steps.

A *part* is a set of memory entries a driver gathers for its queries, with raw scores:

| part | entries | raw score | options it reads |
|---|---|---|---|
| ``LOCAL_G`` | the scored row's earlier positions (+ the stream's long-term memory) | g·g_j | long-term memory, reset |
| ``LOCAL_F`` | the same positions | f·f_j | cache size, long-term memory, reset |
| ``DATASTORE`` | the K retrieved entries of the external memory | the index's: q·k (ip) or −‖q−k‖² (l2) | datastore, K, search |
| ``NEIGHBOURS`` | the position's precomputed neighbours, carried in the batch (SPALM's ``--neighbours``) | the datastore's, stored by trime-neighbours | -- |
| ``SENTENCE_PAIRS`` | the ``knn_k`` nearest forced-decoded target positions of the training pairs BM25 retrieved for the query's own sentence (SK-MT, :mod:`trime_fairseq.memory.sentence_pairs`) | −‖q−k‖² | the retrieval file, m, K |

A :class:`Composition` is what an evaluation mode computes from them (see
:mod:`trime_fairseq.memory.modes` for each mode's recipe, :mod:`trime_fairseq.memory.compose`
for the combiners).
"""

from dataclasses import dataclass
from typing import Callable, Dict, FrozenSet, Optional, Tuple

from torch import Tensor

from trime_fairseq.memory.keys import TRIME_FEATURE, TRIME_KEY
from trime_fairseq.memory.sources import MemoryBatch

LOCAL_G = "local_g"
LOCAL_F = "local_f"
DATASTORE = "datastore"
NEIGHBOURS = "neighbours"
SENTENCE_PAIRS = "sentence_pairs"
#: parts that are the scored sequence's own earlier positions (absent in translation)
LOCAL = frozenset({LOCAL_G, LOCAL_F})
#: parts that are not the scored sequence's own positions
RETRIEVED = frozenset({DATASTORE, NEIGHBOURS, SENTENCE_PAIRS})
#: the key kind each local part searches with
LOCAL_KEYS: Dict[str, str] = {LOCAL_G: TRIME_KEY, LOCAL_F: TRIME_FEATURE}

_LONG = frozenset({"long_memory_size", "memory_reset"})
#: the MemoryOptions fields that decide which entries a part holds (besides the composition's scales)
PART_OPTIONS: Dict[str, FrozenSet[str]] = {
    LOCAL_G: _LONG,
    LOCAL_F: frozenset({"cache_size"}) | _LONG,
    DATASTORE: frozenset({"datastore", "knn_k", "knn_nprobe", "knn_rescore", "knn_gpu"}),
    NEIGHBOURS: frozenset(),
    SENTENCE_PAIRS: frozenset({"sk_pairs", "sk_m", "knn_k"}),
}


@dataclass(frozen=True)
class Term:
    part: str  # LOCAL_G, LOCAL_F, DATASTORE or NEIGHBOURS
    scale: float  # multiplier of the part's raw scores


#: an adaptive step's rule: the step's scaled entries (Q, M) -> (the entries q is made of (Q, M'), λ (Q,) in
#: [0, 1]), row by row from what each row retrieved (never its target): a distance rule (SK-MT) or a network
#: over K and λ (adaptive kNN-MT)
StepRule = Callable[[MemoryBatch], Tuple[MemoryBatch, Tensor]]


@dataclass(frozen=True)
class Interpolation:
    terms: Tuple[Term, ...]  # the entries of q
    weight: Optional[float]  # λ, the same for every row; None with a rule
    rule: Optional[StepRule] = None  # adaptive: q's entries and a λ per row from the step's entries

    def __post_init__(self):
        if (self.weight is None) == (self.rule is None):
            raise ValueError("an interpolation has either one weight λ or a rule giving λ per row")

    def apply(self, entries: MemoryBatch):
        """(the entries of q, λ: a number or (Q,)) for the step's scaled ``entries`` (Q, M)."""
        return self.rule(entries) if self.rule is not None else (entries, self.weight)


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
