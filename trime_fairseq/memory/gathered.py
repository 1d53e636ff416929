"""Memory across data-parallel workers: every worker's in-batch entries in one table.

TRIME's released code gives the queries of every GPU the memory representations of
every GPU of the step, all-gathered and detached: a worker's gradients flow into its
own entries only, and fairseq's data-parallel all-reduce sums the workers' gradients.
This module is that memory, for any in-batch rule:

* :class:`MemoryEntries` -- a flat table of entries: key, value (next token), validity,
  *stream* id and *position* within the stream (any int64 order key).
* :func:`data_parallel_layout` -- how many rows / positions every worker holds this
  step (one small all-gather; also the single-worker layout without a group).
* :func:`gather_entries` -- the table of all workers in rank order (two all-gathers,
  padded to the largest worker); the worker's own rows are the live tensors (gradients),
  the others' are detached. A withdrawn table (fairseq's dummy batch, :data:`DUMMY_BATCH`)
  takes part in the collectives but is invisible to everyone.
* :func:`entry_visibility` -- the one rule: a query sees the valid entries of its own
  stream at earlier positions (unless its local memory is dropped) and, with
  ``cross_streams``, every valid entry of the other streams.
* :func:`entry_memory` -- the memory of the worker's queries over the table: a dense
  (Q, M) :class:`MemoryBatch`, or the target-only summary computed in checkpointed
  query blocks (:func:`~trime_fairseq.memory.blockwise.blockwise_target_memory`).

Streams are what the criteria make of them: segments (local memory), runs of
consecutive segments that may span workers (TRIMELM_long), or segments that see each
other fully (TRIMELM_ext, ``cross_streams``). With one worker (no group) the table is
the worker's own batch: the same code serves single-worker training.
"""

from typing import List, NamedTuple, Optional, Tuple

import torch
from fairseq.distributed import utils as distributed_utils
from torch import Tensor

from trime_fairseq.memory.blockwise import blockwise_target_memory
from trime_fairseq.memory.sources import MemoryBatch, scaled_dot

#: key of a batch that fairseq's trainer runs only to keep the workers' collectives in step
#: (``trainer._dummy_batch``: an epoch's shards differ in length); set by the ``trime_lm`` task
DUMMY_BATCH = "trime_dummy_batch"


class MemoryEntries(NamedTuple):
    keys: Tensor  # (N, d) memory keys (g)
    values: Tensor  # (N,) long, next token of every entry
    valid: Tensor  # (N,) bool, the entry has a real value (not padding)
    stream: Tensor  # (N,) long, stream id (-1: withdrawn)
    position: Tensor  # (N,) long, order within the stream

    @classmethod
    def of_rows(cls, keys: Tensor, values: Tensor, valid: Tensor, stream: Tensor, position: Tensor) -> "MemoryEntries":
        """Flatten a batch: keys (B, T, d); values, valid, position (B, T); stream (B,) or (B, T)."""
        bsz, tsz, dim = keys.shape
        stream = stream.view(bsz, 1).expand(bsz, tsz) if stream.dim() == 1 else stream
        n = bsz * tsz
        return cls(keys.reshape(n, dim), values.reshape(n), valid.reshape(n), stream.reshape(n), position.reshape(n))

    def withdrawn(self) -> "MemoryEntries":
        """The same entries, visible to no query (a dummy batch's)."""
        return self._replace(valid=torch.zeros_like(self.valid), stream=torch.full_like(self.stream, -1))

    def select(self, index: Tensor) -> "MemoryEntries":
        return MemoryEntries(*(t[index] for t in self))


class WorkerLayout(NamedTuple):
    rank: int
    rows: List[int]  # batch rows of every worker, in rank order
    lengths: List[int]  # positions per row of every worker
    group: object  # the data-parallel process group (None: one worker)

    @property
    def world_size(self) -> int:
        return len(self.rows)

    @property
    def row_offset(self) -> int:
        """Index of this worker's first row among the rows of all workers."""
        return sum(self.rows[: self.rank])

    def entries_of(self, worker: int) -> int:
        return self.rows[worker] * self.lengths[worker]


def data_parallel_world_size() -> int:
    return distributed_utils.get_data_parallel_world_size() if torch.distributed.is_initialized() else 1


