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

Memory across workers: none. Every worker's batch holds whole runs (the batching
deals whole runs), so a run's memory is complete on its worker; unlike the
original code no all-gather is done and no memory comes from other workers.
"""

from dataclasses import dataclass, field

from fairseq.criterions import register_criterion

from trime_fairseq.criterions.trime_loss import TrimeLoss, TrimeLossConfig
from trime_fairseq.memory.blockwise import causal_target_memory
from trime_fairseq.memory.sources import MemoryBatch, dot_scale

RUN_KEY = "segments_per_run"  # set by trime_fairseq.data.segments.SegmentDataset.collater


@dataclass
class TrimeLongLossConfig(TrimeLossConfig):
    memory_block_size: int = field(
        default=2048,
        metadata={"help": "streams (m·T positions) longer than this are scored in checkpointed query blocks "
        "of this size instead of one dense (m·T)² score matrix; 0: always dense"},
    )


@register_criterion("trime_long_loss", dataclass=TrimeLongLossConfig)
class TrimeLongLoss(TrimeLoss):
    def __init__(self, task, ce_warmup_ratio, ce_warmup_updates, max_update, sentence_avg, memory_block_size):
        super().__init__(task, ce_warmup_ratio, ce_warmup_updates, max_update, sentence_avg)
        if memory_block_size < 0:
            raise ValueError(f"--memory-block-size must be >= 0, got {memory_block_size}")
        self.memory_block_size = memory_block_size
        batching = getattr(getattr(task, "args", None), "batching", None)
        if batching == "shuffled":  # fairseq's order never holds runs
            raise ValueError(
                "trime_long_loss reads each batch as runs of consecutive segments: use "
                f"--batching consecutive --consecutive-segments m (got --batching {batching})"
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
        bsz, tsz, dim = keys.shape
        if self.memory_block_size == 0 or m * tsz <= self.memory_block_size:
            return super().training_memory(keys, target, valid, sample)
        if bsz % m != 0:
            raise ValueError(f"batch of {bsz} segments does not split into runs of {m}")
        shape = (bsz // m, m * tsz)
        stream_keys = keys.reshape(*shape, dim)
        stream_target = target.reshape(shape)
        return causal_target_memory(
            stream_keys, stream_keys, stream_target, valid.reshape(shape), stream_target,
            scale=dot_scale(dim), block_size=self.memory_block_size,
        )
