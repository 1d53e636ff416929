"""``--eval-memory sk_mt``: simple and scalable kNN-MT (SK-MT, Dai et al. 2023).

For each source sentence, BM25 on the source side retrieves its m most similar training pairs
(``trime-retrieve-pairs``, :mod:`trime_fairseq.cli.retrieve_pairs`); at generation the model
forced-decodes those pairs, and the (decoder state f, next target token) of their target positions
form a tiny datastore of that sentence alone (the ``SENTENCE_PAIRS`` part,
:mod:`trime_fairseq.memory.sentence_pairs`). Every decoding step searches it exactly for the K
nearest entries (squared L2 distance d_i, the paper's K = 2) and mixes

    p = (1 − λ)·p_MT + λ·p_kNN,   p_kNN ∝ Σ_i exp(−d_i/T)·[v_i = y],   λ = ReLU(1 − d_0/τ)

with d_0 the nearest entry's distance (the distance-aware adapter; τ = ``--sk-lambda-temperature``,
by default T as in the paper and knn-box, whose defaults K = 2, T = 100 are this mode's). A sentence
whose pairs hold no entry keeps p_MT.

λ is capped at ``--sk-max-lambda`` (default 0.99; 1 = the formula as written). At λ = 1 (d_0 = 0: the
hypothesis repeats a retrieved pair's state exactly, which Multi30k's duplicate sentences do) every token
outside the K retrieved values gets probability 0, EOS included; fairseq's beam search then carries
hypotheses of score −inf that can never end and stops with ``assert step < max_len`` (measured on
Multi30k valid with K = 1, T = τ = 10). The cap keeps every token possible.

Commands (a language pair binarized by fairseq-preprocess; one retrieval file per evaluated split)::

    trime-retrieve-pairs --data data-bin/multi30k --source-lang de --target-lang en --split test \\
        --m 16 --output data-bin/multi30k/sk-pairs/test.npz
    fairseq-generate data-bin/multi30k --user-dir trime_fairseq --task trime_translation \\
        --path ckpt.pt --gen-subset test --beam 5 --remove-bpe --eval-memory sk_mt \\
        --sk-pairs data-bin/multi30k/sk-pairs/test.npz --knn-k 2 --knn-temperature 100
    trime-tune-mt data-bin/multi30k --user-dir trime_fairseq --task trime_translation \\
        --path ckpt.pt --gen-subset valid --beam 5 --remove-bpe --eval-memory sk_mt \\
        --sk-pairs data-bin/multi30k/sk-pairs/valid.npz --ks 1,2,4 --knn-temperatures 10,100 \\
        --sk-lambda-temperatures 10,100
"""

from dataclasses import dataclass
from typing import Tuple

import torch
from torch import Tensor

from trime_fairseq.memory.composition import SENTENCE_PAIRS
from trime_fairseq.memory.modes.registry import Mode, Step, TermOf, inverse, register_mode
from trime_fairseq.memory.sources import MemoryBatch


@dataclass(frozen=True)
class DistanceLambda:
    """SK-MT's distance-aware λ, a :data:`~trime_fairseq.memory.composition.StepRule`: the step's entries
    (Q, M), scored −d_i/T, are q's entries as they are; λ = ReLU(1 − d_0/τ) (Q,) with d_0 = −T·(the best
    visible score), 0 for a row without a visible entry (which keeps p anyway)."""

    temperature: float  # T: the entries' scores are −d/T
    lambda_temperature: float  # τ
    max_lambda: float = 1.0  # λ is capped here (--sk-max-lambda)

    def __call__(self, entries: MemoryBatch) -> Tuple[MemoryBatch, Tensor]:
        scores = entries.scores.masked_fill(~entries.mask, float("-inf"))  # (Q, M)
        best = scores.max(-1).values if scores.size(-1) else scores.new_full(scores.shape[:1], float("-inf"))
        has = torch.isfinite(best)  # (Q,)
        d0 = torch.where(has, -best * self.temperature, torch.zeros_like(best))
        lam = torch.relu(1.0 - d0 / self.lambda_temperature).clamp(max=self.max_lambda)
        return entries, torch.where(has, lam, torch.zeros_like(lam))


@register_mode
class SkMt(Mode):
    name = "sk_mt"
    help = ("SK-MT: kNN-MT over the forced-decoded training pairs BM25 retrieved for each source sentence "
            "(--sk-pairs), λ from the nearest distance")
    steps = (Step((TermOf(SENTENCE_PAIRS, inverse("knn_temperature")),), adaptive=True),)
    flag_defaults = {"knn_k": 2, "knn_temperature": 100.0}  # the paper's / knn-box's
    decoding_axes = ("knn_k", "knn_temperature", "sk_lambda_temperature")
    without_local = True
    own_options = ("sk_lambda_temperature", "sk_max_lambda")
    rule_text = "λ = ReLU(1 − d_0/τ_λ), d_0 the nearest entry's squared L2 distance (τ_λ: T unless given)"

    def step_rule(self, options, dim):
        tau = options.sk_lambda_temperature
        return DistanceLambda(options.knn_temperature, options.knn_temperature if tau is None else tau,
                              options.sk_max_lambda)
