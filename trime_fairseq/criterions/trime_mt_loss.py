"""``trime_mt_loss``: TRIME's objective for translation (§5.4, Appendix B).

For the target token at position t of sentence s the memory is every target position
of the *other* sentences of the batch -- keys g (input of the last decoder
feed-forward block), values the target tokens (EOS included, never padding) -- and no
entry of the sentence itself (translation is a sentence-level task: no local or
long-term memory). Token logits and the similarities g·g'/(√d·τ_train) share one
softmax (Eq. 5), gradients flow into every key. With ``--batching bm25``
(``trime_translation``) the other sentences of a batch are the ones whose targets
are lexically close (BM25). The math is
:class:`~trime_fairseq.criterions.trime_loss.TrimeLoss`'s; the memory is
:func:`~trime_fairseq.memory.cross_segment.cross_segment_memory` with no row keeping
its own entries (the same source as ``trime_ext_loss``'s).

Two options bound the memory's share of Eq. 5's numerator, as TRIME's released MT code
does (its README trains IWSLT'14 with ``--temp 10.0 --topk-mem 8``; the paper's text gives
neither): ``--train-memory-temperature`` τ_train divides the similarities, and
``--train-memory-topk K`` keeps, per target position, only the K highest-scoring entries of
the other sentences (the rest leave both numerator and normaliser; gradients reach the kept
entries). With every entry at τ_train = 1 (the defaults: Eq. 5 as the paper writes it) the
~B·T entries of lexically similar sentences carry most targets' probability, so the target's
token logit receives almost no gradient (it is scaled by the token head's share of the
numerator) and the token distribution starves: docs/results_mt.md, "Why TRIME-MT collapsed".

``--forward-chunks C`` splits each batch into C sub-batches of sentences of similar lengths for the
model's forward pass, each cropped to its own longest source and target; the memory still spans the
whole batch (the keys of every chunk are put back in the batch's order before it is built), so the loss
and its gradients are the one-forward ones (a transformer treats each sentence alone; with dropout the
masks differ, not their distribution). A BM25 batch gathers sentences by content, not length: about half
of its padded tokens are padding (Multi30k, ``--bm25-fill real --max-tokens 3880``: 44% of the source and
target tokens are real, against 94% in fairseq's length-sorted batches; benchmarks/bench_mt_forward_chunks.py),
and the forward computes them all.

Cross-entropy warm-up and logging as ``trime_loss`` (``in_memory``: share of target
tokens found among the other sentences' targets). ``--memory-across-workers``: the
other sentences of every data-parallel worker's batch of the step join the memory
(detached), as the released TRIME-MT code all-gathers them.
"""

from dataclasses import dataclass, field

import torch
from fairseq.criterions import register_criterion

from trime_fairseq.criterions.trime_loss import TrimeLoss, TrimeLossConfig, is_dummy_batch
from trime_fairseq.memory.cross_segment import cross_segment_memory
from trime_fairseq.memory.sources import MemoryBatch, dot_scale, top_entries


@dataclass
class TrimeMTLossConfig(TrimeLossConfig):
    train_memory_temperature: float = field(
        default=1.0, metadata={"help": "τ_train: similarities g·g'/(√d·τ_train) in the training softmax (the "
                               "task's --memory-temperature is the evaluation's τ; TRIME's released MT code: 10)"}
    )
    train_memory_topk: int = field(
        default=0,
        metadata={"help": "K > 0: each target position's memory is only the K highest-scoring entries of the other "
                  "sentences (TRIME's released MT code: --topk-mem 8); 0: every entry (Eq. 5 as the paper writes "
                  "it). Scores the dense memory, whatever --memory-block-size"},
    )
    forward_chunks: int = field(
        default=1,
        metadata={"help": "run the model's forward on this many sub-batches of sentences of similar lengths, each "
                  "cropped to its own longest source and target (a BM25 batch is about half padding); the memory "
                  "still spans the whole batch; 1: one forward over the padded batch"},
    )
    memory_block_size: int = field(
        default=4096,
        metadata={"help": "batches of more than this many target positions (B·T) are scored in checkpointed "
        "query blocks instead of one dense (B·T)² score matrix; 0: always dense"},
    )


