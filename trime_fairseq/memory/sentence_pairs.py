"""SK-MT's per-sentence memory: the ``SENTENCE_PAIRS`` part (Dai et al. 2023).

Entries. A sentence's memory is the target positions of the training pairs BM25 retrieved for its
source (``trime-retrieve-pairs``, :mod:`trime_fairseq.data.retrieved_pairs`; the first ``--sk-m`` of
them), forced-decoded by the translation model itself: key = the decoder's f (the input of its output
layer, kNN-MT's key) at a target position, value = the target token there (EOS included). Raw score
−‖q − k‖²; a query sees only its own sentence's entries and keeps its K best, exactly (torch top-k,
no index). Only training pairs, retrieved by source, are ever entries: the reference of the sentence
being translated is never read (on the training split a sentence does not retrieve itself).

When the keys are computed. At test time, batched, for the batch being translated: the task's
``inference_step`` -- which ``fairseq-generate``, ``--score-reference`` and ``trime-tune-mt`` all
call once per batch, before the model sees it -- hands the batch to :meth:`SentencePairMemory.prepare`,
which forced-decodes the batch's retrieved pairs (each distinct pair once) and lays their entries out
as a bank (B, M, ·) indexed by the batch's row. No training-set datastore is built or stored: the
paper's point (a sentence's memory is a few hundred entries; the model computes them in one forward
pass of m·B short pairs) and it keeps the keys those of the very model that decodes, whatever its
weights or --fp16.

Rows. fairseq's SequenceGenerator expands the batch to B·beam rows, then shrinks and reorders them as
sentences finish (``reorder_encoder_out`` with its ``new_order``); the step driver sees only the live
rows. Which sentence a row belongs to therefore travels *with the rows*, through what fairseq itself
reorders: :func:`attach_sentence_rows` makes the encoder add ``encoder_out["trime_sentence_rows"]`` =
[arange(B)] (the batch row of every source sentence), makes its ``reorder_encoder_out`` carry that
tensor through every ``new_order`` (the expansion to beams, each step's reordering and shrinking), and
makes the decoder copy the rows it decoded for into its output's ``extra`` (B', ) -- read by both
drivers (:func:`sentence_rows`). Nothing is inferred from positions or kept in a side table that
could fall out of step. The encoder refuses a batch other than the one the bank was prepared for (a
caller that skipped ``inference_step``), so a stale bank is an error, never another sentence's memory.
"""

import copy
from dataclasses import dataclass
from typing import List, Optional

import numpy as np
import torch
from torch import Tensor

from trime_fairseq.memory.keys import TRIME_FEATURE, get_keys
from trime_fairseq.memory.mixing import fp32
from trime_fairseq.memory.sources import MemoryBatch

#: the batch row of every decoded row: encoder_out[SENTENCE_ROWS] = [(B',) long], extra[SENTENCE_ROWS] (B',)
SENTENCE_ROWS = "trime_sentence_rows"


def sentence_rows(extra) -> Tensor:
    """The batch row (B',) of every row of a decoder output (its ``extra``)."""
    rows = extra.get(SENTENCE_ROWS) if isinstance(extra, dict) else None
    if rows is None:
        raise ValueError("the decoder output says nothing of which sentence its rows belong to: the model needs "
                         "attach_sentence_rows (the trime_translation task does it for --eval-memory sk_mt)")
    return rows


@dataclass
class Bank:
    """The entries of one batch's sentences, padded: keys (B, M, d), values (B, M) long, mask (B, M) bool."""

    src_tokens: Tensor  # (B, S) the batch it was prepared for
    keys: Tensor
    values: Tensor
    mask: Tensor


