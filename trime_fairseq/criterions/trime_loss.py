"""``trime_loss``: TRIME's training objective with local memory (Eq. 5).

For the target at position t of a segment the memory is
{(g(c_j), x_{j+1}) : j < t in the same segment}; token logits and memory
similarities sim(q, k) = q·k/√d share one softmax, and gradients flow into
every memory representation. Subclasses change only which in-batch entries a
position sees (:meth:`TrimeLoss.training_memory`).

``--memory-across-workers`` (trime_long_loss, trime_ext_loss, trime_mt_loss): the in-batch memory
also holds the entries of every other data-parallel worker's batch of the step,
all-gathered and detached (:mod:`trime_fairseq.memory.gathered`); the criterion
says which of them each query sees. TRIMELM's local memory never lies on another
worker, so trime_loss refuses the option.
"""

import math
from dataclasses import dataclass, field
from typing import Optional

from fairseq import metrics, utils
from fairseq.criterions import FairseqCriterion, register_criterion
from fairseq.dataclass import FairseqDataclass
from omegaconf import II

from trime_fairseq.memory.gathered import DUMMY_BATCH, WorkerLayout, data_parallel_layout, require_data_parallel
from trime_fairseq.memory.keys import ensure_key_capture, get_keys
from trime_fairseq.memory.mixing import joint_target_log_prob
from trime_fairseq.memory.sources import MemoryBatch, causal_memory, dot_scale
from trime_fairseq.memory.token_scores import target_token_scores


@dataclass
class TrimeLossConfig(FairseqDataclass):
    ce_warmup_ratio: float = field(
        default=0.05,
        metadata={"help": "train with plain cross-entropy for this fraction of --max-update first (paper: 0.05)"},
    )
    ce_warmup_updates: Optional[int] = field(
        default=None,
        metadata={"help": "number of cross-entropy warm-up updates; overrides --ce-warmup-ratio"},
    )
    memory_across_workers: bool = field(
        default=False,
        metadata={"help": "the memory also holds the keys and values of every other data-parallel worker's batch "
        "of the step, all-gathered and detached (gradients only into the worker's own entries, as TRIME's code), "
        "under the criterion's rules: trime_long_loss's runs may span workers, trime_ext_loss / trime_mt_loss see "
        "the other workers' segments / sentences. Needs >= 2 workers; not trime_loss (its local memory never lies "
        "on another worker)"},
    )
    max_update: int = II("optimization.max_update")
    sentence_avg: bool = II("optimization.sentence_avg")


