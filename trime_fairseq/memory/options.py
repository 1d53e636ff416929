"""The evaluation-memory options: one field per quantity, validated in one place.

``--eval-memory MODE`` picks how the token distribution is combined with memory:
the mode's record (:mod:`trime_fairseq.memory.modes`) holds its composition, and
which of the fields below it reads follows from it (``Mode.options``). Every
other option is a field of :class:`MemoryOptions` with exactly one meaning:

| field | symbol |
|---|---|
| ``memory_temperature`` | τ of Eq. 6: sim = g·g_j / (√d·τ) |
| ``cache_lambda``, ``cache_theta`` | λ_c, θ of the continuous cache: p_cache ∝ Σ exp(θ·f·f_j) |
| ``cache_size`` | the cache keeps the last N positions of the row |
| ``long_memory_size`` | N earlier stream entries in memory (TRIMELM_long) |
| ``memory_reset`` | "document": memory from the position's own document only |
| ``datastore``, ``knn_k``, ``knn_nprobe``, ``knn_rescore``, ``knn_gpu`` | the external memory and its search (K hits) |
| ``knn_temperature``, ``knn_lambda`` | T, λ of kNN-LM: p_kNN ∝ Σ exp(score/T) |
| ``interpolation_temperature``, ``interpolation_lambda`` | τ′, λ of Eq. 7-8 |
| ``sk_pairs``, ``sk_m`` | SK-MT: the trime-retrieve-pairs file of the split, and how many of each sentence's retrieved training pairs form its memory (None: all m of the file) |
| ``sk_lambda_temperature`` | τ of SK-MT's λ = ReLU(1 − d_0/τ) (None: T, as the paper) |
| ``sk_max_lambda`` | SK-MT's λ is capped here (1: uncapped; see memory/modes/sk_mt.py) |
| ``knn_skip_predictor``, ``knn_skip_threshold`` | adaptive retrieval (He et al. 2021): the predictor file, and the P(retrieval helps) below which a position skips the search (None: the file's) |
| ``knn_adaptive_network`` | adaptive kNN-MT (Zheng et al. 2021): the Meta-k network file (``adaptive_knn``, which needs it) |

:meth:`MemoryOptions.from_flags` is how a task builds the options from its
command line: a flag the mode does not use is an error (never silently ignored),
a flag not given takes its default. ``__post_init__`` checks every value.
"""

from dataclasses import dataclass, fields
from typing import FrozenSet, Mapping, Optional

from trime_fairseq.memory.composition import DATASTORE, LOCAL, LOCAL_F, NEIGHBOURS, SENTENCE_PAIRS
from trime_fairseq.memory.modes import REGISTRY, flag, mode_names, mode_of, modes_where
from trime_fairseq.memory.skip import check_threshold

#: the modes registered when this module was imported (``--eval-memory``'s choices)
MODES = mode_names()
RESETS = ("never", "document")

__all__ = ["MODES", "RESETS", "MemoryOptions", "flag", "options_of_mode"]


def options_of_mode(mode: str) -> FrozenSet[str]:
    """The options ``mode`` reads (the mode itself excluded): its record's."""
    return mode_of(mode).options


