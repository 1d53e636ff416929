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

With ``long_memory_size`` N > 0 (``--long-memory-size``, trime and cache) the
memory also holds up to N earlier entries of the evaluation stream, carried
across batches (:mod:`trime_fairseq.memory.stream`, a ring buffer per key kind);
``memory_reset="document"`` limits every memory to the position's own document.
The stream state belongs to the EvalMemory: :meth:`EvalMemory.reset` starts a new
stream; :meth:`EvalMemory.log_probs` adds a batch to it after the batch's last
``--softmax-batch`` chunk; callers of :meth:`EvalMemory.target_log_probs` (which
only reads the stream) call :meth:`EvalMemory.advance` once per batch.
"""

import types
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from trime_fairseq.memory.blockwise import target_summary
from trime_fairseq.memory.keys import TRIME_FEATURE, TRIME_KEY, get_keys
from trime_fairseq.memory.mixing import (
    interpolate,
    interpolate_memory,
    joint_log_probs,
    joint_target_log_prob,
    memory_target_log_prob,
)
from trime_fairseq.memory.sources import MemoryBatch, causal_memory, dot_scale
from trime_fairseq.memory.stream import EvalStream, StreamBatch, concat_memory
from trime_fairseq.memory.token_scores import all_token_scores, target_token_scores

MODES = ("none", "trime", "cache")
RESETS = ("never", "document")


@dataclass(frozen=True)
class MemoryOptions:
    mode: str = "none"
    temperature: float = 1.0  # τ of Eq. 6
    cache_lambda: float = 0.1  # λ of the cache interpolation
    cache_theta: float = 0.3  # θ, flatness of the cache distribution
    cache_size: Optional[int] = None  # None: every earlier position of the row
    long_memory_size: int = 0  # N: earlier stream entries in memory (0: the input row only)
    memory_reset: str = "never"  # "document": memory only from the position's own document

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
        if self.long_memory_size < 0:
            raise ValueError(f"long-term memory size must be >= 0, got {self.long_memory_size}")
        if self.memory_reset not in RESETS:
            raise ValueError(f"unknown memory reset '{self.memory_reset}', choose one of {RESETS}")
        if self.mode == "none" and (self.long_memory_size > 0 or self.memory_reset != "never"):
            raise ValueError("a long-term memory / memory reset needs eval memory trime or cache")
        if self.mode == "cache" and self.cache_size is not None and self.long_memory_size > 0:
            raise ValueError(
                "--cache-size limits the cache to the input row; with --long-memory-size the cache is the row "
                "plus N earlier stream tokens: give one of them"
            )

    @property
    def uses_stream(self) -> bool:
        return self.long_memory_size > 0 or self.memory_reset != "never"

    @property
    def key_name(self) -> str:
        """The representation this mode searches with: g (trime) or f (cache)."""
        return TRIME_KEY if self.mode == "trime" else TRIME_FEATURE

    def scale(self, dim: int) -> float:
        return dot_scale(dim, self.temperature) if self.mode == "trime" else self.cache_theta


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

    def __init__(self, options: MemoryOptions, pad: int, documents=None, stream_keys=None):
        """``documents``: a :class:`~trime_fairseq.data.documents.DocumentBoundaries`
        (needed for ``memory_reset="document"``); ``stream_keys``: the key kinds the
        stream memory keeps (default: the one of ``options.mode``; name both
        TRIME_KEY and TRIME_FEATURE to score trime and cache options on one stream).
        The stream memory holds ``options.long_memory_size`` entries; other
        options passed to :meth:`target_log_probs` may use fewer."""
        self.options = options
        self.pad = pad
        self.documents = documents
        if options.memory_reset == "document" and documents is None:
            raise ValueError("--memory-reset document needs the dictionary's document boundaries")
        self.stream: Optional[EvalStream] = None
        if options.uses_stream:
            names = tuple(stream_keys) if stream_keys else (options.key_name,)
            self.stream = EvalStream(options.long_memory_size, names, documents, pad)

    # -- the evaluation stream ---------------------------------------------------------
    def reset(self) -> None:
        """Start a new evaluation stream (forget the long-term memory)."""
        if self.stream is not None:
            self.stream.reset()

    def advance(self, net_output, sample) -> None:
        """Add a scored batch to the stream memory (after :meth:`target_log_probs`;
        :meth:`log_probs` does it by itself). No-op without a stream memory."""
        if self.stream is None:
            return
        batch = self._stream_batch(net_output, sample)
        batch.add_targets(0, sample["target"])
        self.stream.commit(batch, {name: get_keys(net_output, name) for name in self.stream.buffers})

    def _stream_batch(self, net_output, sample) -> StreamBatch:
        extra = net_output[1]
        batch = extra.get("_trime_stream_batch")
        if batch is None:
            batch = self.stream.place(sample, sample["net_input"]["src_tokens"])
            extra["_trime_stream_batch"] = batch
        return batch

    def _check_stream(self, opt: MemoryOptions) -> None:
        if self.stream is None:
            raise ValueError(
                "these options need a stream memory: build the EvalMemory with long_memory_size >= "
                f"{opt.long_memory_size} (and the same memory_reset)"
            )
        if opt.long_memory_size > self.stream.capacity:
            raise ValueError(
                f"long-term memory of {opt.long_memory_size} asked, the stream memory holds {self.stream.capacity}"
            )
        if opt.memory_reset == "document" and self.documents is None:
            raise ValueError("--memory-reset document needs the dictionary's document boundaries")

    def _stream_memory(self, memory: MemoryBatch, batch: StreamBatch, net_output, start: int, n: int,
                       opt: MemoryOptions) -> Tuple[MemoryBatch, Tensor, List[MemoryBatch]]:
        """The stream's share of the memory of flat positions start..start+n.

        Returns the in-row memory (n, T) limited to each position's document if asked,
        the indices (k,) of the chunk's scored positions, and their long-term memory
        parts (k, N) and (k, S) (empty list without a long-term memory). Unscored
        positions (context, padding) have no long-term memory: it is not computed.
        """
        flat_q = torch.arange(start, start + n, device=memory.mask.device)
        documents = self.documents if opt.memory_reset == "document" else None
        doc_lo, lo, hi = batch.query_bounds(flat_q, opt.long_memory_size, documents)
        if documents is not None:
            same_doc = batch.column_positions(flat_q) >= doc_lo.unsqueeze(1)  # (n, T)
            memory = MemoryBatch(memory.scores, memory.values, memory.mask & same_doc)
        sel = (batch.entry_of_flat[flat_q] >= 0).nonzero().squeeze(1)  # (k,) scored positions of the chunk
        if opt.long_memory_size == 0 or sel.numel() == 0:
            return memory, sel, []
        keys = get_keys(net_output, opt.key_name)  # (B, T, d)
        queries = keys.reshape(-1, keys.size(-1))[flat_q[sel]]
        scale = opt.scale(keys.size(-1))
        return memory, sel, self.stream.long_memory(batch, opt.key_name, keys, queries, lo[sel], hi[sel], scale)

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
            if self.stream is not None:
                if target is None:
                    raise ValueError("the long-term memory needs the targets of the scored positions")
                batch = self._stream_batch(net_output, sample)
                batch.add_targets(start, target)
                memory, sel, long = self._stream_memory(memory, batch, net_output, start, n, self.options)
                out = self._mix_with_long(scores, lse, memory, sel, long)
            else:
                out = self.mix(scores, lse, memory)
            if self.stream is not None and start + n == bsz * tsz:  # the batch's last chunk
                self.stream.commit(batch, {name: get_keys(net_output, name) for name in self.stream.buffers})
        return out.view(*x.shape[:-1], -1)

    def _mix_with_long(self, scores: Tensor, lse: Tensor, memory: MemoryBatch, sel: Tensor,
                       long: List[MemoryBatch]) -> Tensor:
        """:meth:`mix` where the rows ``sel`` also have the long-term memory parts ``long``."""
        if not long:
            return self.mix(scores, lse, memory)
        rest = torch.ones(scores.size(0), dtype=torch.bool, device=scores.device)
        rest[sel] = False
        rest = rest.nonzero().squeeze(1)
        with_long = self.mix(scores[sel], lse[sel], concat_memory([memory.rows(sel)] + long))
        out = with_long.new_empty(scores.size(0), with_long.size(-1))
        out[sel] = with_long
        if rest.numel() > 0:
            out[rest] = self.mix(scores[rest], lse[rest], memory.rows(rest))
        return out

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
        if options.uses_stream:
            return self._stream_target_log_probs(score, lse, memory, net_output, sample, options)
        if options.mode == "trime":
            out = joint_target_log_prob(score.view_as(target), lse.view_as(target), *memory, target)
            return out
        log_p = (score - lse).view_as(target)
        log_q = memory_target_log_prob(*memory, target)
        return interpolate(log_p, log_q, options.cache_lambda, memory.mask.any(-1))


    _QUERY_CHUNK = 1024  # query positions per step of the stream path (bounds the (n, N) scores)

    def _stream_target_log_probs(self, score, lse, row_memory, net_output, sample, options) -> Tensor:
        """target_log_probs with the stream memory, in chunks of query positions."""
        self._check_stream(options)
        target = sample["target"]
        bsz, tsz = target.shape
        batch = self._stream_batch(net_output, sample)
        batch.add_targets(0, target)
        flat_target = target.reshape(-1)
        out = []
        for start in range(0, bsz * tsz, self._QUERY_CHUNK):
            n = min(self._QUERY_CHUNK, bsz * tsz - start)
            part = slice(start, start + n)
            tgt = flat_target[part]
            rows, sel, long = self._stream_memory(self._positions(row_memory, start, n, tsz), batch, net_output,
                                                  start, n, options)
            memory = target_summary([rows], tgt)  # (n, 2): no (n, T + N + S) copies
            if long:  # scored positions: in-row + long-term memory
                with_long = target_summary([rows.rows(sel)] + long, tgt[sel])
                memory = MemoryBatch(*(t.index_copy(0, sel, u) for t, u in zip(memory, with_long)))
            if options.mode == "trime":
                out.append(joint_target_log_prob(score[part], lse[part], *memory, flat_target[part]))
            else:
                log_p = score[part] - lse[part]
                log_q = memory_target_log_prob(*memory, flat_target[part])
                out.append(interpolate(log_p, log_q, options.cache_lambda, memory.mask.any(-1)))
        return torch.cat(out).view_as(target)


def attach_eval_memory(model, memory: EvalMemory) -> None:
    """Route ``model.get_normalized_probs`` through ``memory`` (this instance only)."""

    def get_normalized_probs(self, net_output, log_probs, sample=None):
        if sample is None or not isinstance(net_output[1], dict):
            return type(self).get_normalized_probs(self, net_output, log_probs, sample)
        out = memory.log_probs(self.decoder, net_output, sample)
        return out if log_probs else out.exp()

    model.get_normalized_probs = types.MethodType(get_normalized_probs, model)
    model.trime_eval_memory = memory
