"""In-batch memory across the segments (or sentences) of a batch: every valid position of the
*other* rows, plus, where asked, the earlier positions of the query's own row.

The batch (B, T) is read as one stream of N = B·T positions; the query at flat position
i of row s sees

* every valid position j of another row (no causality between different rows: they are
  different texts), and
* the valid positions j < i of its own row, if ``keep_local[s]``.

TRIMELM_ext (``trime_ext_loss``, §4.3) keeps the local part with probability 1 − p per
segment; TRIME for translation (``trime_mt_loss``, §5.4 / Appendix B) never keeps it
(no entry of the sentence itself). With a data-parallel ``layout``
(``--memory-across-workers``) the other rows are those of every worker of the step, their
keys detached. This is :mod:`trime_fairseq.memory.gathered`'s entry table with one stream
per row and ``cross_streams``: dense (1, N, M) scores and mask over the M valid entries;
beyond ``block_size`` entries, checkpointed query blocks give the target-only summary
(1, N, 2), peak (block, M) forward and backward.
"""

from typing import Optional

import torch
from torch import Tensor

from trime_fairseq.memory.gathered import MemoryEntries, WorkerLayout, data_parallel_layout, entry_memory, gather_entries
from trime_fairseq.memory.sources import MemoryBatch

MAX_DENSE_POSITIONS = 32768  # 2^30 scores = 4 GiB in float32: score larger batches in blocks


def cross_segment_memory(keys: Tensor, values: Tensor, valid: Tensor, keep_local: Tensor, scale: float,
                         block_size: int = 0, layout: Optional[WorkerLayout] = None,
                         withdrawn: bool = False) -> MemoryBatch:
    """The memory of every position of a batch, as one stream of N = B·T positions.

    Args:
        keys: (B, T, d) key (= query) of every position (g).
        values: (B, T) next token of every position (= its target).
        valid: (B, T) bool, real (non-pad) positions.
        keep_local: (B,) bool, rows whose own earlier positions are memory too.
        scale: multiplier of the dot products (1/(√d·τ)).
        block_size: 0, or at most ``block_size`` memory entries: dense MemoryBatch (1, N, M) (full
            vocabulary or target-only use); else the target-only summary (1, N, 2) in query blocks.
        layout: the rows of every data-parallel worker (:func:`~trime_fairseq.memory.gathered.
            data_parallel_layout`; a collective): their entries join the memory, detached.
        withdrawn: this batch's entries are seen by no worker (fairseq's dummy batch).
    """
    bsz, tsz, dim = keys.shape
    if layout is None:
        layout = data_parallel_layout(bsz, tsz, keys.device, distributed=False)
    entries = sum(layout.entries_of(w) for w in range(layout.world_size))
    if block_size == 0 and entries > MAX_DENSE_POSITIONS:
        raise ValueError(
            f"a memory of {entries} positions ({bsz} x {tsz} in this batch) needs a dense {bsz * tsz} x {entries} "
            "score matrix; set --memory-block-size (e.g. 4096) to score it in blocks"
        )
    row = layout.row_offset + torch.arange(bsz, device=keys.device)  # one stream per row of the step
    position = torch.arange(tsz, device=keys.device).expand(bsz, tsz)
    table = MemoryEntries.of_rows(keys, values, valid, row, position)
    table, own = gather_entries(table.withdrawn() if withdrawn else table, layout)
    memory = entry_memory(keys.reshape(-1, dim), table, own, scale, cross_streams=True,
                          keep_local=keep_local.to(keys.device).repeat_interleave(tsz), target=values.reshape(-1),
                          block_size=block_size)
    return MemoryBatch(memory.scores.unsqueeze(0), memory.values.unsqueeze(0), memory.mask.unsqueeze(0))