def require_data_parallel(what: str) -> None:
    """A clear error when there is no data-parallel group of at least two workers."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        raise ValueError(
            f"{what} needs data-parallel training (torch.distributed initialised, >= 2 workers): "
            "run fairseq-train with --distributed-world-size N >= 2 (see README, 'Several workers')"
        )
    if data_parallel_world_size() < 2:
        raise ValueError(f"{what} needs at least 2 data-parallel workers; this run has 1")


def data_parallel_layout(rows: int, length: int, device: torch.device, distributed: bool = True) -> WorkerLayout:
    """Rows and row length of every worker's batch (a collective: every worker must call it).

    With ``distributed=False`` (or no process group) the layout of this worker alone.
    """
    if not distributed or not torch.distributed.is_initialized():
        return WorkerLayout(0, [rows], [length], None)
    group = distributed_utils.get_data_parallel_group()
    sizes = distributed_utils.all_gather(torch.tensor([rows, length], dtype=torch.long, device=device), group)
    sizes = torch.stack(sizes).tolist()
    return WorkerLayout(distributed_utils.get_rank(group), [r for r, _ in sizes], [t for _, t in sizes], group)


def gather_entries(entries: MemoryEntries, layout: WorkerLayout) -> Tuple[MemoryEntries, slice]:
    """The entries of every worker in rank order, and the slice of this worker's own.

    ``entries`` must hold ``layout.entries_of(layout.rank)`` rows. Other workers' keys are
    detached (gradients only into the worker's own entries, as TRIME's code); keys travel
    in their own dtype (float16 under ``--fp16``), the rest as one (N, 4) int64 tensor.
    """
    n = entries.keys.size(0)
    if n != layout.entries_of(layout.rank):
        raise ValueError(f"{n} entries but the layout says {layout.rows[layout.rank]} x {layout.lengths[layout.rank]}")
    start = sum(layout.entries_of(w) for w in range(layout.rank))
    own = slice(start, start + n)
    if layout.group is None:
        return entries, own
    counts = [layout.entries_of(w) for w in range(layout.world_size)]
    widest = max(counts)
    fields = torch.stack([entries.values.long(), entries.valid.long(), entries.stream.long(),
                          entries.position.long()], -1)  # (n, 4)
    keys = _gather_padded(entries.keys.detach(), widest, layout)
    fields = _gather_padded(fields, widest, layout)
    keys[layout.rank] = entries.keys  # the live tensor: gradients into this worker's own entries
    keys = torch.cat([k[:c] for k, c in zip(keys, counts)])
    fields = torch.cat([f[:c] for f, c in zip(fields, counts)])
    return MemoryEntries(keys, fields[:, 0], fields[:, 1].bool(), fields[:, 2], fields[:, 3]), own


def _gather_padded(tensor: Tensor, rows: int, layout: WorkerLayout) -> List[Tensor]:
    padded = tensor.new_zeros((rows,) + tuple(tensor.shape[1:]))
    padded[: tensor.size(0)] = tensor
    return distributed_utils.all_gather(padded.contiguous(), layout.group)


def entry_visibility(query_stream: Tensor, query_position: Tensor, entries: MemoryEntries, cross_streams: bool,
                     keep_local: Optional[Tensor] = None) -> Tensor:
    """(Q, M) bool: which valid entries each query sees.

    Query q sees entry k if k is valid and either k is in q's stream at an earlier position
    (and ``keep_local[q]``, default True), or ``cross_streams`` and k is in another stream.
    """
    same = query_stream.unsqueeze(1) == entries.stream.unsqueeze(0)  # (Q, M)
    local = same & (entries.position.unsqueeze(0) < query_position.unsqueeze(1))
    if keep_local is not None:
        local = local & keep_local.unsqueeze(1)
    seen = local | ~same if cross_streams else local
    return seen & entries.valid.unsqueeze(0)


def entry_memory(queries: Tensor, entries: MemoryEntries, own: slice, scale: float, cross_streams: bool,
                 keep_local: Optional[Tensor] = None, target: Optional[Tensor] = None,
                 block_size: int = 0) -> MemoryBatch:
    """The memory of this worker's queries over the entry table.

    Args:
        queries: (Q, d), one per own entry (``entries[own]``, same order).
        entries: the table (:func:`gather_entries`); own: the slice of the queries' entries.
        scale: multiplier of q·k; cross_streams, keep_local (Q,): as :func:`entry_visibility`.
        target: (Q,) targets; with ``block_size`` > 0 and more than ``block_size`` entries
            visible to any query, the target-only summary is computed in query blocks.
    Returns:
        dense: MemoryBatch scores/mask (Q, M), values (1, M), over the valid entries the queries
        can see (only their own streams unless ``cross_streams``); blockwise: (Q, 2) summary.
    """
    query_stream, query_position = entries.stream[own], entries.position[own]
    if queries.size(0) != query_stream.size(0):
        raise ValueError(f"{queries.size(0)} queries for {query_stream.size(0)} own entries")
    keep = entries.valid
    if not cross_streams:  # entries of other streams are never seen: leave them out
        keep = keep & torch.isin(entries.stream, query_stream)
    table = entries.select(keep.nonzero().squeeze(1))
    if block_size > 0 and table.keys.size(0) > block_size:
        if target is None:
            raise ValueError("the blockwise memory is target-only: pass the targets")

        def visible(a: int, b: int) -> Tensor:
            lo = None if keep_local is None else keep_local[a:b]
            return entry_visibility(query_stream[a:b], query_position[a:b], table, cross_streams, lo)

        return blockwise_target_memory(queries, table.keys, table.values, target, scale, block_size, visible)
    mask = entry_visibility(query_stream, query_position, table, cross_streams, keep_local)
    return MemoryBatch(scaled_dot(queries, table.keys, scale), table.values.view(1, -1), mask)
