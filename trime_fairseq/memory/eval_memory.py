"""Evaluation-time memory behind ``get_normalized_probs``.

``fairseq-eval-lm`` (and ``fairseq-generate``) call ``model(**net_input)`` and
then ``model.get_normalized_probs(net_output, log_probs, sample)``, possibly
several times per forward on consecutive chunks of the flattened (B·T)
positions (``--softmax-batch``). :class:`EvalMemory` owns the memory options
and turns one forward's keys into next-token distributions:

* ``trime``: Eq. 6 -- token scores and memory similarities
  g(c)·g(c_j)/(√d·τ) in one softmax;
* ``cache``: continuous cache (Grave et al. 2017) -- (1-λ)·p_LM + λ·p_cache with
  p_cache ∝ Σ exp(θ·f(c)·f(c_j)) over the previous ``cache_size`` tokens;
* ``none``: the model's own distribution.

The memory of a position is every earlier position of its input row (with
``--context-window`` the context tokens are memory too). Memory values are the
next tokens, read from the input row itself, so they never depend on which
positions are scored.
"""

import types
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from trime_fairseq.memory.keys import TRIME_FEATURE, TRIME_KEY, get_keys
from trime_fairseq.memory.mixing import (
    interpolate,
    interpolate_memory,
    joint_log_probs,
    joint_target_log_prob,
    memory_target_log_prob,
)
from trime_fairseq.memory.sources import MemoryBatch, causal_memory, dot_scale
from trime_fairseq.memory.token_scores import all_token_scores, target_token_scores

MODES = ("none", "trime", "cache")


@dataclass(frozen=True)
class MemoryOptions:
    mode: str = "none"
    temperature: float = 1.0  # τ of Eq. 6
    cache_lambda: float = 0.1  # λ of the cache interpolation
    cache_theta: float = 0.3  # θ, flatness of the cache distribution
    cache_size: Optional[int] = None  # None: every earlier position of the row

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"unknown eval memory '{self.mode}', choose one of {MODES}")
        if self.temperature <= 0:
            raise ValueError(f"memory temperature τ must be > 0, got {self.temperature}")
        if not 0.0 <= self.cache_lambda <= 1.0:
            raise ValueError(f"cache λ must lie in [0, 1], got {self.cache_lambda}")
        if self.cache_theta <= 0:
            raise ValueError(f"cache θ must be > 0, got {self.cache_theta}")
        if self.cache_size is not None and self.cache_size < 1:
            raise ValueError(f"cache size must be >= 1, got {self.cache_size}")


def next_tokens(src_tokens: Tensor, target: Optional[Tensor], pad: int) -> Tensor:
    """Memory value of every input position: the token that follows it, (B, T).

    ``src[j+1]`` inside the row; the target where one is given (the last
    position of a row); ``pad`` where neither is known.
    """
    shifted = torch.cat([src_tokens[:, 1:], src_tokens.new_full((src_tokens.size(0), 1), pad)], 1)
    if target is None or target.shape != src_tokens.shape:
        return shifted
    return torch.where(target.ne(pad), target, shifted)