@register_criterion("trime_mt_loss", dataclass=TrimeMTLossConfig)
class TrimeMTLoss(TrimeLoss):
    SEES_OTHER_WORKERS = True  # the other workers' sentences of the step

    def __init__(self, task, ce_warmup_ratio, ce_warmup_updates, max_update, sentence_avg,
                 train_memory_temperature=1.0, memory_block_size=4096, memory_across_workers=False,
                 train_memory_topk=0, forward_chunks=1):
        super().__init__(task, ce_warmup_ratio, ce_warmup_updates, max_update, sentence_avg, memory_across_workers)
        if not train_memory_temperature > 0:
            raise ValueError(f"--train-memory-temperature must be > 0, got {train_memory_temperature}")
        if memory_block_size < 0:
            raise ValueError(f"--memory-block-size must be >= 0, got {memory_block_size}")
        if train_memory_topk < 0:
            raise ValueError(f"--train-memory-topk must be >= 0 (0: every entry), got {train_memory_topk}")
        self.memory_temperature = float(train_memory_temperature)
        self.memory_block_size = memory_block_size
        self.memory_topk = int(train_memory_topk)
        if forward_chunks < 1:
            raise ValueError(f"--forward-chunks must be >= 1, got {forward_chunks}")
        if forward_chunks > 1 and getattr(task.cfg, "left_pad_target", False):
            raise ValueError("--forward-chunks crops right-padded targets: it needs --left-pad-target False")
        self.forward_chunks = int(forward_chunks)

    def forward_outputs(self, model, sample):
        """TrimeLoss's outputs, from one forward per length chunk with ``--forward-chunks``: the scores (B·T,)
        and keys (B, T, d) of every chunk put back at their sentences' rows (zero at padding, which no loss term
        and no memory entry reads)."""
        target = sample["target"]  # (B, T)
        if self.forward_chunks == 1 or target.size(0) < 2:
            return super().forward_outputs(model, sample)
        bsz, tsz = target.shape
        score = lse = keys = None
        for rows, chunk in length_chunks(sample, self.forward_chunks, self.task.cfg.left_pad_source,
                                         self.padding_idx):
            chunk_score, chunk_lse, chunk_keys, chunk_target = super().forward_outputs(model, chunk)
            b, t = chunk_target.shape
            if keys is None:  # the dtypes of the one-forward outputs (scores float32 at least, keys the model's)
                score, lse = chunk_score.new_zeros(bsz, tsz), chunk_lse.new_zeros(bsz, tsz)
                keys = chunk_keys.new_zeros(bsz, tsz, chunk_keys.size(-1))
            score[rows, :t] = chunk_score.view(b, t)
            lse[rows, :t] = chunk_lse.view(b, t)
            keys[rows, :t] = chunk_keys
        return score.reshape(-1), lse.reshape(-1), keys, target

    def training_memory(self, keys, target, valid, sample) -> MemoryBatch:
        """keys (B, T, d) decoder g; target, valid (B, T): one stream of N = B·T target positions,
        each seeing the valid positions of the other sentences only."""
        bsz, _, dim = keys.shape
        own_rows = torch.zeros(bsz, dtype=torch.bool, device=keys.device)  # no entry of the sentence itself
        # the top-K needs every score: dense (1, N, M) memory (cross_segment_memory refuses sizes beyond its bound)
        block_size = 0 if self.memory_topk else self.memory_block_size
        try:
            memory = cross_segment_memory(keys, target, valid, own_rows, dot_scale(dim, self.memory_temperature),
                                          block_size, layout=self.worker_layout(keys),
                                          withdrawn=is_dummy_batch(sample))
        except ValueError as e:
            if not self.memory_topk:
                raise
            raise ValueError(f"--train-memory-topk scores the dense memory, which this batch cannot hold ({e}); "
                             "lower --max-tokens (--memory-block-size does not apply to the top-K)") from e
        return top_entries(memory, self.memory_topk) if self.memory_topk else memory  # (1, N, min(K, M))


def length_chunks(sample, chunks: int, left_pad_source: bool, pad: int):
    """Split a translation batch into at most ``chunks`` sub-batches of equally many sentences, by target then
    source length, each cropped to its own longest target and source: yields (rows (b,) of the batch, sub-sample
    with ``net_input`` and ``target``)."""
    net_input, target = sample["net_input"], sample["target"]  # target, prev_output_tokens: (B, T), right-padded
    tgt_len = target.ne(pad).sum(1)
    src_len = net_input["src_lengths"]
    order = torch.argsort(tgt_len * (int(src_len.max()) + 1) + src_len, descending=True)
    for rows in order.tensor_split(min(chunks, len(order))):
        t, s = int(tgt_len[rows].max()), int(src_len[rows].max())
        src = net_input["src_tokens"][rows]
        src = src[:, src.size(1) - s:] if left_pad_source else src[:, :s]
        yield rows, {"net_input": {"src_tokens": src, "src_lengths": src_len[rows],
                                   "prev_output_tokens": net_input["prev_output_tokens"][rows, :t]},
                     "target": target[rows, :t]}
