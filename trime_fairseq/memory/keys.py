"""How the memory representations are read from a model.

Every decoder used with this plugin returns, in the ``extra`` dict of its
output, two tensors of shape (B, T, d):

* ``extra["trime_key"]``     -- g(c): the input of the last layer's feed-forward
  block (after its layer norm in pre-norm models). TRIME's memory key/query.
* ``extra["trime_feature"]`` -- f(c): the representation fed to the output
  layer (the continuous cache's key/query, Grave et al. 2017).

Our own models put them there themselves (``decoder.provides_trime_keys = True``).
Stock fairseq decoders (``transformer_lm*``, translation decoders) get them
through :func:`ensure_key_capture`, which adds forward hooks once per decoder.

SPALM's precomputed neighbours travel under two names, in the batch's
``net_input`` (all neighbours of the file) and in the ``extra`` of the SPALM model's
output (the k the model used): ``neighbour_tokens`` (B, T, K) long, the next token
stored with each retrieved datastore entry (padding where a position has fewer
than K neighbours), and ``neighbour_scores`` (B, T, K) float32, the datastore's raw
scores (q·k or −|q−k|²). :func:`get_neighbours` reads them as a memory batch.
"""

from typing import Optional

import torch
from torch import Tensor, nn

from trime_fairseq.memory.sources import MemoryBatch

TRIME_KEY = "trime_key"
TRIME_FEATURE = "trime_feature"
NEIGHBOUR_TOKENS = "neighbour_tokens"
NEIGHBOUR_SCORES = "neighbour_scores"


class KeyCapture:
    """Forward hooks that copy g and f of a stock fairseq decoder into ``extra``."""

    def __init__(self, decoder: nn.Module):
        layers = getattr(decoder, "layers", None)
        last = layers[-1] if layers is not None and len(layers) > 0 else None
        fc1 = getattr(last, "fc1", None) if last is not None else None
        if not isinstance(fc1, nn.Module):
            raise ValueError(
                f"{type(decoder).__name__} cannot expose TRIME keys: it has no "
                "`layers[-1].fc1` feed-forward block and does not set "
                "`provides_trime_keys`. Use a transformer decoder or a trime_fairseq model."
            )
        self._g: Optional[Tensor] = None
        self._f: Optional[Tensor] = None
        fc1.register_forward_pre_hook(self._save_g)
        projection = getattr(decoder, "output_projection", None)
        if isinstance(projection, nn.Module):
            projection.register_forward_pre_hook(self._save_f)
        decoder.register_forward_hook(self._add_to_extra)

    def _save_g(self, module, inputs):
        self._g = inputs[0]  # (T, B, d): fairseq layers are time-major

    def _save_f(self, module, inputs):
        self._f = inputs[0]  # (B, T, d)

    def _add_to_extra(self, decoder, inputs, output):
        if not isinstance(output, tuple) or len(output) < 2 or not isinstance(output[1], dict):
            return output
        x, extra = output[0], output[1]
        if self._g is not None:
            extra[TRIME_KEY] = self._g.transpose(0, 1)  # (B, T, d)
        # with adaptive softmax (or features_only) the decoder returns f itself
        extra[TRIME_FEATURE] = self._f if self._f is not None else x
        self._g = self._f = None
        return output


def ensure_key_capture(model: nn.Module) -> None:
    """Make ``model``'s decoder report g and f in ``extra`` (idempotent)."""
    decoder = getattr(model, "decoder", model)
    if getattr(decoder, "provides_trime_keys", False) or hasattr(decoder, "_trime_key_capture"):
        return
    decoder._trime_key_capture = KeyCapture(decoder)


def get_keys(net_output, name: str = TRIME_KEY) -> Tensor:
    """g (or f with ``name=TRIME_FEATURE``) of a decoder output: (B, T, d)."""
    extra = net_output[1] if len(net_output) > 1 else None
    if not isinstance(extra, dict) or extra.get(name) is None:
        raise ValueError(
            f"the decoder output carries no '{name}': call "
            "trime_fairseq.memory.keys.ensure_key_capture(model) before the forward pass"
        )
    return extra[name]


def get_neighbours(net_output, pad: int) -> MemoryBatch:
    """The precomputed neighbours a SPALM model used, as raw-score memory entries:
    scores (B, T, K) float32 (the datastore's), values (B, T, K), mask (B, T, K) bool."""
    extra = net_output[1] if len(net_output) > 1 else None
    if not isinstance(extra, dict) or extra.get(NEIGHBOUR_TOKENS) is None:
        raise ValueError(
            "the model output carries no precomputed neighbours: memory over neighbours needs a SPALM model "
            "fed with --neighbours"
        )
    values, scores = extra[NEIGHBOUR_TOKENS], extra[NEIGHBOUR_SCORES]
    mask = values.ne(pad)
    return MemoryBatch(scores.float().masked_fill(~mask, float("-inf")), torch.where(mask, values, 0), mask)
