"""The evaluation-memory options: one field per quantity, validated in one place.

``--eval-memory MODE`` picks how the token distribution is combined with memory
(see :mod:`trime_fairseq.memory.compose` for what each mode computes). Every
other option is a field of :class:`MemoryOptions` with exactly one meaning:

| field | symbol | used by |
|---|---|---|
| ``memory_temperature`` | τ of Eq. 6: sim = g·g_j / (√d·τ) | trime, trime_ext |
| ``cache_lambda``, ``cache_theta`` | λ_c, θ of the continuous cache: p_cache ∝ Σ exp(θ·f·f_j) | cache, knn (+ cache) |
| ``cache_size`` | the cache keeps the last N positions of the row | cache, knn (+ cache) |
| ``long_memory_size`` | N earlier stream entries in memory (TRIMELM_long) | trime, cache, trime_ext, knn + cache |
| ``memory_reset`` | "document": memory from the position's own document only | as long_memory_size |
| ``datastore``, ``knn_k``, ``knn_nprobe``, ``knn_rescore``, ``knn_gpu`` | the external memory and its search (K hits) | knn, trime_ext |
| ``knn_temperature``, ``knn_lambda`` | T, λ of kNN-LM: p_kNN ∝ Σ exp(score/T) | knn, neighbour_knn |
| ``interpolation_temperature``, ``interpolation_lambda`` | τ′, λ of Eq. 7-8 | trime_ext |

:meth:`MemoryOptions.from_flags` is how a task builds the options from its
command line: a flag the mode does not use is an error (never silently ignored),
a flag not given takes its default. ``__post_init__`` checks every value.
"""

from dataclasses import dataclass, fields
from typing import Dict, FrozenSet, Mapping, Optional

MODES = ("none", "trime", "cache", "knn", "trime_ext", "neighbour_knn")
RESETS = ("never", "document")

_LONG = frozenset({"long_memory_size", "memory_reset"})
_CACHE = frozenset({"cache_lambda", "cache_theta", "cache_size"})
_SEARCH = frozenset({"datastore", "knn_k", "knn_nprobe", "knn_rescore", "knn_gpu"})

#: the options each mode reads (the mode itself excluded)
OPTIONS_OF_MODE: Dict[str, FrozenSet[str]] = {
    "none": frozenset(),
    "trime": frozenset({"memory_temperature"}) | _LONG,
    "cache": _CACHE | _LONG,
    "knn": _SEARCH | {"knn_temperature", "knn_lambda"} | _CACHE | _LONG,
    "trime_ext": _SEARCH | {"memory_temperature", "interpolation_temperature", "interpolation_lambda"} | _LONG,
    "neighbour_knn": frozenset({"knn_temperature", "knn_lambda"}),  # the batch's neighbours (--neighbours)
}


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


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

    @classmethod
    def from_flags(cls, mode: str, given: Mapping[str, object], available: Optional[FrozenSet[str]] = None,
                   context: str = "") -> "MemoryOptions":
        """Options of ``mode`` from the flags a user gave (``given``: name -> value, only the
        flags actually set). A flag the mode does not read -- or, with ``available``, one
        that this call path cannot apply -- is an error."""
        if mode not in MODES:
            raise ValueError(f"unknown --eval-memory '{mode}', choose one of {MODES}")
        known = {f.name for f in fields(cls)} - {"mode"}
        unknown = sorted(set(given) - known)
        if unknown:
            raise ValueError(f"unknown memory options {unknown}")
        unused = sorted(set(given) - OPTIONS_OF_MODE[mode])
        if unused:
            raise ValueError(f"{', '.join(flag(n) for n in unused)} has no effect with --eval-memory {mode}")
        if mode == "knn" and not given.get("cache_lambda") and given.keys() & {"cache_theta", "cache_size"}:
            raise ValueError("--cache-theta / --cache-size need --cache-lambda > 0 with --eval-memory knn "
                             "(kNN-LM + cache); without it there is no cache")
        if available is not None:
            missing = sorted(set(given) - available)
            if missing:
                raise ValueError(f"{', '.join(flag(n) for n in missing)} cannot be applied {context}".rstrip())
        return cls(mode=mode, **given)

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"unknown eval memory '{self.mode}', choose one of {MODES}")
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
        if self.knn_nprobe is not None and self.knn_nprobe < 1:
            raise ValueError(f"--knn-nprobe must be >= 1, got {self.knn_nprobe}")
        if not self.uses_local and (self.long_memory_size > 0 or self.memory_reset != "never"):
            raise ValueError(
                "a long-term memory / memory reset extends the local memory: it needs --eval-memory trime, cache, "
                "trime_ext or knn with a cache (--cache-lambda)"
            )
        if self.uses_cache and self.cache_size is not None and self.long_memory_size > 0:
            raise ValueError(
                "--cache-size limits the cache to the input row; with --long-memory-size the cache is the row "
                "plus N earlier stream tokens: give one of them"
            )
        if self.uses_datastore != (self.datastore is not None):
            raise ValueError(
                f"--eval-memory {self.mode} needs --datastore" if self.uses_datastore
                else f"--datastore is used by --eval-memory knn / trime_ext, not {self.mode}"
            )

    @property
    def cache_weight(self) -> float:
        """λ_c of the continuous cache: 0.1 by default for ``cache``, 0 (no cache) for ``knn``."""
        if self.mode == "cache":
            return 0.1 if self.cache_lambda is None else self.cache_lambda
        if self.mode == "knn":
            return 0.0 if self.cache_lambda is None else self.cache_lambda
        return 0.0

    @property
    def uses_cache(self) -> bool:
        return self.cache_weight > 0

    @property
    def uses_local(self) -> bool:
        """Whether the local memory (the scored row, plus the stream) takes part."""
        return self.mode in ("trime", "trime_ext") or self.uses_cache

    @property
    def uses_datastore(self) -> bool:
        return self.mode in ("knn", "trime_ext")

    @property
    def uses_neighbours(self) -> bool:
        """Whether the precomputed neighbours carried in the batch (SPALM's ``--neighbours``) take part."""
        return self.mode == "neighbour_knn"

    @property
    def uses_stream(self) -> bool:
        return self.long_memory_size > 0 or self.memory_reset != "never"

    @property
    def window(self) -> Optional[int]:
        """How many of the most recent row positions the local memory keeps (None: all)."""
        return self.cache_size if self.uses_cache else None
