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


def loaded_model_checksum(model) -> str:
    """The fingerprint of a model's weights that datastores record and check: :func:`model_checksum`
    of ``model.state_dict()`` *after* fairseq loaded a checkpoint into it (so after fairseq's
    ``upgrade_state_dict`` renamed or added entries) and *before* any dtype conversion
    (``--fp16`` halves the model later). The datastore builder and the evaluation both call
    this, at that moment, so an old checkpoint that needs upgrading hashes the same in both."""
    return model_checksum(model.state_dict())


def checkpoint_model_checksum(path: str) -> str:
    """:func:`loaded_model_checksum` of the model a fairseq checkpoint file builds (loaded the way
    fairseq loads it, upgrades included)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    from fairseq import checkpoint_utils

    models, _ = checkpoint_utils.load_model_ensemble([str(path)])
    return loaded_model_checksum(models[0])


def is_checksum(text: str) -> bool:
    return isinstance(text, str) and bool(_HEX64.match(text))
