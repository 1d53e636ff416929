"""FAISS index helpers for the datastore: factory checks, GPU placement, nprobe.

The default index is kNN-LM's: ``IVF4096,PQ64`` (4096 inverted lists, 64-byte
product-quantised codes), trained on a sample of up to 1M keys.

Training-size rule (refused with a clear error otherwise, never silently changed):
an ``IVF<n>`` index needs at least 39·n training keys (FAISS's own minimum of 39
points per centroid) and ``PQ<m>x<b>`` at least 39·2^b (b = 8 by default: 9,984
keys); ``m`` must divide the key dimension. The error names the largest
``IVF<n>`` (a power of two) that the datastore can train.

GPU (``faiss-gpu`` only; ``faiss.StandardGpuResources`` does not exist in
faiss-cpu): the index is cloned to the GPU before training, so k-means and PQ
training, adding and searching all run there, with float16 lookup tables for PQ
(``GpuClonerOptions.useFloat16``; needed for codes of 56 bytes and more) and the
classic FAISS GPU kernels (``use_cuvs = False`` where that option exists). It is
copied back to the CPU only to be written to disk.
"""

import math
import re
from typing import Optional

import faiss
import numpy as np

MIN_POINTS_PER_CENTROID = 39  # FAISS warns below this many training points per centroid
METRICS = {"l2": faiss.METRIC_L2, "ip": faiss.METRIC_INNER_PRODUCT}


class IndexConfigError(ValueError):
    pass


def gpu_available() -> bool:
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def metric_of(name: str) -> int:
    if name not in METRICS:
        raise IndexConfigError(f"unknown metric '{name}', choose one of {sorted(METRICS)}")
    return METRICS[name]


def required_training_keys(factory: str, dim: int) -> int:
    """Minimum number of training keys for ``factory`` (0: no training needed)."""
    need = 0
    ivf = re.search(r"IVF(\d+)", factory)
    if ivf:
        need = max(need, MIN_POINTS_PER_CENTROID * int(ivf.group(1)))
    pq = re.search(r"(?<![A-Za-z])PQ(\d+)(?:x(\d+))?", factory)
    if pq:
        m, bits = int(pq.group(1)), int(pq.group(2) or 8)
        if dim % m:
            raise IndexConfigError(
                f"index factory '{factory}': PQ{m} needs a key dimension divisible by {m}, got {dim}")
        need = max(need, MIN_POINTS_PER_CENTROID * (1 << bits))
    return need


def check_factory(factory: str, dim: int, n_keys: int, n_train: int) -> None:
    """Refuse a factory the datastore cannot train, with the largest IVF size that would work."""
    need = required_training_keys(factory, dim)
    available = min(n_keys, n_train)
    if available >= need:
        return
    hint = ""
    if re.search(r"IVF(\d+)", factory):
        largest = 2 ** int(math.floor(math.log2(max(available // MIN_POINTS_PER_CENTROID, 1))))
        hint = f" (with {available} training keys at most IVF{largest}; or use 'Flat' for exact search)"
    raise IndexConfigError(
        f"index factory '{factory}' needs at least {need} training keys but the datastore has {n_keys} keys "
        f"and --ntrain allows {n_train}{hint}"
    )


def new_index(factory: str, dim: int, metric: str):
    try:
        return faiss.index_factory(dim, factory, metric_of(metric))
    except RuntimeError as e:
        raise IndexConfigError(f"FAISS cannot build index factory '{factory}' for d={dim}: {e}") from None


class GpuPlacement:
    """Holds the GPU resources of indexes cloned to one GPU."""

    def __init__(self, device: int = 0, temp_memory: Optional[int] = None):
        if not gpu_available():
            raise RuntimeError(
                "GPU FAISS requested but unavailable: install faiss-gpu (pip install 'trime_fairseq[gpu]', "
                "then uninstall faiss-cpu) and run on a machine with a CUDA GPU"
            )
        self.device = device
        self.resources = faiss.StandardGpuResources()
        if temp_memory is not None:
            self.resources.setTempMemory(temp_memory)

    def options(self):
        co = faiss.GpuClonerOptions()
        co.useFloat16 = True  # IVFPQ: float16 lookup tables; (IVF)Flat: fp16 storage (our keys are fp16)
        if hasattr(co, "use_cuvs"):
            co.use_cuvs = False
        return co

    def to_gpu(self, index):
        return faiss.index_cpu_to_gpu(self.resources, self.device, index, self.options())


def to_cpu(index):
    """A CPU copy of ``index`` (itself when already on the CPU)."""
    if hasattr(faiss, "index_gpu_to_cpu") and type(index).__name__.startswith("Gpu"):
        return faiss.index_gpu_to_cpu(index)
    return index


def set_nprobe(index, nprobe: Optional[int]) -> None:
    """Set the number of probed lists; an error for an index without inverted lists."""
    if nprobe is None:
        return
    if nprobe < 1:
        raise IndexConfigError(f"nprobe must be >= 1, got {nprobe}")
    is_gpu = type(index).__name__.startswith("Gpu")
    if not is_gpu and faiss.try_extract_index_ivf(index) is None:
        raise IndexConfigError(f"nprobe applies to IVF indexes; this index is {type(index).__name__}")
    space = faiss.GpuParameterSpace() if is_gpu else faiss.ParameterSpace()
    space.set_index_parameter(index, "nprobe", int(nprobe))


def as_float32(x) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(x, dtype=np.float32))
