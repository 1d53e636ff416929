"""The evaluation stream: long-term memory across the batches of ``fairseq-eval-lm``.

``fairseq-eval-lm`` scores a split as one stream: its iterator is unshuffled, the
rows of a batch are consecutive blocks, and with ``--context-window C`` every row
starts with the C tokens before its block (already scored by earlier rows).
Every scored position is a stream *entry* k = (key of its context, x_{k+1})
numbered by its stream position k (0, 1, 2, ... over the scored tokens).

Memory of the scored position at stream position p, in a row whose first scored
position is s and which starts with c context tokens (``--long-memory-size N``):

* local: the earlier positions of its own row (context included), keys from the
  row itself -- exactly the memory without ``--long-memory-size``;
* long: the entries at stream positions [s - N, s - c), from the ring buffer
  (earlier batches) and from the earlier rows of the same batch. Positions
  [s - c, s) are the row's context, already in the local memory: every stream
  token is in a position's memory at most once, and the N stream tokens before
  the row's first scored token are visible (as context or as long memory), so
  N <= c adds nothing to a row with c context tokens.

With ``--memory-reset document`` a position sees only entries of its own
document (rule: :mod:`trime_fairseq.data.documents`), local memory included.

:class:`EvalStream` owns the state (ring buffers, stream position, last sample
id, current document start) and resets it explicitly; :class:`StreamBatch` is
one forward pass placed in the stream. A batch is *placed* when first scored
(sample ids checked) and *committed* (its entries appended) once, after it has
been scored.
"""

from typing import Dict, Iterable, List, Optional

import torch
from torch import Tensor

from trime_fairseq.memory.ring_buffer import RingBuffer
from trime_fairseq.memory.sources import MemoryBatch, scaled_dot

NO_LIMIT = -1  # a document lower bound that hides nothing (stream positions are >= 0)


def concat_memory(parts: Iterable[MemoryBatch]) -> MemoryBatch:
    """Concatenate flattened memory batches (Q, M_i) along the entries: (Q, ΣM_i)."""
    parts = list(parts)
    return MemoryBatch(
        torch.cat([p.scores for p in parts], -1),
        torch.cat([p.values.expand_as(p.mask) for p in parts], -1),
        torch.cat([p.mask for p in parts], -1),
    )


class StreamBatch:
    """One forward pass (B rows of T positions) placed at the end of the stream."""

    def __init__(self, ids: List[int], src_tokens: Tensor, context: Tensor, start: int, prev_src: int,
                 doc_start: int, pad: int):
        bsz, tsz = src_tokens.shape
        device = src_tokens.device
        self.ids, self.bsz, self.tsz, self.pad = ids, bsz, tsz, pad
        nonpad = src_tokens.ne(pad)
        length = nonpad.sum(1)  # (B,) context + scored positions
        cols = torch.arange(tsz, device=device)
        if (nonpad != (cols.unsqueeze(0) < length.unsqueeze(1))).any():
            raise ValueError("long-term memory: input rows must be tokens followed by right padding")
        context = context.to(device)
        scored_len = length - context
        if (scored_len < 0).any():
            raise ValueError("long-term memory: start_indices exceed the row lengths")
        scored = (cols.unsqueeze(0) >= context.unsqueeze(1)) & (cols.unsqueeze(0) < length.unsqueeze(1))
        self.flat = scored.reshape(-1).nonzero().squeeze(1)  # (S,) flat index of each entry, stream order
        num = self.flat.numel()
        self.positions = torch.arange(start, start + num, device=device)  # (S,)
        self.first = start + torch.cumsum(scored_len, 0) - scored_len  # (B,) first scored position of each row
        self.row_start = self.first - context  # (B,) stream position of column 0
        self.entry_of_flat = torch.full((bsz * tsz,), -1, dtype=torch.long, device=device)
        self.entry_of_flat[self.flat] = torch.arange(num, device=device)
        self.x = src_tokens.reshape(-1)[self.flat]  # (S,) input token of each entry
        self.x_prev = torch.cat([self.x.new_tensor([prev_src]), self.x[:-1]])  # (S,) x_{k-1}
        self.targets = torch.full((bsz * tsz,), pad, dtype=torch.long, device=device)  # filled as scored
        self.known = 0  # flat positions < known have their target
        self.doc_start = doc_start  # document start in force before the batch
        self.committed = False

    @property
    def size(self) -> int:
        return self.flat.numel()

    def add_targets(self, start: int, target: Tensor) -> None:
        """Targets of flat positions [start, start + n) (a --softmax-batch chunk or the batch)."""
        n = target.numel()
        if start > self.known:
            raise RuntimeError(f"targets arrive out of order: positions from {start}, known up to {self.known}")
        self.targets[start : start + n] = target.reshape(-1).to(self.targets.device)
        self.known = max(self.known, start + n)

    def values(self) -> Tensor:
        """(S,) next token of every entry (pad where not known yet)."""
        return self.targets[self.flat]

    def entry_doc_starts(self, documents) -> Tensor:
        """(S,) stream position of the document start in force at every entry."""
        if documents is None:
            return torch.full_like(self.positions, NO_LIMIT)
        known = self.flat < self.known
        flags = documents.starts(self.x_prev, self.x, self.values()) & known
        marks = torch.where(flags, self.positions, torch.full_like(self.positions, self.doc_start))
        return torch.cummax(marks, 0).values if marks.numel() else marks

    def query_bounds(self, flat_q: Tensor, size: int, documents):
        """Windows of the queries at flat positions ``flat_q`` (n,): (doc_lo, lo, hi).

        doc_lo: lowest stream position of the query's document (NO_LIMIT without
        resets); long memory = stream positions [lo, hi). Unscored positions
        (context, padding) get an empty long memory and no document limit.
        """
        entry = self.entry_of_flat[flat_q]
        scored = entry >= 0
        doc = self.entry_doc_starts(documents)
        doc_lo = torch.where(scored, doc[entry.clamp(min=0)] if doc.numel() else entry, NO_LIMIT)
        row = flat_q // self.tsz
        lo = torch.maximum(self.first[row] - size, doc_lo)
        hi = self.row_start[row]
        return doc_lo, torch.where(scored, lo, 0), torch.where(scored, hi, 0)

    def column_positions(self, flat_q: Tensor) -> Tensor:
        """(n, T) stream position of every column of each query's row."""
        row = flat_q // self.tsz
        return self.row_start[row].unsqueeze(1) + torch.arange(self.tsz, device=flat_q.device).unsqueeze(0)