@dataclass(frozen=True)
class MemoryOptions:
    mode: str = "none"
    memory_temperature: float = 1.0  # τ of Eq. 6
    cache_lambda: Optional[float] = None  # λ_c; None: 0.1 for cache, 0 (no cache) for knn
    cache_theta: float = 0.3  # θ, flatness of the cache distribution
    cache_size: Optional[int] = None  # None: every earlier position of the row
    long_memory_size: int = 0  # N earlier stream entries (0: the input row only)
    memory_reset: str = "never"  # "document": memory only from the position's own document
    datastore: Optional[str] = None  # external memory folder (knn, trime_ext)
    knn_k: int = 1024  # K entries retrieved per scored position
    knn_nprobe: Optional[int] = None  # inverted lists probed (None: the datastore's default)
    knn_rescore: bool = False  # re-rank the index's hits with the exact stored keys
    knn_gpu: bool = False  # search the index on the GPU (faiss-gpu)
    knn_temperature: float = 1.0  # T of kNN-LM
    knn_lambda: float = 0.25  # λ of kNN-LM
    interpolation_temperature: float = 1.0  # τ' of Eq. 7 (trime_ext)
    interpolation_lambda: float = 0.25  # λ of Eq. 8 (trime_ext)
    knn_skip_predictor: Optional[str] = None  # trime-train-skip-predictor file: skip searches that will not help
    knn_skip_threshold: Optional[float] = None  # search iff P(helps) >= this (None: the predictor's own)
    knn_adaptive_network: Optional[str] = None  # trime-train-adaptive-knn file (adaptive_knn)
    sk_pairs: Optional[str] = None  # SK-MT: trime-retrieve-pairs file of the evaluated split
    sk_m: Optional[int] = None  # SK-MT: retrieved pairs per sentence in its memory (None: all of the file's m)
    sk_lambda_temperature: Optional[float] = None  # SK-MT: τ of λ = ReLU(1 − d_0/τ) (None: knn_temperature)
    sk_max_lambda: float = 0.99  # SK-MT: λ <= this, so that every token stays possible (beam search must end)

    @classmethod
    def from_flags(cls, mode: str, given: Mapping[str, object], available: Optional[FrozenSet[str]] = None,
                   context: str = "") -> "MemoryOptions":
        """Options of ``mode`` from the flags a user gave (``given``: name -> value, only the
        flags actually set). A flag the mode does not read -- or, with ``available``, one
        that this call path cannot apply -- is an error."""
        record = mode_of(mode)  # refuses an unknown mode
        known = {f.name for f in fields(cls)} - {"mode"}
        unknown = sorted(set(given) - known)
        if unknown:
            raise ValueError(f"unknown memory options {unknown}")
        unused = sorted(set(given) - record.options)
        if unused:
            raise ValueError(f"{', '.join(flag(n) for n in unused)} has no effect with --eval-memory {mode}")
        record.check_flags(given)
        if available is not None:
            missing = sorted(set(given) - available)
            if missing:
                raise ValueError(f"{', '.join(flag(n) for n in missing)} cannot be applied {context}".rstrip())
        return cls(mode=mode, **{**record.flag_defaults, **given})

    def __post_init__(self):
        if self.mode not in REGISTRY:
            raise ValueError(f"unknown eval memory '{self.mode}', choose one of {mode_names()}")
        for name in ("memory_temperature", "cache_theta", "knn_temperature", "interpolation_temperature"):
            if not getattr(self, name) > 0:  # also refuses NaN
                raise ValueError(f"{flag(name)} must be > 0, got {getattr(self, name)}")
        for name in ("cache_lambda", "knn_lambda", "interpolation_lambda"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= value <= 1.0:
                raise ValueError(f"{flag(name)} must lie in [0, 1], got {value}")
        if self.cache_size is not None and self.cache_size < 1:
            raise ValueError(f"--cache-size must be >= 1, got {self.cache_size}")
        if self.long_memory_size < 0:
            raise ValueError(f"--long-memory-size must be >= 0, got {self.long_memory_size}")
        if self.memory_reset not in RESETS:
            raise ValueError(f"unknown memory reset '{self.memory_reset}', choose one of {RESETS}")
        if self.knn_k < 1:
            raise ValueError(f"--knn-k must be >= 1, got {self.knn_k}")
        check_threshold(self.knn_skip_threshold)
        if self.knn_skip_threshold is not None and self.knn_skip_predictor is None:
            raise ValueError("--knn-skip-threshold needs --knn-skip-predictor")
        if ("knn_adaptive_network" in self.record.options) != (self.knn_adaptive_network is not None):
            raise ValueError(f"--eval-memory {self.mode} needs --knn-adaptive-network FILE" if self.knn_adaptive_network
                             is None else f"--knn-adaptive-network is for --eval-memory "
                             f"{' / '.join(modes_where(lambda m: 'knn_adaptive_network' in m.options))}, not {self.mode}")
        if self.sk_m is not None and self.sk_m < 1:
            raise ValueError(f"--sk-m must be >= 1, got {self.sk_m}")
        if self.sk_lambda_temperature is not None and not self.sk_lambda_temperature > 0:
            raise ValueError(f"--sk-lambda-temperature must be > 0, got {self.sk_lambda_temperature}")
        if not 0.0 < self.sk_max_lambda <= 1.0:
            raise ValueError(f"--sk-max-lambda must lie in (0, 1], got {self.sk_max_lambda}")
        if self.uses_sentence_pairs != (self.sk_pairs is not None):
            raise ValueError(f"--eval-memory {self.mode} needs --sk-pairs (a trime-retrieve-pairs file)"
                             if self.uses_sentence_pairs else f"--sk-pairs is not used by --eval-memory {self.mode}")
        if self.knn_nprobe is not None and self.knn_nprobe < 1:
            raise ValueError(f"--knn-nprobe must be >= 1, got {self.knn_nprobe}")
        if not self.uses_local and (self.long_memory_size > 0 or self.memory_reset != "never"):
            raise ValueError("a long-term memory / memory reset extends the local memory: it needs --eval-memory "
                             f"{_with_local_memory()}")
        if self.uses_cache and self.cache_size is not None and self.long_memory_size > 0:
            raise ValueError(
                "--cache-size limits the cache to the input row; with --long-memory-size the cache is the row "
                "plus N earlier stream tokens: give one of them"
            )
        if self.uses_datastore != (self.datastore is not None):
            raise ValueError(
                f"--eval-memory {self.mode} needs --datastore" if self.uses_datastore
                else f"--datastore is used by --eval-memory {' / '.join(modes_where(_reads_datastore))}, not {self.mode}"
            )

    @property
    def record(self):
        """The registered record of this mode (:mod:`trime_fairseq.memory.modes`)."""
        return mode_of(self.mode)

    @property
    def plain(self) -> bool:
        """Whether this mode's record composes nothing: the model's own distribution (``none``)."""
        return not self.record.joint and not self.record.steps

    @property
    def cache_weight(self) -> float:
        """λ_c of the continuous cache: the mode's default when not given (0.1 for ``cache``, 0 -- no
        cache -- for ``knn``); 0 for a mode without a cache."""
        if "cache_lambda" not in self.record.options:
            return 0.0
        return self.record.value(self, "cache_lambda") or 0.0

    @property
    def uses_cache(self) -> bool:
        return LOCAL_F in self.record.parts(self)

    @property
    def uses_local(self) -> bool:
        """Whether the local memory (the scored row, plus the stream) takes part."""
        return bool(self.record.parts(self) & LOCAL)

    @property
    def uses_datastore(self) -> bool:
        return DATASTORE in self.record.parts(self)

    @property
    def uses_sentence_pairs(self) -> bool:
        """Whether each sentence's retrieved training pairs (SK-MT) take part."""
        return SENTENCE_PAIRS in self.record.parts(self)

    @property
    def skips(self) -> bool:
        """Whether positions whose predicted benefit is below the threshold skip the datastore search."""
        return self.knn_skip_predictor is not None

    @property
    def uses_neighbours(self) -> bool:
        """Whether the precomputed neighbours carried in the batch (SPALM's ``--neighbours``) take part."""
        return NEIGHBOURS in self.record.parts(self)

    @property
    def uses_stream(self) -> bool:
        return self.long_memory_size > 0 or self.memory_reset != "never"

    @property
    def window(self) -> Optional[int]:
        """How many of the most recent row positions the local memory keeps (None: all)."""
        return self.cache_size if self.uses_cache else None


def _reads_datastore(mode) -> bool:
    return "datastore" in mode.options


def _with_local_memory() -> str:
    """The modes that can have a local memory part: those with one always, and those with an optional
    step of local terms, named with its weight (for the error of a long-term memory without one)."""
    names = []
    for name, mode in REGISTRY.items():
        steps = [(mode.joint, None)] + [(step.terms, step.weight if step.optional else None) for step in mode.steps]
        local = [weight for terms, weight in steps if any(t.part in LOCAL for t in terms)]
        if None in local:
            names.append(name)
        elif local:
            names.append(f"{name} with {' / '.join(sorted({flag(w) for w in local}))} > 0")
    return ", ".join(names)
