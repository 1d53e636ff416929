"""Fingerprints that tie stored artefacts (datastores, BM25 orders) to a dictionary and a model."""

import hashlib
import os
import re
from typing import Mapping

_HEX64 = re.compile(r"^[0-9a-f]{64}$")


def dictionary_checksum(dictionary) -> str:
    """sha256 of a fairseq Dictionary's symbols in id order (what stored token ids refer to)."""
    h = hashlib.sha256()
    for symbol in dictionary.symbols:
        h.update(symbol.encode("utf-8"))
        h.update(b"\n")
    return h.hexdigest()


def model_checksum(state_dict: Mapping) -> str:
    """sha256 over a state dict: every entry's name, dtype, shape and raw bytes, in name order.

    Equal for a checkpoint's ``state["model"]`` and the ``state_dict()`` of the model
    loaded from it (same dtype: a model converted with ``.half()`` hashes differently).
    """
    import torch

    h = hashlib.sha256()
    for name in sorted(state_dict):
        value = state_dict[name]
        h.update(name.encode("utf-8"))
        if isinstance(value, torch.Tensor):
            t = value.detach().cpu().contiguous()
            h.update(f"{t.dtype}{tuple(t.shape)}".encode())
            if t.numel():
                h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        else:
            h.update(repr(value).encode("utf-8"))
    return h.hexdigest()


def checkpoint_model_checksum(path: str) -> str:
    """:func:`model_checksum` of the ``model`` state of a fairseq checkpoint file."""
    import torch

    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    state = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(state, dict) or "model" not in state:
        raise ValueError(f"{path} is not a fairseq checkpoint (no 'model' entry)")
    return model_checksum(state["model"])


def is_checksum(text: str) -> bool:
    return isinstance(text, str) and bool(_HEX64.match(text))