@register_criterion("trime_loss", dataclass=TrimeLossConfig)
class TrimeLoss(FairseqCriterion):
    #: can an entry of another worker's batch ever be visible under this criterion's memory rule?
    SEES_OTHER_WORKERS = False

    def __init__(self, task, ce_warmup_ratio, ce_warmup_updates, max_update, sentence_avg,
                 memory_across_workers=False):
        super().__init__(task)
        self.sentence_avg = sentence_avg
        self.warmup_updates = self._warmup_updates(ce_warmup_ratio, ce_warmup_updates, max_update)
        self.num_updates = 0
        self.memory_across_workers = bool(memory_across_workers)
        if self.memory_across_workers:
            if not self.SEES_OTHER_WORKERS:
                raise ValueError(
                    "--memory-across-workers has no effect with trime_loss: its memory is the earlier tokens of the "
                    "position's own segment (TRIMELM's local memory), never on another worker; use trime_long_loss "
                    "(runs of consecutive segments across workers) or trime_ext_loss (the other segments of the step)"
                )
            require_data_parallel("--memory-across-workers")
        if self.warmup_updates > 0 and not hasattr(task, "trime_memory_options"):
            raise ValueError(
                "the cross-entropy warm-up needs --task trime_lm (it tells the criterion the "
                "update number); use it, or set --ce-warmup-updates 0"
            )

    @staticmethod
    def _warmup_updates(ratio: float, updates: Optional[int], max_update: int) -> int:
        if updates is not None:
            if updates < 0:
                raise ValueError(f"--ce-warmup-updates must be >= 0, got {updates}")
            return updates
        if not 0.0 <= ratio < 1.0:
            raise ValueError(f"--ce-warmup-ratio must lie in [0, 1), got {ratio}")
        if ratio > 0 and (max_update is None or max_update <= 0):
            raise ValueError(
                "--ce-warmup-ratio is a fraction of --max-update, which is not set; "
                "set --max-update or give --ce-warmup-updates"
            )
        return int(round(ratio * max_update)) if ratio > 0 else 0

    def set_num_updates(self, num_updates: int) -> None:
        self.num_updates = num_updates

    @property
    def in_warmup(self) -> bool:
        return self.training and self.num_updates < self.warmup_updates

    def segments_per_stream(self, sample) -> int:
        """How many consecutive batch rows form one memory stream (local memory: 1)."""
        return 1

    def training_memory(self, keys, target, valid, sample) -> MemoryBatch:
        """In-batch memory for every position: MemoryBatch of shape (R, S, M).

        keys: (B, T, d) g of every position; target, valid: (B, T).
        Rows are grouped into R = B/m streams of S = m·T positions.
        """
        m = self.segments_per_stream(sample)
        bsz, tsz, dim = keys.shape
        check_whole_runs(bsz, m)
        shape = (bsz // m, m * tsz)
        return causal_memory(
            queries=keys.reshape(*shape, dim),
            keys=keys.reshape(*shape, dim),
            values=target.reshape(shape),
            valid=valid.reshape(shape),
            scale=dot_scale(dim),
        )

    def worker_layout(self, keys) -> WorkerLayout:
        """Rows and positions of every worker's batch (one collective with ``--memory-across-workers``)."""
        bsz, tsz, _ = keys.shape
        return data_parallel_layout(bsz, tsz, keys.device, distributed=self.memory_across_workers)

    def token_losses(self, model, sample, with_memory: bool = True):
        """Per-position terms of one batch, each flattened to (B·T,).

        Returns (trime, ce, in_memory, valid): the TRIME loss -log P(x_t),
        the plain cross-entropy, whether the target occurs in the position's
        memory, and whether the position has a real (non-pad) target. Without
        ``with_memory`` (the cross-entropy warm-up) no memory is built and
        ``trime`` / ``in_memory`` are None.
        """
        ensure_key_capture(model)
        token_score, token_lse, keys, target = self.forward_outputs(model, sample)  # (B·T,) (B·T,) (B, T, d) (B, T)
        valid = target.ne(self.padding_idx)
        ce = token_lse - token_score
        if not with_memory:
            return None, ce, None, valid.reshape(-1)

        memory = self.training_memory(keys, target, valid, sample)
        stream_shape = memory.mask.shape[:-1]  # (R, S)
        stream_target = target.reshape(stream_shape)
        log_prob = joint_target_log_prob(
            token_score.view(stream_shape),
            token_lse.view(stream_shape),
            memory.scores,
            memory.values,
            memory.mask,
            stream_target,
        )
        in_memory = (memory.mask & (memory.values == stream_target.unsqueeze(-1))).any(-1)
        return -log_prob.reshape(-1), ce, in_memory.reshape(-1), valid.reshape(-1)

    def forward_outputs(self, model, sample):
        """The model's forward over the batch: (score of the target, log-partition of the token term), both
        (B·T,) float32, the keys g (B, T, d) and the target (B, T)."""
        net_output = model(**sample["net_input"])
        target = model.get_targets(sample, net_output)  # (B, T)
        token_score, token_lse = target_token_scores(model.decoder, net_output, target)  # (B·T,)
        return token_score, token_lse, get_keys(net_output), target

    def forward(self, model, sample, reduce=True):
        warmup = self.in_warmup  # plain cross-entropy: the memory is not even built
        trime, ce, in_memory, valid = self.token_losses(model, sample, with_memory=not warmup)
        loss_vec = ce if warmup else trime
        ntokens = int(valid.sum())
        nsentences = sample["target"].size(0)
        logging_output = {
            "loss": loss_vec.masked_fill(~valid, 0.0).sum().data,
            "ce_loss": ce.masked_fill(~valid, 0.0).sum().data,
            "ntokens": ntokens,
            "nsentences": nsentences,
            "sample_size": nsentences if self.sentence_avg else ntokens,
        }
        if not warmup:
            logging_output.update(
                trime_loss=trime.masked_fill(~valid, 0.0).sum().data,
                in_memory=(in_memory & valid).sum().data,
                trime_tokens=ntokens,
            )
        loss = loss_vec.masked_fill(~valid, 0.0).sum()
        return loss, logging_output["sample_size"], logging_output

    @staticmethod
    def reduce_metrics(logging_outputs) -> None:
        def total(key):
            return utils.item(sum(log.get(key, 0) for log in logging_outputs))

        sample_size, ntokens = total("sample_size"), total("ntokens")
        if sample_size == 0 or ntokens == 0:
            return
        metrics.log_scalar("loss", total("loss") / sample_size / math.log(2), sample_size, round=3)
        metrics.log_scalar("ce_loss", total("ce_loss") / ntokens / math.log(2), ntokens, round=3)
        trime_tokens = total("trime_tokens")
        if trime_tokens > 0:  # not during the cross-entropy warm-up
            metrics.log_scalar("trime_loss", total("trime_loss") / trime_tokens / math.log(2), trime_tokens,
                               round=3)
            metrics.log_scalar("in_memory", total("in_memory") / trime_tokens, trime_tokens, round=3)
        metrics.log_derived("ppl", lambda meters: utils.get_perplexity(meters["loss"].avg))
        metrics.log_derived("ce_ppl", lambda meters: utils.get_perplexity(meters["ce_loss"].avg))

    @staticmethod
    def logging_outputs_can_be_summed() -> bool:
        return True


def is_dummy_batch(sample) -> bool:
    """fairseq's dummy batch (``trime_lm`` / ``trime_translation`` mark it): with memory across workers
    its entries take part in the all-gather but no worker sees them."""
    return sample is not None and bool(sample.get(DUMMY_BATCH, False))


def check_whole_runs(bsz: int, m: int) -> None:
    """A worker's batch of ``bsz`` rows read as runs of m rows must hold whole runs."""
    if bsz % m != 0:
        raise ValueError(
            f"batch of {bsz} segments does not split into runs of {m} (a run longer than a worker's batch "
            "needs trime_long_loss --memory-across-workers)"
        )
