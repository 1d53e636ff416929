"""Evaluation-memory options of the tasks, as fairseq dataclass fields (command-line flags).

A flag left at None (or False) was not given: :func:`memory_options` passes only the
given ones to :meth:`~trime_fairseq.memory.options.MemoryOptions.from_flags`, which
takes the defaults for the rest and refuses flags the mode does not use. The
meaning of every field is in :mod:`trime_fairseq.memory.options`.

* :class:`RetrievalMemoryConfig` -- the external memory (a datastore searched by the
  scored position's key) and Eq. 6's τ: every task (language modelling, translation);
* :class:`LocalMemoryConfig` -- the scored sequence's own earlier positions and the
  stream (continuous cache, long-term memory): language modelling only.
"""

from dataclasses import dataclass, field, fields
from typing import Optional

from fairseq.dataclass import FairseqDataclass

from trime_fairseq.memory.options import MemoryOptions


@dataclass
class RetrievalMemoryConfig(FairseqDataclass):
    memory_temperature: Optional[float] = field(
        default=None, metadata={"help": "τ of Eq. 6 dividing memory similarities g·g_j/√d (trime, trime_ext; "
                                "default 1.0)"}
    )
    datastore: Optional[str] = field(
        default=None,
        metadata={"help": "knn / trime_ext: external memory folder written by trime-build-datastore"},
    )
    knn_k: Optional[int] = field(
        default=None, metadata={"help": "knn / trime_ext: K entries retrieved per scored token (default 1024)"}
    )
    knn_temperature: Optional[float] = field(
        default=None, metadata={"help": "knn, neighbour_knn: T, p_kNN ∝ exp(score / T) (default 1.0)"},
    )
    knn_lambda: Optional[float] = field(
        default=None, metadata={"help": "knn, neighbour_knn: λ, (1-λ) p_model + λ p_kNN (default 0.25)"}
    )
    interpolation_temperature: Optional[float] = field(
        default=None, metadata={"help": "trime_ext: τ' of Eq. 7, P' ∝ Σ exp(g·g_j / (√d τ')) (default 1.0)"},
    )
    interpolation_lambda: Optional[float] = field(
        default=None, metadata={"help": "trime_ext: λ of Eq. 8, (1-λ) P + λ P' (default 0.25)"}
    )
    knn_nprobe: Optional[int] = field(
        default=None, metadata={"help": "knn / trime_ext: inverted lists probed (default: the datastore's)"}
    )
    knn_rescore: bool = field(
        default=False,
        metadata={"help": "knn / trime_ext: re-rank the index's hits with the exact stored keys (PQ codes are "
        "approximate)"},
    )
    knn_gpu: bool = field(
        default=False, metadata={"help": "knn / trime_ext: search the FAISS index on the GPU (faiss-gpu)"}
    )
    knn_skip_predictor: Optional[str] = field(
        default=None, metadata={"help": "knn: adaptive retrieval (He et al. 2021): a trime-train-skip-predictor file; "
                                "positions it predicts retrieval will not help skip the datastore search and keep "
                                "the model's own distribution"},
    )
    knn_skip_threshold: Optional[float] = field(
        default=None, metadata={"help": "knn with --knn-skip-predictor: search iff P(retrieval helps) >= this "
                                "(default: the threshold the predictor file chose on valid)"},
    )
    knn_adaptive_network: Optional[str] = field(
        default=None, metadata={"help": "adaptive_knn (required): the Meta-k network file of adaptive kNN-MT (Zheng et "
                                "al. 2021) written by trime-train-adaptive-knn; it fixes --knn-k and --knn-temperature"},
    )
    sk_pairs: Optional[str] = field(
        default=None, metadata={"help": "sk_mt: the trime-retrieve-pairs file of the evaluated split (each "
                                "sentence's BM25-retrieved training pairs, by source); sk_mt's defaults are --knn-k 2 and "
                                "--knn-temperature 100 (the paper's)"},
    )
    sk_m: Optional[int] = field(
        default=None, metadata={"help": "sk_mt: the first m retrieved pairs of each sentence form its memory "
                                "(default: all of the file's)"},
    )
    sk_lambda_temperature: Optional[float] = field(
        default=None, metadata={"help": "sk_mt: τ of λ = ReLU(1 - d_0/τ), d_0 the nearest entry's squared L2 "
                                "distance (default: --knn-temperature, as the paper)"},
    )
    sk_max_lambda: Optional[float] = field(
        default=None, metadata={"help": "sk_mt: λ is capped here (default 0.99; 1: the formula uncapped, where λ = 1 "
                                "leaves beam search hypotheses that cannot end)"},
    )


@dataclass
class LocalMemoryConfig(FairseqDataclass):
    cache_lambda: Optional[float] = field(
        default=None,
        metadata={"help": "λ: weight of the cache distribution (cache: default 0.1; knn: default 0, no cache)"},
    )
    cache_theta: Optional[float] = field(
        default=None, metadata={"help": "θ: flatness of the cache distribution (cache; default 0.3)"}
    )
    cache_size: Optional[int] = field(
        default=None, metadata={"help": "number of previous tokens in the cache (cache; default: whole input row)"}
    )
    long_memory_size: Optional[int] = field(
        default=None,
        metadata={"help": "trime / cache: also keep the N stream tokens before each input row in memory, "
        "across batches (TRIMELM_long evaluation; default 0: the input row only)"},
    )
    memory_reset: Optional[str] = field(
        default=None,
        metadata={"help": "trime / cache: 'document' limits the memory to the position's own document "
        "(WikiText headings), 'never' (default) does not"},
    )


RETRIEVAL_FLAGS = frozenset(f.name for f in fields(RetrievalMemoryConfig) if not f.name.startswith("_"))
LOCAL_FLAGS = frozenset(f.name for f in fields(LocalMemoryConfig) if not f.name.startswith("_"))


def memory_options(cfg, flags=RETRIEVAL_FLAGS | LOCAL_FLAGS) -> MemoryOptions:
    """MemoryOptions from a task config's ``eval_memory`` and the memory ``flags`` it has."""
    mode = str(getattr(cfg, "eval_memory", "none"))
    given = {name: getattr(cfg, name) for name in sorted(flags)
             if getattr(cfg, name, None) is not None and getattr(cfg, name, None) is not False}
    return MemoryOptions.from_flags(mode, given)
