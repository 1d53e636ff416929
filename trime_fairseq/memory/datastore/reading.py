"""Reading and verifying a datastore folder: its metadata, its files' sizes, its index, and what its
keys were built with (dimension, key type, metric, dictionary, model)."""

import json
import os
from pathlib import Path
from typing import Union

import faiss
import numpy as np
import torch

from trime_fairseq.checksums import checkpoint_model_checksum, dictionary_checksum, is_checksum, model_checksum
from trime_fairseq.memory import faiss_index as fi
from trime_fairseq.memory.datastore.format import (
    FORMAT,
    INDEX,
    KEY_DTYPES,
    META,
    PROGRESS,
    VALUE_DTYPE,
    VALUES,
    VERSION,
    DatastoreError,
)

ModelRef = Union[str, dict, torch.nn.Module]


def read_metadata(path) -> dict:
    """The ``datastore.json`` of a complete datastore (clear errors for missing folders and interrupted builds)."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"datastore folder not found: {path}")
    meta_path = path / META
    if not meta_path.exists():
        if (path / PROGRESS).exists():
            state = json.loads((path / PROGRESS).read_text())
            raise DatastoreError(
                f"{path} is an incomplete datastore (build interrupted at stage '{state.get('stage')}', "
                f"{state.get('rows')} keys written); rerun trime-build-datastore with the same arguments to resume"
            )
        raise DatastoreError(f"{path} is not a datastore (no {META})")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as e:
        raise DatastoreError(f"{meta_path} is unreadable: {e}") from None
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise DatastoreError(f"{path}: unsupported datastore format {meta.get('format')} v{meta.get('version')}")
    return meta


def read_index(path: Path):
    if not path.exists():
        raise DatastoreError(f"missing FAISS index {path}")
    try:
        return faiss.read_index(str(path))
    except RuntimeError as e:
        detail = str(e).strip()[:200]
        raise DatastoreError(f"cannot read FAISS index {path} (truncated or corrupt?): {detail}") from None


def open_entries(path: Path, meta: dict, check_values: bool = True):
    """The keys (N, d) and values (N,) memmaps and the FAISS index of the datastore at ``path`` whose
    metadata is ``meta``, refusing files of the wrong size, ids outside the dictionary and an index
    that does not match them."""
    n, d = int(meta["size"]), int(meta["dim"])
    key_dtype = meta.get("key_dtype", "float16")
    if key_dtype not in KEY_DTYPES:
        raise DatastoreError(f"{path}: unknown key dtype '{key_dtype}'")
    key_file, key_np = KEY_DTYPES[key_dtype]
    for name, size in ((key_file, n * d * np.dtype(key_np).itemsize), (VALUES, n * 4)):
        if not (path / name).exists():
            raise DatastoreError(f"{path}: missing {name}")
        actual = os.path.getsize(path / name)
        if actual != size:
            raise DatastoreError(f"{path / name} has {actual} bytes, expected {size} for {n} entries "
                                 f"(truncated or from another build)")
    keys = np.memmap(path / key_file, dtype=key_np, mode="r", shape=(n, d))
    values = np.memmap(path / VALUES, dtype=VALUE_DTYPE, mode="r", shape=(n,))
    if check_values and n and (values.min() < 0 or values.max() >= meta["dictionary_size"]):
        raise DatastoreError(f"{path / VALUES} holds ids outside [0, {meta['dictionary_size']}) (corrupt)")
    index = read_index(path / INDEX)
    if index.ntotal != n or index.d != d:
        raise DatastoreError(f"{path / INDEX} holds {index.ntotal} keys of dimension {index.d}, "
                             f"expected {n} of dimension {d}")
    if index.metric_type != fi.metric_of(meta["metric"]):
        raise DatastoreError(f"{path / INDEX} uses another metric than the metadata's '{meta['metric']}'")
    return keys, values, index


def check_expectations(meta, path, dim, dictionary, model, key_type, metric) -> None:
    if dim is not None and int(dim) != int(meta["dim"]):
        raise DatastoreError(f"{path}: keys have dimension {meta['dim']} but the model's queries have {dim}")
    if key_type is not None and key_type != meta["key_type"]:
        raise DatastoreError(f"{path}: keys are '{meta['key_type']}' but '{key_type}' queries were asked for")
    if metric is not None and metric != meta["metric"]:
        raise DatastoreError(f"{path}: index metric is '{meta['metric']}', not '{metric}'")
    if dictionary is not None:
        size, sha = dictionary_fingerprint(dictionary)
        if sha != meta["dictionary_sha256"] or (size is not None and size != meta["dictionary_size"]):
            raise DatastoreError(
                f"{path}: built with another dictionary ({meta['dictionary_size']} symbols, sha256 "
                f"{meta['dictionary_sha256'][:12]}…) than the one given"
                + (f" ({size} symbols, sha256 {sha[:12]}…)" if size is not None else f" (sha256 {sha[:12]}…)")
                + ": its token ids would be wrong"
            )
    if model is not None:
        sha = model_fingerprint(model)
        if sha != meta["model_sha256"]:
            raise DatastoreError(
                f"{path}: keys come from another model ({meta['model_path']}, state sha256 "
                f"{meta['model_sha256'][:12]}…) than the one given (sha256 {sha[:12]}…); rebuild the datastore "
                "with this checkpoint"
            )


def dictionary_fingerprint(dictionary):
    if isinstance(dictionary, (str, os.PathLike)) and is_checksum(str(dictionary)):
        return None, str(dictionary)
    if isinstance(dictionary, (str, os.PathLike)):
        from fairseq.data import Dictionary

        dictionary = Dictionary.load(str(dictionary))
    return len(dictionary), dictionary_checksum(dictionary)


def model_fingerprint(model) -> str:
    if isinstance(model, (str, os.PathLike)):
        return str(model) if is_checksum(str(model)) else checkpoint_model_checksum(str(model))
    if isinstance(model, torch.nn.Module):
        return model_checksum(model.state_dict())
    if isinstance(model, dict):
        return model_checksum(model)
    raise TypeError(f"expect_model must be a checkpoint path, a sha256, a state dict or a model, got {type(model)}")
