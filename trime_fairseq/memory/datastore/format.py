"""The datastore folder's format: file names, what a datastore holds (:class:`DatastoreSpec`), its errors.

A datastore folder holds::

    keys.f16        (N, d) float16 raw memmap -- g (``trime_key``) or f (``trime_feature``);
                    keys.f32 (float32) with ``key_dtype="float32"``
    values.i32      (N,)   int32 next-token ids (int16 would overflow a 267k vocabulary)
    index.faiss     FAISS index over the keys (ids 0..N-1 = rows of the memmaps)
    datastore.json  metadata, written last: its presence marks a complete datastore

and, while it is built, ``progress.json``, ``index.trained.faiss``, ``index.partial.faiss``;
a part of a sharded build ends with ``part.json``.
"""

from dataclasses import dataclass, field

import numpy as np
import torch

from trime_fairseq.memory import faiss_index as fi

FORMAT, VERSION = "trime-datastore", 1
VALUES, INDEX, META, PROGRESS = "values.i32", "index.faiss", "datastore.json", "progress.json"
PART = "part.json"  # written last in the folder of one part of a sharded build
TRAINED, PARTIAL = "index.trained.faiss", "index.partial.faiss"
VALUE_DTYPE = np.int32
#: key storage: dtype name -> (file name, numpy dtype)
KEY_DTYPES = {"float16": ("keys.f16", np.float16), "float32": ("keys.f32", np.float32)}
KEY_FILES = tuple(name for name, _ in KEY_DTYPES.values())
KEY_TYPES = ("trime_key", "trime_feature")


class DatastoreError(ValueError):
    pass


@dataclass(frozen=True)
class DatastoreSpec:
    """What a datastore holds and where its keys come from (part of its metadata)."""

    dim: int
    key_type: str  # trime_key (g) | trime_feature (f)
    metric: str  # ip | l2
    dictionary_size: int
    dictionary_sha256: str
    model_path: str
    model_sha256: str
    source: dict = field(default_factory=dict)  # split, context window, tokens per sample, ...
    key_dtype: str = "float16"  # storage of the keys (KEY_DTYPES)

    def __post_init__(self):
        if self.dim < 1:
            raise DatastoreError(f"key dimension must be >= 1, got {self.dim}")
        if self.key_dtype not in KEY_DTYPES:
            raise DatastoreError(f"unknown key dtype '{self.key_dtype}', choose one of {sorted(KEY_DTYPES)}")
        if self.key_type not in KEY_TYPES:
            raise DatastoreError(f"unknown key type '{self.key_type}', choose one of {KEY_TYPES}")
        fi.metric_of(self.metric)


def settings_differences(a: dict, b: dict, prefix: str = "") -> str:
    out = []
    for key in sorted(set(a or {}) | set(b or {})):
        x, y = (a or {}).get(key), (b or {}).get(key)
        if isinstance(x, dict) and isinstance(y, dict):
            inner = settings_differences(x, y, f"{prefix}{key}.")
            if inner:
                out.append(inner)
        elif x != y:
            out.append(f"{prefix}{key}: {x!r} vs {y!r}")
    return "; ".join(out)


def as_numpy(x) -> np.ndarray:
    """A tensor (any device, bfloat16 as float32) or array-like as a numpy array."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        if x.dtype == torch.bfloat16:
            x = x.float()
        return x.numpy()
    return np.asarray(x)