class EvalMemory:
    """Computes evaluation distributions with memory for one model."""

    def __init__(self, options: MemoryOptions, pad: int):
        self.options = options
        self.pad = pad

    # -- memory of a forward pass -------------------------------------------------
    def row_memory(self, net_output, src_tokens: Tensor, target: Optional[Tensor], options=None) -> MemoryBatch:
        """Causal in-row memory of all positions: MemoryBatch (B, T, T)."""
        opt = options or self.options
        values = next_tokens(src_tokens, target, self.pad)
        if opt.mode == "trime":
            keys = get_keys(net_output, TRIME_KEY)
            scale, window = dot_scale(keys.size(-1), opt.temperature), None
        else:
            keys = get_keys(net_output, TRIME_FEATURE)
            scale, window = opt.cache_theta, opt.cache_size
        return causal_memory(keys, keys, values, values.ne(self.pad), scale, window)

    # -- the get_normalized_probs hook ----------------------------------------------
    def log_probs(self, decoder, net_output, sample) -> Tensor:
        """Log-probabilities (…, V) for ``net_output[0]``: the whole (B, T) batch
        or a flattened chunk (1, n) of it, as fairseq's SequenceScorer passes."""
        x, extra = net_output[0], net_output[1]
        src_tokens = sample["net_input"]["src_tokens"]
        bsz, tsz = src_tokens.shape
        target = sample.get("target") if sample is not None else None
        if x.shape[:2] == (bsz, tsz):
            start = 0
        else:  # a --softmax-batch chunk: positions follow the previous chunk's
            start = extra.get("_trime_next_position", 0)
        n = x.shape[0] * x.shape[1]
        if start + n > bsz * tsz:
            raise RuntimeError("get_normalized_probs got more positions than the forward pass produced")
        extra["_trime_next_position"] = (start + n) % (bsz * tsz)

        row_target = target if target is not None and target.shape == src_tokens.shape else None
        flat_target = target.reshape(-1) if target is not None else None
        scores, lse = all_token_scores(decoder, x, flat_target)  # (n, V), (n,)
        if self.options.mode == "none":
            out = scores - lse.unsqueeze(-1)
        else:
            memory = self._positions(self.row_memory(net_output, src_tokens, row_target), start, n, tsz)
            out = self.mix(scores, lse, memory)
        return out.view(*x.shape[:-1], -1)

    def mix(self, token_scores: Tensor, token_lse: Tensor, memory: MemoryBatch, options=None) -> Tensor:
        """Full-vocabulary (n, V) log-probabilities for flattened positions."""
        opt = options or self.options
        if opt.mode == "trime":
            return joint_log_probs(token_scores, token_lse, *memory)
        return interpolate_memory(token_scores - token_lse.unsqueeze(-1), *memory, opt.cache_lambda)

    @staticmethod
    def _positions(memory: MemoryBatch, start: int, n: int, tsz: int) -> MemoryBatch:
        """Rows start..start+n of the flattened (B·T, M) memory, computing only touched rows."""
        first, last = start // tsz, (start + n - 1) // tsz
        touched = MemoryBatch(
            memory.scores[first : last + 1], memory.values[first : last + 1], memory.mask[first : last + 1]
        ).flatten()
        offset = start - first * tsz
        index = torch.arange(offset, offset + n, device=memory.mask.device)
        return touched.rows(index)

    # -- target-only scoring (tuning) ---------------------------------------------------
    def target_log_probs(self, decoder, net_output, sample, options: MemoryOptions) -> Tensor:
        """log P(target) of every position, (B, T), under ``options``; the same
        distribution :meth:`log_probs` gives, without materialising (B·T, V)."""
        src_tokens, target = sample["net_input"]["src_tokens"], sample["target"]
        score, lse = target_token_scores(decoder, net_output, target)
        if options.mode == "none":
            return (score - lse).view_as(target)
        memory = self.row_memory(net_output, src_tokens, target, options)
        if options.mode == "trime":
            out = joint_target_log_prob(score.view_as(target), lse.view_as(target), *memory, target)
            return out
        log_p = (score - lse).view_as(target)
        log_q = memory_target_log_prob(*memory, target)
        return interpolate(log_p, log_q, options.cache_lambda, memory.mask.any(-1))


def attach_eval_memory(model, memory: EvalMemory) -> None:
    """Route ``model.get_normalized_probs`` through ``memory`` (this instance only)."""

    def get_normalized_probs(self, net_output, log_probs, sample=None):
        if sample is None or not isinstance(net_output[1], dict):
            return type(self).get_normalized_probs(self, net_output, log_probs, sample)
        out = memory.log_probs(self.decoder, net_output, sample)
        return out if log_probs else out.exp()

    model.get_normalized_probs = types.MethodType(get_normalized_probs, model)
    model.trime_eval_memory = memory
