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
document, local memory included. The rule (:mod:`trime_fairseq.memory.documents`)
reads inputs only: whether entry b starts a document depends on x_{b+1}, so the
query at b is bounded by the latest start *before* it, and b's own start applies
from b + 1 on. Entry values (next tokens) are read from the inputs too; the
batch's targets are needed only to commit its last entry.

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

NO_LIMIT = -1  # a document lower bound that hides nothing (stream positions are >= 0)


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
        # (S,) x_{k+1}: the value (next token) of every entry but the last, read from the inputs
        self.x_next = torch.cat([self.x[1:], self.x.new_tensor([pad])])
        self.targets = torch.full((bsz * tsz,), pad, dtype=torch.long, device=device)  # filled as scored
        self.known = 0  # flat positions < known have their target
        self.doc_start = doc_start  # the document bound of the batch's first entry
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
        """(S,) next token of every entry; the last entry's is its target (pad until scored)."""
        if self.size == 0:
            return self.x_next
        last = self.targets[self.flat[-1]]
        return torch.cat([self.x_next[:-1], last.view(1)])

    def query_doc_bounds(self, documents) -> Tensor:
        """(S,) lowest stream position each entry, as a query, may see: the latest document
        start strictly before it (inputs only: a start b is known once x_{b+1} is read)."""
        if documents is None:
            return torch.full_like(self.positions, NO_LIMIT)
        flags = documents.starts(self.x_prev, self.x, self.x_next)  # the last flag is never read here
        marks = torch.where(flags, self.positions, torch.full_like(self.positions, self.doc_start))
        inclusive = torch.cummax(marks, 0).values if marks.numel() else marks
        return torch.cat([marks.new_tensor([self.doc_start]), inclusive[:-1]]) if marks.numel() else marks

    def next_doc_start(self, documents) -> int:
        """The document bound of the entry after the batch (all entries and the last target known)."""
        if documents is None or self.size == 0:
            return self.doc_start
        flags = documents.starts(self.x_prev, self.x, self.values())
        hits = self.positions[flags]
        return max(self.doc_start, int(hits.max())) if hits.numel() else self.doc_start

    def query_bounds(self, entries: Tensor, size: int, documents):
        """Windows of the queries at entry indices ``entries`` (n,): (doc_lo, lo, hi).

        doc_lo: lowest stream position of the query's document (NO_LIMIT without
        resets); long memory = stream positions [lo, hi).
        """
        doc_lo = self.query_doc_bounds(documents)[entries]
        row = self.flat[entries] // self.tsz
        lo = torch.maximum(self.first[row] - size, doc_lo)
        return doc_lo, lo, self.row_start[row]


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

    def buffer(self, name: str) -> RingBuffer:
        """The ring buffer of key kind ``name`` (g or f)."""
        if name not in self.buffers:
            raise ValueError(
                f"the stream memory keeps no '{name}' keys (it keeps {sorted(self.buffers)}); build the "
                "EvalMemory with stream_keys naming every key kind it is asked to score with"
            )
        return self.buffers[name]

    def commit(self, batch: StreamBatch, keys: Dict[str, Tensor]) -> None:
        """Append the batch's entries (keys: name -> (B, T, d)) and move the stream on."""
        if batch.committed:
            raise RuntimeError("this batch was already added to the stream memory")
        if batch.known < batch.bsz * batch.tsz:
            raise RuntimeError("the batch is not fully scored yet (targets missing)")
        values = batch.values()
        if (values == self.pad).any():
            raise ValueError("long-term memory: a scored position has a padding target")
        targets = batch.targets[batch.flat]
        if not torch.equal(values, targets):
            raise ValueError("long-term memory: the scored tokens are not one contiguous stream (a target differs "
                             "from the next scored input); evaluate in fairseq-eval-lm's unshuffled order")
        for name, buffer in self.buffers.items():
            k = keys[name]
            buffer.append(k.reshape(-1, k.size(-1))[batch.flat], values, batch.positions)
        if batch.size > 0:
            self.doc_start = batch.next_doc_start(self.documents)
            self.last_src = int(batch.x[-1])
        self.position += batch.size
        self.last_id = batch.ids[-1]
        batch.committed = True
