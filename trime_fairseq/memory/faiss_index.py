"""FAISS index helpers for the datastore: factory checks, GPU placement, nprobe.

The default index is kNN-LM's: ``IVF4096,PQ64`` (4096 inverted lists, 64-byte
product-quantised codes), trained on a sample of up to 1M keys.

Training-size rule (refused with a clear error otherwise, never silently changed):
an ``IVF<n>`` index needs at least 39·n training keys (FAISS's own minimum of 39
points per centroid) and ``PQ<m>x<b>`` at least 39·2^b (b = 8 by default: 9,984
keys); ``m`` must divide the key dimension. The error names the largest
``IVF<n>`` (a power of two) that the datastore can train.

Key compression (issue 19): a factory may start with key transforms that FAISS applies inside
the index to the stored keys and to every query alike (``IndexPreTransform``), so a datastore
built with one is searched with the model's own queries of dimension d: ``OPQ<m>[_<d'>]``
(a rotation, or an orthonormal projection to d', trained for the PQ that follows: inner
products and distances are kept), ``PCA[R]<d'>`` (projection on the d' main directions of the
*centred* keys: L2 distances are kept up to the dropped directions, inner products are not --
the centring adds a key-dependent term -- so it is refused with metric ``ip``), ``RR<d'>``
(random rotation). Whitening (``PCAW``) rescales directions and is refused. The codes that
follow (``PQ<m>``, ``SQfp16``, ...) are sized in the transformed dimension
(:func:`key_transforms`). ``trime-build-datastore --pca D`` is ``PCA<D>,`` before the factory.

GPU (``faiss-gpu`` only; ``faiss.StandardGpuResources`` does not exist in
faiss-cpu): the index is cloned to the GPU before training, so k-means and PQ
training, adding and searching all run there, with float16 lookup tables for PQ
(``GpuClonerOptions.useFloat16``; needed for codes of 56 bytes and more) and the
classic FAISS GPU kernels (``use_cuvs = False`` where that option exists). It is
copied back to the CPU only to be written to disk.
"""

import math
import re
from typing import Optional, Tuple

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


#: a key transform at the head of a factory: PCA[W][R]<d'>, OPQ<m>[_<d'>], RR<d'>
_TRANSFORM = re.compile(r"^(?:PCA(?P<white>W?)R?(?P<pca>\d+)|OPQ(?P<opq_m>\d+)(?:_(?P<opq>\d+))?|RR(?P<rr>\d+))$")


def key_transforms(factory: str, dim: int, metric: Optional[str] = None) -> Tuple[Tuple[str, ...], int]:
    """(the leading key transforms of ``factory``, the dimension its index searches in); refuses whitening,
    and PCA with ``metric`` ip (see the module docstring)."""
    names, out = [], dim
    for part in factory.split(","):
        match = _TRANSFORM.match(part.strip())
        if match is None:
            break
        if match.group("white"):
            raise IndexConfigError(f"index factory '{factory}': {part} whitens the keys (rescales their directions), "
                                   "which changes every score; use PCA<d> or OPQ<m>_<d>")
        if match.group("pca") is not None:
            if metric == "ip":
                raise IndexConfigError(
                    f"index factory '{factory}': {part} centres the keys, so the index would rank by "
                    "(q - μ)·(k - μ), not q·k; with metric ip compress with OPQ<m>_<d> (no centring), or use "
                    "metric l2")
            new = int(match.group("pca"))
        elif match.group("opq_m") is not None:
            new = int(match.group("opq") or out)
            if new % int(match.group("opq_m")):
                raise IndexConfigError(f"index factory '{factory}': {part} needs an output dimension divisible by "
                                       f"{match.group('opq_m')}")
        else:
            new = int(match.group("rr"))
        if not 1 <= new <= out:
            raise IndexConfigError(f"index factory '{factory}': {part} maps dimension {out} to {new}; a key "
                                   f"transform can only keep or reduce it (1 .. {out})")
        names.append(part.strip())
        out = new
    return tuple(names), out


def required_training_keys(factory: str, dim: int) -> int:
    """Minimum number of training keys for ``factory`` (0: no training needed); ``dim``: the key dimension
    (a PQ is sized in the dimension after the factory's key transforms)."""
    transforms, dim = key_transforms(factory, dim)
    need = 0
    for name in transforms:  # OPQ trains a product quantiser of 256 centroids; PCA needs a full-rank sample
        need = max(need, MIN_POINTS_PER_CENTROID * 256 if name.startswith("OPQ") else dim + 1)
    ivf = re.search(r"IVF(\d+)", factory)
    if ivf:
        need = max(need, MIN_POINTS_PER_CENTROID * int(ivf.group(1)))
    pq = re.search(r"(?<![A-Za-z])PQ(\d+)(?:x(\d+))?", factory)
    if pq:
        m, bits = int(pq.group(1)), int(pq.group(2) or 8)
        if dim % m:
            raise IndexConfigError(
                f"index factory '{factory}': PQ{m} needs a key dimension divisible by {m} (after the key "
                f"transforms), got {dim}")
        need = max(need, MIN_POINTS_PER_CENTROID * (1 << bits))
    return need


def check_factory(factory: str, dim: int, n_keys: int, n_train: int, metric: Optional[str] = None) -> None:
    """Refuse a factory the datastore cannot train, with the largest IVF size that would work, and a key
    transform that does not keep ``metric``'s scores."""
    key_transforms(factory, dim, metric)
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
    if isinstance(index, faiss.IndexPreTransform):  # the probed index is behind the key transforms (maybe on a GPU)
        return set_nprobe(faiss.downcast_index(index.index), nprobe)
    is_gpu = type(index).__name__.startswith("Gpu")
    if not is_gpu and faiss.try_extract_index_ivf(index) is None:
        raise IndexConfigError(f"nprobe applies to IVF indexes; this index is {type(index).__name__}")
    space = faiss.GpuParameterSpace() if is_gpu else faiss.ParameterSpace()
    space.set_index_parameter(index, "nprobe", int(nprobe))


def linear_transforms(index):
    """The key transforms of ``index`` as (A (d_out, d_in), b (d_out,) or None) float32 arrays, y = A·x + b, and
    the index that searches the transformed keys: ([], index) for an index without transforms. Lets a GPU search
    apply the transforms in torch, on the queries' device. An error for a transform that is not linear."""
    if not isinstance(index, faiss.IndexPreTransform):
        return [], index
    out = []
    for i in range(index.chain.size()):
        vt = faiss.downcast_VectorTransform(index.chain.at(i))
        if not isinstance(vt, faiss.LinearTransform):
            raise IndexConfigError(f"key transform {type(vt).__name__} is not linear: it cannot be applied in torch")
        a = faiss.vector_to_array(vt.A).reshape(vt.d_out, vt.d_in)
        b = faiss.vector_to_array(vt.b) if vt.have_bias else None
        out.append((a.astype(np.float32), None if b is None or not b.size else b.astype(np.float32)))
    return out, faiss.downcast_index(index.index)


def as_float32(x) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(x, dtype=np.float32))
