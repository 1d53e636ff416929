"""``trime_ext_loss``: TRIME's objective with in-batch "external" memory (TRIMELM_ext, §4.3).

Batches come from ``--batching bm25`` (lexically similar segments side by side,
m = 1). The training memory of the token at position t of segment s is

* every token (key g, value = next token) of every OTHER segment of the batch,
  all positions with a real target, fully visible (no causality between
  different segments), plus
* the local memory of s: its positions j < t,

except that, for every segment independently, with probability p
(``--local-drop-prob``, paper: p = 0.9, Appendix E / Table 13) the local memory
is dropped for that step: the segment's tokens then see the other segments
only. Gradients flow into every memory key. The math (token term + memory in
one softmax, Eq. 5) is :class:`~trime_fairseq.criterions.trime_loss.TrimeLoss`'s;
only :meth:`TrimeExtLoss.training_memory` differs. The batch (B, T) is read as
one stream of N = B·T positions with an (N, N) visibility mask.

Randomness: the drop pattern of a forward pass comes from its own
``torch.Generator`` seeded with (``--seed``, update number, data-parallel rank,
forward count within the update), so a run (and a resumed run) is reproducible,
workers and gradient-accumulation steps draw independently, and the global torch
RNG (dropout) is untouched. Nothing is dropped when the criterion is not
training (validation: fairseq's trainer switches the criterion with the model),
since evaluation uses the local memory.

Memory bound: the dense path holds (N, N) scores and masks. Batches with
N > ``--memory-block-size`` are scored in checkpointed query blocks (target-only
summaries, :func:`~trime_fairseq.memory.blockwise.summary_batch`): peak
(block, N) per block, forward and backward. With ``--memory-block-size 0``
(always dense) batches beyond :data:`MAX_DENSE_POSITIONS` positions are refused.

Memory across workers: none (as in ``trime_long_loss``): a worker's memory is
its own batch. The paper all-gathers the segments of the GPUs of one step; here a
worker's batch should hold several segments (configs/trime_ext: 4 per forward,
the same 12,288 memory tokens as the paper's 4 GPUs × 3,072).
"""

import logging
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch
from torch import Tensor
from fairseq import metrics, utils
from fairseq.criterions import register_criterion
from omegaconf import II

from trime_fairseq.criterions.trime_loss import TrimeLoss, TrimeLossConfig
from trime_fairseq.memory.cross_segment import MAX_DENSE_POSITIONS  # noqa: F401 (re-exported)
from trime_fairseq.memory.cross_segment import cross_segment_memory
from trime_fairseq.memory.sources import MemoryBatch, dot_scale

logger = logging.getLogger(__name__)

@dataclass
class TrimeExtLossConfig(TrimeLossConfig):
    local_drop_prob: float = field(
        default=0.9,
        metadata={"help": "probability that a segment's local memory is dropped for a step (its tokens then "
        "see the other segments of the batch only; paper: 0.9). Never dropped outside training"},
    )
    memory_block_size: int = field(
        default=2048,
        metadata={"help": "batches of more than this many positions (B·T) are scored in checkpointed query "
        "blocks of this size instead of one dense (B·T)² score matrix; 0: always dense"},
    )
    seed: int = II("common.seed")


@register_criterion("trime_ext_loss", dataclass=TrimeExtLossConfig)
class TrimeExtLoss(TrimeLoss):
    def __init__(self, task, ce_warmup_ratio, ce_warmup_updates, max_update, sentence_avg,
                 local_drop_prob=0.9, memory_block_size=2048, seed=1):
        super().__init__(task, ce_warmup_ratio, ce_warmup_updates, max_update, sentence_avg)
        p = float(local_drop_prob)
        if not 0.0 <= p <= 1.0:  # also refuses NaN
            raise ValueError(f"--local-drop-prob must lie in [0, 1], got {local_drop_prob}")
        if memory_block_size < 0:
            raise ValueError(f"--memory-block-size must be >= 0, got {memory_block_size}")
        self.local_drop_prob = p
        self.memory_block_size = memory_block_size
        self.seed = int(seed) if seed is not None else 1
        self._draw_update: Optional[int] = None
        self._draw_count = 0
        self._last_dropped = 0
        batching = getattr(getattr(task, "args", None), "batching", None)
        if batching is not None and batching != "bm25":
            logger.warning(
                f"trime_ext_loss is meant for --batching bm25 (lexically similar segments share a batch, "
                f"TRIMELM_ext §4.3); with --batching {batching} the other segments of a batch are unrelated"
            )

    # -- the drop pattern ------------------------------------------------------------------------

    @staticmethod
    def _rank() -> int:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank()
        return 0

    def draw_local_drop(self, bsz: int) -> Tensor:
        """(bsz,) bool, True where a segment's local memory is dropped for this forward pass.

        Seeded by (seed, update number, rank, forward count within the update): reproducible,
        different across updates, workers and accumulation steps. Tests may replace this method.
        """
        if not self.training or self.local_drop_prob == 0.0:
            return torch.zeros(bsz, dtype=torch.bool)
        if self._draw_update != self.num_updates:
            self._draw_update, self._draw_count = self.num_updates, 0
        entropy = [self.seed, self.num_updates, self._rank(), self._draw_count]
        self._draw_count += 1
        state = np.random.SeedSequence(entropy).generate_state(2, dtype=np.uint32)
        generator = torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))
        return torch.rand(bsz, generator=generator, dtype=torch.float64) < self.local_drop_prob

    # -- memory ----------------------------------------------------------------------------------

    def training_memory(self, keys, target, valid, sample) -> MemoryBatch:
        """One stream of N = B·T positions: MemoryBatch (1, N, M) with M = N (dense) or 2 (blockwise)."""
        bsz, tsz, dim = keys.shape
        dropped = self.draw_local_drop(bsz)
        if dropped.shape != (bsz,) or dropped.dtype != torch.bool:
            raise ValueError(f"the local drop pattern must be a ({bsz},) bool tensor, got {tuple(dropped.shape)} "
                             f"{dropped.dtype}")
        self._last_dropped = int(dropped.sum())
        return cross_segment_memory(keys, target, valid, ~dropped, dot_scale(dim), self.memory_block_size)

    # -- logging ---------------------------------------------------------------------------------

    def forward(self, model, sample, reduce=True):
        loss, sample_size, logging_output = super().forward(model, sample, reduce)
        logging_output["local_dropped"] = self._last_dropped
        return loss, sample_size, logging_output

    @staticmethod
    def reduce_metrics(logging_outputs) -> None:
        TrimeLoss.reduce_metrics(logging_outputs)
        segments = utils.item(sum(log.get("nsentences", 0) for log in logging_outputs))
        if segments > 0:
            dropped = utils.item(sum(log.get("local_dropped", 0) for log in logging_outputs))
            metrics.log_scalar("local_dropped", dropped / segments, segments, round=3)

    @staticmethod
    def logging_outputs_can_be_summed() -> bool:
        return True