class SentencePairMemory:
    """Each sentence's forced-decoded retrieved training pairs (see the module docstring)."""

    key_type = TRIME_FEATURE

    def __init__(self, pairs, train, m: Optional[int] = None, path: str = "the retrieval file",
                 chunk_pairs: int = 128, chunk_entries: int = 1 << 24):
        """``pairs``: the split's retrieval file (a :class:`~trime_fairseq.data.retrieved_pairs.RetrievedPairs`, read and checked by the caller against the split); ``train``: the
        training split's LanguagePairDataset (its ids are the file's); ``m``: pairs per sentence (None: all)."""
        if m is not None and m > pairs.m:
            raise ValueError(f"--sk-m {m} asks for more pairs than {path} retrieved per sentence "
                                      f"({pairs.m}): rebuild it with trime-retrieve-pairs --m {m}")
        pairs.check_training(train.src, path)
        self.pairs, self.train, self.path = pairs, train, path
        self.m = pairs.m if m is None else m
        self.pad = train.tgt_dict.pad()
        self.chunk_pairs, self.chunk_entries = chunk_pairs, chunk_entries
        self.bank: Optional[Bank] = None
        self._forcing = False

    def another(self) -> "SentencePairMemory":
        """The same retrieved pairs with a bank of its own (one per model of an ensemble: each model's keys)."""
        out = copy.copy(self)
        out.bank, out._forcing = None, False
        return out

    # -- building a batch's bank ------------------------------------------------------------------------
    def pair_ids(self, ids: Tensor) -> np.ndarray:
        """(B, m) retrieved training pair ids of split sentences ``ids`` (B,), -1: none."""
        ids = ids.cpu().numpy()
        if ids.size and (ids.min() < 0 or ids.max() >= len(self.pairs.ids)):
            raise ValueError(f"sentence ids {ids.min()}..{ids.max()} outside the {len(self.pairs.ids)} "
                                      f"sentences of {self.path}")
        return self.pairs.ids[ids, :self.m]

    def forced_entries(self, model, train_ids: List[int]):
        """{training pair id: (keys (T_i, d), values (T_i,))}: the model's f at every target position of each
        pair, teacher-forced, in batches of ``chunk_pairs``."""
        device = next(model.parameters()).device
        out = {}
        self._forcing = True
        try:
            for start in range(0, len(train_ids), self.chunk_pairs):
                chunk = train_ids[start:start + self.chunk_pairs]
                batch = self.train.collater([self.train[i] for i in chunk])
                net_input = {k: v.to(device) for k, v in batch["net_input"].items() if torch.is_tensor(v)}
                with torch.no_grad():
                    keys = get_keys(model(**net_input), self.key_type)  # (b, T, d)
                target = batch["target"].to(device)
                real = target.ne(self.pad)
                for r, i in enumerate(batch["id"].tolist()):
                    out[i] = (keys[r][real[r]], target[r][real[r]])
        finally:
            self._forcing = False
        return out

    def prepare(self, model, sample) -> Bank:
        """Build the bank of ``sample``'s sentences (its ``id``: sentence ids of the split of the file)."""
        src = sample["net_input"]["src_tokens"]
        pair_ids = self.pair_ids(sample["id"])  # (B, m)
        forced = self.forced_entries(model, sorted(set(pair_ids[pair_ids >= 0].tolist())))
        per_sentence = [[forced[i] for i in row if i >= 0] for row in pair_ids.tolist()]
        lengths = [sum(len(v) for _, v in entries) for entries in per_sentence]
        bsz, size = len(per_sentence), max(lengths + [1])
        some = next((k for entries in per_sentence for k, _ in entries), None)
        dim = some.size(-1) if some is not None else 1
        like = some if some is not None else fp32(src.new_zeros(1, dtype=torch.float))
        keys = like.new_zeros(bsz, size, dim)
        values = src.new_full((bsz, size), self.pad)
        mask = torch.zeros(bsz, size, dtype=torch.bool, device=src.device)
        for b, entries in enumerate(per_sentence):
            if entries:
                keys[b, :lengths[b]] = torch.cat([k for k, _ in entries])
                values[b, :lengths[b]] = torch.cat([v for _, v in entries])
                mask[b, :lengths[b]] = True
        self.bank = Bank(src, keys, values, mask)
        return self.bank

    def check_batch(self, src_tokens: Tensor) -> None:
        """Refuse to encode a batch the bank was not prepared for (the encoder calls it)."""
        if self._forcing:
            return
        bank = self.bank
        if bank is None or bank.src_tokens.shape != src_tokens.shape or not torch.equal(
                bank.src_tokens, src_tokens.to(bank.src_tokens.device)):
            raise RuntimeError("--eval-memory sk_mt: this batch's per-sentence memory was not prepared; the task's "
                               "inference_step prepares it (fairseq-generate and trime-tune-mt call it)")

    # -- search ---------------------------------------------------------------------------------------------
    def search(self, queries: Tensor, rows: Tensor, k: int) -> MemoryBatch:
        """The ``k`` nearest entries of each query's own sentence: queries (n, d), rows (n,) batch rows ->
        MemoryBatch (n, min(k, M)): raw scores −‖q − k_j‖² (−inf where hidden), values, mask; exact."""
        bank = self.bank
        if bank is None:
            raise RuntimeError("--eval-memory sk_mt: no per-sentence memory was prepared (the task's inference_step)")
        if rows.numel() and int(rows.max()) >= bank.mask.size(0):
            raise RuntimeError(f"a decoded row belongs to sentence {int(rows.max())} of a batch of "
                               f"{bank.mask.size(0)}: the bank is another batch's")
        n, size = rows.numel(), bank.mask.size(1)
        kk = min(k, size)
        scores = fp32(queries).new_empty(n, kk)
        index = rows.new_empty(n, kk)
        step = max(1, self.chunk_entries // max(size * bank.keys.size(-1), 1))
        for a in range(0, n, step):  # (step, M, d) differences at a time
            r = rows[a:a + step]
            diff = fp32(queries[a:a + step]).unsqueeze(1) - fp32(bank.keys[r]).to(scores.dtype)  # (s, M, d)
            raw = -(diff * diff).sum(-1)  # (s, M)
            top = raw.masked_fill(~bank.mask[r], float("-inf")).topk(kk, dim=-1)
            scores[a:a + step], index[a:a + step] = top.values, top.indices
        mask = bank.mask[rows].gather(1, index)
        return MemoryBatch(scores.masked_fill(~mask, float("-inf")), bank.values[rows].gather(1, index), mask)


def attach_sentence_rows(model) -> None:
    """Make ``model`` carry each row's sentence (see the module docstring; idempotent). The encoder checks the
    batch against the bank of the memory the model is routed through (``model.trime_eval_memory``), if it
    reads one."""
    encoder, decoder = model.encoder, model.decoder
    if getattr(encoder, "_trime_sentence_rows", False):
        return
    encoder._trime_sentence_rows = True
    forward, reorder, decode = encoder.forward, encoder.reorder_encoder_out, decoder.forward

    # instance attributes, not hooks: fairseq's generator calls encoder.forward_torchscript -> self.forward and
    # decoder.forward directly
    def forward_with_rows(*args, **kwargs):
        src_tokens = kwargs["src_tokens"] if "src_tokens" in kwargs else args[0]
        memory = getattr(getattr(model, "trime_eval_memory", None), "sentence_pairs", None)
        if memory is not None:
            memory.check_batch(src_tokens)
        out = forward(*args, **kwargs)
        out[SENTENCE_ROWS] = [torch.arange(src_tokens.size(0), device=src_tokens.device)]
        return out

    def reorder_with_rows(encoder_out, new_order):
        out = reorder(encoder_out, new_order)
        rows = encoder_out.get(SENTENCE_ROWS)
        if rows:
            out[SENTENCE_ROWS] = [rows[0].index_select(0, new_order.to(rows[0].device))]
        return out

    def decode_with_rows(prev_output_tokens, encoder_out=None, *args, **kwargs):
        out = decode(prev_output_tokens, encoder_out, *args, **kwargs)
        rows = encoder_out.get(SENTENCE_ROWS) if isinstance(encoder_out, dict) else None
        if rows and isinstance(out, tuple) and len(out) > 1 and isinstance(out[1], dict):
            out[1][SENTENCE_ROWS] = rows[0]
        return out

    encoder.forward, encoder.reorder_encoder_out, decoder.forward = forward_with_rows, reorder_with_rows, \
        decode_with_rows
