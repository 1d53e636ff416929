"""``trime_long_loss``: TRIME's objective with long-term memory (TRIMELM_long, §4.2).

Batches come from ``--batching consecutive``: runs of m consecutive segments of
one document on adjacent rows. The memory of a token is the preceding tokens of
its segment plus every token of the run's earlier segments (Eq. 2 + Eq. 3), with
gradients into all of them: the rows (B, T) of a batch are read as B/m streams
of m·T positions and :class:`~trime_fairseq.criterions.trime_loss.TrimeLoss`'s
causal in-stream memory does the rest (same math, same logging).

Long runs (WikiText-103 150M: 240 × 150 = 36,000 positions) use the blockwise
target-only memory (:mod:`trime_fairseq.memory.blockwise`, checkpointed query
blocks) once a stream is longer than ``--memory-block-size``; it equals the
dense path.

Memory across workers (``--memory-across-workers``): as in TRIME's code, a run may
span workers. ``--batching consecutive`` then deals each step's W·B segments as one
batch of runs cut into W contiguous pieces, the memory table holds every worker's
entries (:mod:`trime_fairseq.memory.gathered`, others' detached), and a run is one
stream wherever its segments lie: stream = run id, position = (segment of the run,
token), both from the rows' dataset ids (item r·m + j is segment j of run r). A run
that is not whole in the step is an error. Without the option every worker's batch
holds whole runs and no memory comes from other workers.
"""

from dataclasses import dataclass, field

from fairseq.criterions import register_criterion

import torch

from trime_fairseq.criterions.trime_loss import TrimeLoss, TrimeLossConfig, check_whole_runs, is_dummy_batch
from trime_fairseq.memory.blockwise import causal_target_memory
from trime_fairseq.memory.gathered import MemoryEntries, entry_memory, gather_entries
from trime_fairseq.memory.sources import MemoryBatch, dot_scale

RUN_KEY = "segments_per_run"  # set by trime_fairseq.data.segments.SegmentDataset.collater
SEGMENT_SHIFT = 32  # position of token t of segment j of a run: j << SEGMENT_SHIFT | t


@dataclass
class TrimeLongLossConfig(TrimeLossConfig):
    memory_block_size: int = field(
        default=2048,
        metadata={"help": "streams (m·T positions) longer than this are scored in checkpointed query blocks "
        "of this size instead of one dense (m·T)² score matrix; 0: always dense"},
    )


@register_criterion("trime_long_loss", dataclass=TrimeLongLossConfig)
class TrimeLongLoss(TrimeLoss):
    SEES_OTHER_WORKERS = True  # the earlier segments of a run that spans workers

    def __init__(self, task, ce_warmup_ratio, ce_warmup_updates, max_update, sentence_avg, memory_block_size,
                 memory_across_workers=False):
        super().__init__(task, ce_warmup_ratio, ce_warmup_updates, max_update, sentence_avg, memory_across_workers)
        if memory_block_size < 0:
            raise ValueError(f"--memory-block-size must be >= 0, got {memory_block_size}")
        self.memory_block_size = memory_block_size
        batching = getattr(getattr(task, "args", None), "batching", None)
        if batching == "shuffled":  # fairseq's order never holds runs
            raise ValueError(
                "trime_long_loss reads each batch as runs of consecutive segments: use "
                f"--batching consecutive --consecutive-segments m (got --batching {batching})"
            )
        if self.memory_across_workers and batching not in (None, "consecutive"):
            raise ValueError(
                "trime_long_loss --memory-across-workers needs --batching consecutive (it deals each step's runs "
                f"across the workers); got --batching {batching}"
            )

    def segments_per_stream(self, sample) -> int:
        m = sample.get(RUN_KEY)
        if m is None:
            raise ValueError(
                "trime_long_loss needs batches of runs of consecutive segments (--batching consecutive); "
                f"this batch has no '{RUN_KEY}'"
            )
        return int(m)

    def training_memory(self, keys, target, valid, sample) -> MemoryBatch:
        m = self.segments_per_stream(sample)
        if self.memory_across_workers:
            return self.memory_of_runs_across_workers(keys, target, valid, sample, m)
        bsz, tsz, dim = keys.shape
        if self.memory_block_size == 0 or m * tsz <= self.memory_block_size:
            return super().training_memory(keys, target, valid, sample)
        check_whole_runs(bsz, m)
        shape = (bsz // m, m * tsz)
        stream_keys = keys.reshape(*shape, dim)
        stream_target = target.reshape(shape)
        return causal_target_memory(
            stream_keys, stream_keys, stream_target, valid.reshape(shape), stream_target,
            scale=dot_scale(dim), block_size=self.memory_block_size,
        )

    def memory_of_runs_across_workers(self, keys, target, valid, sample, m: int) -> MemoryBatch:
        """MemoryBatch (B·T, M) or its (B·T, 2) summary: every earlier token of the position's run,
        whichever worker holds it. keys (B, T, d); target, valid (B, T)."""
        bsz, tsz, dim = keys.shape
        ids = sample["id"].to(keys.device)  # (B,) item r·m + j = segment j of run r
        run, segment = ids // m, ids % m
        token = torch.arange(tsz, device=keys.device)
        position = (segment.unsqueeze(1) << SEGMENT_SHIFT) | token.unsqueeze(0)  # (B, T)
        entries = MemoryEntries.of_rows(keys, target, valid, run, position)
        dummy = is_dummy_batch(sample)
        entries, own = gather_entries(entries.withdrawn() if dummy else entries, self.worker_layout(keys))
        if not dummy:
            check_runs_complete(entries, run, m)
        return entry_memory(keys.reshape(-1, dim), entries, own, dot_scale(dim), cross_streams=False,
                            target=target.reshape(-1), block_size=self.memory_block_size)


def check_runs_complete(entries: MemoryEntries, runs, m: int) -> None:
    """Every run of this worker's rows has its m segments among the rows of all workers."""
    row_starts = entries.stream[(entries.position & ((1 << SEGMENT_SHIFT) - 1)) == 0]  # one per row
    mine = runs.unique()
    counts = (row_starts.unsqueeze(0) == mine.unsqueeze(1)).sum(1)
    if bool((counts != m).any()):
        bad = int((counts != m).nonzero()[0, 0])
        raise ValueError(
            f"run {int(mine[bad])} has {int(counts[bad])} of its {m} segments in this step's batches of all workers: "
            "with --memory-across-workers every run must lie whole in one step (--batching consecutive deals "
            "them so; do not combine it with another order)"
        )
