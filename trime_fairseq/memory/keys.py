"""How the memory representations are read from a model.

Every decoder used with this plugin returns, in the ``extra`` dict of its
output, two tensors of shape (B, T, d):

* ``extra["trime_key"]``     -- g(c): the input of the last layer's feed-forward
  block (after its layer norm in pre-norm models). TRIME's memory key/query.
* ``extra["trime_feature"]`` -- f(c): the representation fed to the output
  layer (the continuous cache's key/query, Grave et al. 2017).

Our own models put them there themselves (``decoder.provides_trime_keys = True``).
Stock fairseq decoders get them through :func:`ensure_key_capture`, which adds
hooks once per decoder:

* f from any decoder: the input of its ``output_layer`` (or, with
  ``features_only``, the features it returns);
* g from transformer decoders only (a pre-hook on ``layers[-1].fc1``). Under
  fairseq's ``--checkpoint-activations`` the layers run without gradients in
  the forward pass and are recomputed in the backward pass, so a hook would see
  a g without gradients and TRIME would silently train through f only: the
  last layer is therefore run without activation checkpointing (one layer's
  activations kept) so that g carries its gradients.

A decoder without a feed-forward block (e.g. ``lstm_lm``) has no g: it serves
every memory on f (plain evaluation, the continuous cache) and is refused, with
a clear error, by what needs g (:func:`require_keys`).

SPALM's precomputed neighbours travel under two names, in the batch's
``net_input`` (all neighbours of the file) and in the ``extra`` of the SPALM model's
output (the k the model used): ``neighbour_tokens`` (B, T, K) long, the next token
stored with each retrieved datastore entry (padding where a position has fewer
than K neighbours), and ``neighbour_scores`` (B, T, K) float32, the datastore's raw
scores (q·k or −|q−k|²). :func:`get_neighbours` reads them as a memory batch.
"""

import logging
from typing import Iterable, Optional

import torch
from torch import Tensor, nn

from trime_fairseq.memory.sources import MemoryBatch

logger = logging.getLogger(__name__)

TRIME_KEY = "trime_key"
TRIME_FEATURE = "trime_feature"
NEIGHBOUR_TOKENS = "neighbour_tokens"
NEIGHBOUR_SCORES = "neighbour_scores"


class KeyCapture:
    """Hooks that copy g and f of a stock fairseq decoder into its output's ``extra`` dict."""

    def __init__(self, decoder: nn.Module):
        layers = getattr(decoder, "layers", None)
        last = layers[-1] if layers is not None and len(layers) > 0 else None
        fc1 = getattr(last, "fc1", None) if last is not None else None
        self.has_g = isinstance(fc1, nn.Module)
        self._g: Optional[Tensor] = None
        self._f: Optional[Tensor] = None
        if self.has_g:
            if hasattr(last, "precheckpoint_forward"):  # fairseq's checkpoint_wrapper
                last.forward = last.precheckpoint_forward
                del last.precheckpoint_forward
                logger.info("the last decoder layer runs without activation checkpointing so that the memory "
                            "key g (input of its feed-forward block) carries gradients")
            fc1.register_forward_pre_hook(self._save_g)
        output_layer = getattr(decoder, "output_layer", None)
        if callable(output_layer):
            def capture_output_layer(features, *args, **kwargs):
                self._f = features  # (B, T, d)
                return output_layer(features, *args, **kwargs)

            decoder.output_layer = capture_output_layer
        # wrap forward itself, not a forward hook: fairseq's SequenceGenerator calls decoder.forward(...)
        # directly (EnsembleModel.forward_decoder), which bypasses nn.Module hooks
        forward = decoder.forward

        def forward_with_keys(*args, **kwargs):
            return self._add_to_extra(decoder, args, forward(*args, **kwargs))

        decoder.forward = forward_with_keys

    def _save_g(self, module, inputs):
        self._g = inputs[0]  # (T, B, d): fairseq layers are time-major

    def _add_to_extra(self, decoder, inputs, output):
        if not isinstance(output, tuple) or len(output) < 1:
            return output
        x = output[0]
        extra = output[1] if len(output) > 1 else None
        if not isinstance(extra, dict):  # e.g. the LSTM decoder's (x, attention scores or None)
            extra = {"attn": extra}
            output = (x, extra) + tuple(output[2:])
        if self._g is not None:
            extra[TRIME_KEY] = self._g.transpose(0, 1)  # (B, T, d)
        # with adaptive softmax the decoder calls output_layer too; with features_only it returns f itself
        extra[TRIME_FEATURE] = self._f if self._f is not None else x
        self._g = self._f = None
        return output


def ensure_key_capture(model: nn.Module) -> None:
    """Make ``model``'s decoder report g (where it has one) and f in ``extra`` (idempotent)."""
    decoder = getattr(model, "decoder", model)
    if getattr(decoder, "provides_trime_keys", False) or hasattr(decoder, "_trime_key_capture"):
        return
    decoder._trime_key_capture = KeyCapture(decoder)


def provides(model: nn.Module, name: str) -> bool:
    """Whether ``model`` (after :func:`ensure_key_capture`) reports the key kind ``name``."""
    decoder = getattr(model, "decoder", model)
    if getattr(decoder, "provides_trime_keys", False):
        return True
    capture = getattr(decoder, "_trime_key_capture", None)
    if capture is None:
        return False
    return name == TRIME_FEATURE or capture.has_g


def require_keys(model: nn.Module, names: Iterable[str], why: str) -> None:
    """Refuse, before any forward pass, a model that cannot report the key kinds ``names``."""
    ensure_key_capture(model)
    missing = [name for name in names if not provides(model, name)]
    if missing:
        decoder = getattr(model, "decoder", model)
        raise ValueError(
            f"{why} needs the memory key g (input of the last feed-forward block), which "
            f"{type(decoder).__name__} does not have (no `layers[-1].fc1`); use a transformer decoder or a "
            "trime_fairseq model, or a memory on f (--eval-memory cache, a datastore with --key-type trime_feature)"
        )


def get_keys(net_output, name: str = TRIME_KEY) -> Tensor:
    """g (or f with ``name=TRIME_FEATURE``) of a decoder output: (B, T, d)."""
    extra = net_output[1] if len(net_output) > 1 else None
    if not isinstance(extra, dict) or extra.get(name) is None:
        raise ValueError(
            f"the decoder output carries no '{name}': call "
            "trime_fairseq.memory.keys.ensure_key_capture(model) before the forward pass"
            + (" (a decoder without a feed-forward block has no g)" if name == TRIME_KEY else "")
        )
    return extra[name]


def get_neighbours(source: dict, pad: int) -> MemoryBatch:
    """Precomputed neighbours as raw-score memory entries: scores (B, T, K) float32 (the datastore's),
    values (B, T, K), mask (B, T, K) bool. ``source``: the ``extra`` of a SPALM output (the k it
    used) or a batch's ``net_input`` (all K of the neighbour file)."""
    if not isinstance(source, dict) or source.get(NEIGHBOUR_TOKENS) is None or source.get(NEIGHBOUR_SCORES) is None:
        raise ValueError("the batch carries no precomputed neighbours (tokens and scores): memory over neighbours "
                         "needs --task trime_lm --neighbours DIR (written by trime-neighbours)")
    values, scores = source[NEIGHBOUR_TOKENS], source[NEIGHBOUR_SCORES]
    mask = values.ne(pad)
    return MemoryBatch(scores.float().masked_fill(~mask, float("-inf")), torch.where(mask, values, 0), mask)
