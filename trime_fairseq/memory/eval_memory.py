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
* ``knn``: kNN-LM (Khandelwal et al. 2020) -- (1-λ)·p_LM + λ·p_kNN with
  p_kNN ∝ Σ exp(score/T) over the K nearest datastore entries (score = q·k or
  -|q-k|²); with ``--cache-lambda`` the continuous cache is interpolated on top:
  (1-λ_c)·p_kNN-LM + λ_c·p_cache (Table 2's "kNN-LM + cache");
* ``trime_ext``: TRIMELM_ext (Appendix F) -- the K retrieved entries join the
  local (and long) memory in Eq. 6 with temperature τ, then Eq. 7-8:
  (1-λ)·P + λ·P' with P' ∝ Σ exp(sim/τ') over the same memory;
* ``none``: the model's own distribution.

The memory of a position is every earlier position of its input row (with
``--context-window`` the context tokens are memory too). Memory values are the
next tokens, read from the input row itself, so they never depend on which
positions are scored. The datastore (:mod:`trime_fairseq.memory.external`) is
searched only for positions with a real target (not for context positions),
once per forward pass whatever ``--softmax-batch`` chunking follows.

With ``long_memory_size`` N > 0 (``--long-memory-size``: trime, cache, trime_ext,
knn with a cache) the memory also holds up to N earlier entries of the
evaluation stream, carried across batches (:mod:`trime_fairseq.memory.stream`, a
ring buffer per key kind); ``memory_reset="document"`` limits every in-row and
long memory to the position's own document.
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
from trime_fairseq.memory.datastore import DatastoreError
from trime_fairseq.memory.external import ExternalMemory
from trime_fairseq.memory.keys import TRIME_FEATURE, TRIME_KEY, get_keys
from trime_fairseq.memory.mixing import (
    fp32,
    interpolate,
    interpolate_memory,
    joint_log_probs,
    joint_target_log_prob,
    memory_target_log_prob,
)
from trime_fairseq.memory.sources import MemoryBatch, causal_memory, dot_scale
from trime_fairseq.memory.stream import EvalStream, StreamBatch, concat_memory
from trime_fairseq.memory.token_scores import all_token_scores, target_token_scores

MODES = ("none", "trime", "cache", "knn", "trime_ext")
RESETS = ("never", "document")
DATASTORE_MODES = ("knn", "trime_ext")


@dataclass(frozen=True)
class MemoryOptions:
    mode: str = "none"
    temperature: float = 1.0  # τ of Eq. 6
    cache_lambda: Optional[float] = None  # λ of the cache interpolation (cache: 0.1; knn: 0, no cache)
    cache_theta: float = 0.3  # θ, flatness of the cache distribution
    cache_size: Optional[int] = None  # None: every earlier position of the row
    long_memory_size: int = 0  # N: earlier stream entries in memory (0: the input row only)
    memory_reset: str = "never"  # "document": memory only from the position's own document
    datastore: Optional[str] = None  # external memory folder (knn, trime_ext)
    knn_k: int = 1024  # K entries retrieved per scored position
    knn_temperature: float = 1.0  # T of kNN-LM; τ' of Eq. 7 (trime_ext)
    knn_lambda: float = 0.25  # λ of the kNN-LM interpolation / Eq. 8
    knn_nprobe: Optional[int] = None  # inverted lists probed (None: the datastore's default)
    knn_rescore: bool = False  # re-rank the index's hits with the exact stored keys
    knn_gpu: bool = False  # search the index on the GPU (faiss-gpu)

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"unknown eval memory '{self.mode}', choose one of {MODES}")
        if self.temperature <= 0:
            raise ValueError(f"memory temperature τ must be > 0, got {self.temperature}")
        if self.cache_lambda is not None and not 0.0 <= self.cache_lambda <= 1.0:
            raise ValueError(f"cache λ must lie in [0, 1], got {self.cache_lambda}")
        if self.cache_theta <= 0:
            raise ValueError(f"cache θ must be > 0, got {self.cache_theta}")
        if self.cache_size is not None and self.cache_size < 1:
            raise ValueError(f"cache size must be >= 1, got {self.cache_size}")
        if self.long_memory_size < 0:
            raise ValueError(f"long-term memory size must be >= 0, got {self.long_memory_size}")
        if self.memory_reset not in RESETS:
            raise ValueError(f"unknown memory reset '{self.memory_reset}', choose one of {RESETS}")
        if not self.uses_row_memory and (self.long_memory_size > 0 or self.memory_reset != "never"):
            raise ValueError(
                "a long-term memory / memory reset needs eval memory trime, cache, trime_ext or knn with a cache "
                "(--cache-lambda)"
            )
        if self.uses_cache and self.cache_size is not None and self.long_memory_size > 0:
            raise ValueError(
                "--cache-size limits the cache to the input row; with --long-memory-size the cache is the row "
                "plus N earlier stream tokens: give one of them"
            )
        if (self.mode in DATASTORE_MODES) != (self.datastore is not None):
            raise ValueError(
                f"--eval-memory {self.mode} needs --datastore" if self.mode in DATASTORE_MODES
                else f"--datastore is used by --eval-memory {' / '.join(DATASTORE_MODES)}, not {self.mode}"
            )
        if self.knn_k < 1:
            raise ValueError(f"--knn-k must be >= 1, got {self.knn_k}")
        if self.knn_temperature <= 0:
            raise ValueError(f"--knn-temperature must be > 0, got {self.knn_temperature}")
        if not 0.0 <= self.knn_lambda <= 1.0:
            raise ValueError(f"--knn-lambda must lie in [0, 1], got {self.knn_lambda}")
        if self.knn_nprobe is not None and self.knn_nprobe < 1:
            raise ValueError(f"--knn-nprobe must be >= 1, got {self.knn_nprobe}")

    @property
    def cache_weight(self) -> float:
        """λ of the continuous cache: 0.1 by default for ``cache``, 0 (no cache) for ``knn``."""
        if self.mode == "cache":
            return 0.1 if self.cache_lambda is None else self.cache_lambda
        if self.mode == "knn":
            return 0.0 if self.cache_lambda is None else self.cache_lambda
        return 0.0

    @property
    def uses_cache(self) -> bool:
        return self.mode == "cache" or (self.mode == "knn" and self.cache_weight > 0)

    @property
    def uses_row_memory(self) -> bool:
        """Whether the in-row (local) memory takes part: Eq. 6 or a continuous cache."""
        return self.mode in ("trime", "trime_ext") or self.uses_cache

    @property
    def uses_datastore(self) -> bool:
        return self.mode in DATASTORE_MODES

    @property
    def uses_stream(self) -> bool:
        return self.long_memory_size > 0 or self.memory_reset != "never"

    @property
    def key_name(self) -> str:
        """The representation the in-row / long memory searches with: g (trime) or f (cache)."""
        return TRIME_KEY if self.mode in ("trime", "trime_ext") else TRIME_FEATURE

    def scale(self, dim: int) -> float:
        return dot_scale(dim, self.temperature) if self.mode in ("trime", "trime_ext") else self.cache_theta

    def external_scale(self, dim: int) -> float:
        """Multiplier of the datastore's raw scores: 1/T (knn) or 1/(√d·τ) (trime_ext, Eq. 6)."""
        return dot_scale(dim, self.temperature) if self.mode == "trime_ext" else 1.0 / self.knn_temperature

    @property
    def ext_rescale(self) -> float:
        """trime_ext: Eq. 7 memory scores at τ' from Eq. 6 scores at τ (sim/τ' = (sim/τ)·τ/τ')."""
        return self.temperature / self.knn_temperature


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

    def __init__(self, options: MemoryOptions, pad: int, documents=None, stream_keys=None,
                 external: Optional[ExternalMemory] = None):
        """``documents``: a :class:`~trime_fairseq.data.documents.DocumentBoundaries`
        (needed for ``memory_reset="document"``); ``stream_keys``: the key kinds the
        stream memory keeps (default: the one of ``options.mode``; name both
        TRIME_KEY and TRIME_FEATURE to score trime and cache options on one stream).
        The stream memory holds ``options.long_memory_size`` entries; other
        options passed to :meth:`target_log_probs` may use fewer. ``external``:
        the datastore of ``knn`` / ``trime_ext`` (see :func:`build_eval_memory`)."""
        self.options = options
        self.pad = pad
        self.documents = documents
        if options.memory_reset == "document" and documents is None:
            raise ValueError("--memory-reset document needs the dictionary's document boundaries")
        self.stream: Optional[EvalStream] = None
        if options.uses_stream:
            names = tuple(stream_keys) if stream_keys else (options.key_name,)
            self.stream = EvalStream(options.long_memory_size, names, documents, pad)
        self.external = external
        if options.uses_datastore:
            self._check_external(options)

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

    # -- the external memory (datastore) -------------------------------------------------
    def _check_external(self, opt: MemoryOptions) -> None:
        if self.external is None:
            raise ValueError(f"--eval-memory {opt.mode} needs its datastore: build the EvalMemory with an "
                             "ExternalMemory (build_eval_memory does)")
        mine = self.options
        if (opt.datastore, opt.knn_k, opt.knn_nprobe, opt.knn_rescore) != (
                mine.datastore, mine.knn_k, mine.knn_nprobe, mine.knn_rescore):
            raise ValueError("these options search another datastore / K / nprobe than this EvalMemory was built "
                             "for; only τ, T (τ'), λ and the cache options may differ")
        if opt.mode == "trime_ext" and (self.external.metric != "ip" or self.external.key_type != TRIME_KEY):
            raise DatastoreError(
                f"--eval-memory trime_ext joins datastore entries to Eq. 6, whose similarity is g(c)·g(c_j)/√d: "
                f"it needs a datastore of trime_key (g) keys with metric ip; {self.options.datastore} holds "
                f"{self.external.key_type} keys with metric {self.external.metric} (rebuild with "
                "trime-build-datastore --key-type trime_key --metric ip)"
            )

    def _search(self, net_output, flat_q: Tensor):
        """Raw datastore hits (k, K) of the forward's flat positions ``flat_q`` (k,)."""
        keys = get_keys(net_output, self.external.key_type)  # (B, T, d)
        return self.external.search(keys.reshape(-1, keys.size(-1))[flat_q])

    def _search_forward(self, net_output, flat_target: Tensor) -> None:
        """Search every position of the forward with a real target once; later
        :meth:`_external` calls on this forward read the cached hits (tuning scores
        many options on one forward)."""
        extra = net_output[1]
        if "_trime_external" in extra:
            return
        flat = flat_target.ne(self.pad).nonzero().squeeze(1)  # (P,)
        row_of_flat = torch.full_like(flat_target, -1)
        row_of_flat[flat] = torch.arange(flat.numel(), device=flat.device)
        extra["_trime_external"] = (row_of_flat, self._search(net_output, flat))

    def _external(self, net_output, flat_q: Tensor, opt: MemoryOptions) -> MemoryBatch:
        """Datastore memory (k, K) of the forward's flat positions ``flat_q``, scaled for ``opt``."""
        cached = net_output[1].get("_trime_external")
        if cached is None:
            hits = self._search(net_output, flat_q)
        else:
            row_of_flat, all_hits = cached
            rows = row_of_flat[flat_q]
            if (rows < 0).any():
                raise RuntimeError("a scored position has no datastore search (its target is padding)")
            hits = all_hits.rows(rows)
        return hits.scaled(opt.external_scale(self.external.dim))

    # -- memory of a forward pass -------------------------------------------------
    def row_memory(self, net_output, src_tokens: Tensor, target: Optional[Tensor], options=None) -> MemoryBatch:
        """Causal in-row memory of all positions: MemoryBatch (B, T, T)."""
        opt = options or self.options
        values = next_tokens(src_tokens, target, self.pad)
        keys = get_keys(net_output, opt.key_name)
        window = opt.cache_size if opt.uses_cache else None
        return causal_memory(keys, keys, values, values.ne(self.pad), opt.scale(keys.size(-1)), window)

    def _chunk_memory(self, net_output, sample, start: int, n: int, opt: MemoryOptions, row_memory=None):
        """Every memory of flat positions start..start+n of a forward, for ``opt``.

        Returns (memory, sel, long, external): the in-row memory (n, T) or None
        (knn without a cache); the chunk-relative indices (k,) of the positions
        that also have long-term / external memory (None: no such memory); their
        long-term parts (k, ·) and their scaled datastore hits (k, K) or None.
        """
        src_tokens = sample["net_input"]["src_tokens"]
        bsz, tsz = src_tokens.shape
        target = sample.get("target")
        if row_memory is None and opt.uses_row_memory:
            row_target = target if target is not None and target.shape == src_tokens.shape else None
            row_memory = self.row_memory(net_output, src_tokens, row_target, opt)
        memory = self._positions(row_memory, start, n, tsz) if row_memory is not None else None
        sel, long, external = None, [], None
        if opt.uses_stream:
            if target is None:
                raise ValueError("the long-term memory needs the targets of the scored positions")
            self._check_stream(opt)
            batch = self._stream_batch(net_output, sample)
            if target.numel() == n:  # this chunk's targets (or the batch's)
                batch.add_targets(start, target)
            memory, sel, long = self._stream_memory(memory, batch, net_output, start, n, opt)
        if opt.uses_datastore:
            if target is None:
                raise ValueError("the datastore is searched for positions with a target; the sample has none")
            if sel is None:
                chunk_target = target.reshape(-1) if target.numel() == n else target.reshape(-1)[start:start + n]
                sel = chunk_target.ne(self.pad).nonzero().squeeze(1)
            external = self._external(net_output, start + sel, opt)
        return memory, sel, long, external

    # -- the get_normalized_probs hook ----------------------------------------------
    def log_probs(self, decoder, net_output, sample) -> Tensor:
        """Log-probabilities (…, V) for ``net_output[0]``: the whole (B, T) batch
        or a flattened chunk (1, n) of it, as fairseq's SequenceScorer passes
        (it sets ``sample["target"]`` to the chunk's targets)."""
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

        flat_target = target.reshape(-1) if target is not None else None
        scores, lse = all_token_scores(decoder, x, flat_target)  # (n, V), (n,)
        opt = self.options
        if opt.mode == "none":
            out = scores - lse.unsqueeze(-1)
        else:
            memory, sel, long, external = self._chunk_memory(net_output, sample, start, n, opt)
            out = self._mix_rows(scores, lse, memory, sel, long, external, opt)
            if self.stream is not None and start + n == bsz * tsz:  # the batch's last chunk
                batch = self._stream_batch(net_output, sample)
                self.stream.commit(batch, {name: get_keys(net_output, name) for name in self.stream.buffers})
        return out.view(*x.shape[:-1], -1)

    def _mix_rows(self, scores: Tensor, lse: Tensor, memory: Optional[MemoryBatch], sel: Optional[Tensor],
                  long: List[MemoryBatch], external: Optional[MemoryBatch], opt: MemoryOptions) -> Tensor:
        """:meth:`mix` where the rows ``sel`` also have long-term parts ``long`` and datastore hits ``external``."""
        if sel is None or (not long and external is None):
            return self.mix(scores, lse, memory, None, opt)
        rest = torch.ones(scores.size(0), dtype=torch.bool, device=scores.device)
        rest[sel] = False
        rest = rest.nonzero().squeeze(1)
        own = concat_memory(([memory.rows(sel)] if memory is not None else []) + long) if (
            memory is not None or long) else None
        with_more = self.mix(scores[sel], lse[sel], own, external, opt)
        out = with_more.new_empty(scores.size(0), with_more.size(-1))
        out[sel] = with_more
        if rest.numel() > 0:
            out[rest] = self.mix(scores[rest], lse[rest], memory.rows(rest) if memory is not None else None, None,
                                 opt)
        return out

    def mix(self, token_scores: Tensor, token_lse: Tensor, memory: Optional[MemoryBatch],
            external: Optional[MemoryBatch] = None, options=None) -> Tensor:
        """Full-vocabulary (n, V) log-probabilities for flattened positions.

        ``memory``: in-row (+ long-term) memory (n, M), scaled for the mode; ``external``:
        scaled datastore hits (n, K) (knn, trime_ext) or None.
        """
        opt = options or self.options
        if opt.mode in ("trime", "trime_ext"):
            if external is not None:
                memory = concat_memory([memory, external])
            out = joint_log_probs(token_scores, token_lse, *memory)  # Eq. 6
            if opt.mode == "trime_ext":  # Eq. 7-8: P' over the same memory at τ'
                out = interpolate_memory(out, *memory.scaled(opt.ext_rescale), opt.knn_lambda)
            return out
        out = fp32(token_scores) - fp32(token_lse).unsqueeze(-1)
        if external is not None:  # kNN-LM
            out = interpolate_memory(out, *external, opt.knn_lambda)
        if memory is not None and opt.uses_cache:  # continuous cache (on top of kNN-LM)
            out = interpolate_memory(out, *memory, opt.cache_weight)
        return out

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
        memory = self.row_memory(net_output, src_tokens, target, options) if options.uses_row_memory else None
        if options.uses_stream or options.uses_datastore:
            return self._chunked_target_log_probs(score, lse, memory, net_output, sample, options)
        if options.mode == "trime":
            return joint_target_log_prob(score.view_as(target), lse.view_as(target), *memory, target)
        log_p = (score - lse).view_as(target)
        log_q = memory_target_log_prob(*memory, target)
        return interpolate(log_p, log_q, options.cache_weight, memory.mask.any(-1))

    _QUERY_CHUNK = 1024  # query positions per step of the chunked path (bounds the (n, N) scores)

    def _chunked_target_log_probs(self, score, lse, row_memory, net_output, sample, options) -> Tensor:
        """target_log_probs with the stream and / or datastore memory, in chunks of query positions."""
        target = sample["target"]
        bsz, tsz = target.shape
        flat_target = target.reshape(-1)
        if options.uses_stream:
            self._check_stream(options)
            self._stream_batch(net_output, sample).add_targets(0, target)
        if options.uses_datastore:
            self._check_external(options)
            self._search_forward(net_output, flat_target)
        out = []
        for start in range(0, bsz * tsz, self._QUERY_CHUNK):
            n = min(self._QUERY_CHUNK, bsz * tsz - start)
            part = slice(start, start + n)
            tgt, sc, ls = flat_target[part], score[part], lse[part]
            rows, sel, long, external = self._chunk_memory(net_output, sample, start, n, options, row_memory)
            log_p = self._target_mix(sc, ls, tgt, [rows] if rows is not None else [], None, options)
            if sel is not None and sel.numel() and (long or external is not None):
                own = ([rows.rows(sel)] if rows is not None else []) + long
                log_p = log_p.index_copy(0, sel, self._target_mix(sc[sel], ls[sel], tgt[sel], own, external, options))
            out.append(log_p)
        return torch.cat(out).view_as(target)

    @staticmethod
    def _target_mix(score: Tensor, lse: Tensor, target: Tensor, parts: List[MemoryBatch],
                    external: Optional[MemoryBatch], opt: MemoryOptions) -> Tensor:
        """:meth:`mix` at the target only, (q,): memory given as parts (q, M_i), summarised
        per query (:func:`target_summary`) instead of concatenated."""
        if opt.mode in ("trime", "trime_ext"):
            if external is not None:
                parts = parts + [external]
            memory = target_summary(parts, target)
            out = joint_target_log_prob(score, lse, *memory, target)  # Eq. 6
            if opt.mode == "trime_ext":  # Eq. 7-8
                rescaled = target_summary([p.scaled(opt.ext_rescale) for p in parts], target)
                out = interpolate(out, memory_target_log_prob(*rescaled, target), opt.knn_lambda,
                                  rescaled.mask.any(-1))
            return out
        out = fp32(score) - fp32(lse)
        if external is not None:  # kNN-LM
            out = interpolate(out, memory_target_log_prob(*external, target), opt.knn_lambda, external.mask.any(-1))
        if parts and opt.uses_cache:
            memory = target_summary(parts, target)
            out = interpolate(out, memory_target_log_prob(*memory, target), opt.cache_weight, memory.mask.any(-1))
        return out


def build_eval_memory(options: MemoryOptions, dictionary, documents=None, stream_keys=None) -> EvalMemory:
    """An EvalMemory for ``options``, opening the datastore of knn / trime_ext
    (checked against ``dictionary`` now, against the model on its first search)."""
    external = None
    if options.uses_datastore:
        external = ExternalMemory(options.datastore, options.knn_k, nprobe=options.knn_nprobe,
                                  rescore=options.knn_rescore, use_gpu=options.knn_gpu, dictionary=dictionary)
    return EvalMemory(options, dictionary.pad(), documents=documents, stream_keys=stream_keys, external=external)


def attach_eval_memory(model, memory: EvalMemory) -> None:
    """Route ``model.get_normalized_probs`` through ``memory`` (this instance only)."""

    def get_normalized_probs(self, net_output, log_probs, sample=None):
        if sample is None or not isinstance(net_output[1], dict):
            return type(self).get_normalized_probs(self, net_output, log_probs, sample)
        out = memory.log_probs(self.decoder, net_output, sample)
        return out if log_probs else out.exp()

    model.get_normalized_probs = types.MethodType(get_normalized_probs, model)
    model.trime_eval_memory = memory
    if memory.external is not None:
        memory.external.bind(model)