class EvalStream:
    """State of the evaluation stream; owns one ring buffer per key kind (g / f)."""

    def __init__(self, capacity: int, key_names: Iterable[str], documents=None, pad: int = 1):
        if capacity < 0:
            raise ValueError(f"long-term memory size must be >= 0, got {capacity}")
        self.capacity = capacity
        self.documents = documents
        self.pad = pad
        self.buffers: Dict[str, RingBuffer] = (
            {name: RingBuffer(capacity) for name in key_names} if capacity > 0 else {}
        )
        self.reset()

    def reset(self) -> None:
        """Start a new stream: forget every entry, the position, the last id, the document."""
        for buffer in self.buffers.values():
            buffer.reset()
        self.position = 0
        self.last_id: Optional[int] = None
        self.last_src = self.pad  # x_{-1}: not eos, so the stream start is no heading match
        self.doc_start = 0
        self.pending: Optional[StreamBatch] = None

    def place(self, sample, src_tokens: Tensor) -> StreamBatch:
        """Check that ``sample`` continues the stream and place it after the last batch."""
        if self.pending is not None and not self.pending.committed:
            raise RuntimeError(
                "the previous batch was scored but never added to the stream memory: call "
                "EvalMemory.advance(net_output, sample) once after scoring each batch"
            )
        ids = sample.get("id") if sample is not None else None
        if ids is None:
            raise ValueError("the long-term memory follows the evaluation stream by sample id; the batch has no 'id'")
        ids = [int(i) for i in ids]
        if any(b != a + 1 for a, b in zip(ids, ids[1:])):
            raise ValueError(
                f"long-term memory: the rows of a batch must be consecutive blocks of the stream, got sample ids "
                f"{ids[:6]}...; evaluate in fairseq-eval-lm's unshuffled order"
            )
        if self.last_id is not None and ids[0] != self.last_id + 1:
            raise ValueError(
                f"long-term memory: evaluation stream out of order: this batch starts at sample id {ids[0]}, the "
                f"previous one ended at {self.last_id}. Evaluate in order in one process (no --num-shards or "
                "distributed evaluation), or call EvalMemory.reset() to start a new stream"
            )
        bsz = src_tokens.size(0)
        context = sample.get("start_indices")
        context = torch.as_tensor(context if context is not None else [0] * bsz, dtype=torch.long)
        batch = StreamBatch(ids, src_tokens, context, self.position, self.last_src, self.doc_start, self.pad)
        self.pending = batch
        return batch

    def long_memory(self, batch: StreamBatch, name: str, batch_keys: Tensor, queries: Tensor,
                    lo: Tensor, hi: Tensor, scale: float) -> List[MemoryBatch]:
        """Entries at stream positions [lo, hi) for queries (n, d): the ring buffer's
        slots (n, N) and the batch's own entries (n, S), values (1, ·)."""
        buffer = self.buffers.get(name)
        if buffer is None:
            raise ValueError(
                f"the stream memory keeps no '{name}' keys (it keeps {sorted(self.buffers)}); build the "
                "EvalMemory with stream_keys naming every key kind it is asked to score with"
            )
        parts = [buffer.search(queries, scale, lo, hi)]
        if batch.size > 0:
            keys = batch_keys.reshape(-1, batch_keys.size(-1))[batch.flat]  # (S, d)
            pos = batch.positions.unsqueeze(0)
            mask = (pos >= lo.unsqueeze(1)) & (pos < hi.unsqueeze(1))
            parts.append(MemoryBatch(scaled_dot(queries, keys, scale), batch.values().unsqueeze(0), mask))
        return parts

    def commit(self, batch: StreamBatch, keys: Dict[str, Tensor]) -> None:
        """Append the batch's entries (keys: name -> (B, T, d)) and move the stream on."""
        if batch.committed:
            raise RuntimeError("this batch was already added to the stream memory")
        if batch.known < batch.bsz * batch.tsz:
            raise RuntimeError("the batch is not fully scored yet (targets missing)")
        values = batch.values()
        if (values == self.pad).any():
            raise ValueError("long-term memory: a scored position has a padding target")
        for name, buffer in self.buffers.items():
            k = keys[name]
            buffer.append(k.reshape(-1, k.size(-1))[batch.flat], values, batch.positions)
        if batch.size > 0:
            self.doc_start = int(batch.entry_doc_starts(self.documents)[-1].clamp(min=0))
            self.last_src = int(batch.x[-1])
        self.position += batch.size
        self.last_id = batch.ids[-1]
        batch.committed = True
