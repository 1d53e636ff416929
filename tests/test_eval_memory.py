"""Evaluation memory behind get_normalized_probs: Eq. 6 and the continuous cache
against naive loops, through fairseq's own SequenceScorer (the scorer of fairseq-eval-lm)."""

import math

import pytest
import torch
from fairseq.sequence_scorer import SequenceScorer
from tiny_models import lm_sample, tiny_lm, tiny_task

from trime_fairseq.memory.eval_memory import MemoryOptions
from trime_fairseq.memory.keys import TRIME_FEATURE, TRIME_KEY
from trime_fairseq.memory.mixing import interpolate, joint_log_probs, memory_log_probs
from trime_fairseq.memory.sources import causal_memory
from trime_fairseq.tasks.trime_lm import memory_options


def scored(model, task, sample, softmax_batch=None):
    """(B, T) log-probabilities of the targets as fairseq-eval-lm computes them."""
    scorer = SequenceScorer(task.target_dictionary, softmax_batch=softmax_batch)
    hypos = scorer.generate([model], {k: v for k, v in sample.items()})
    return torch.cat([h[0]["positional_scores"] for h in hypos])  # padding stripped per row


def context_window_sample(task, bsz=2, context=4, tsz=9):
    """Like LMContextWindowDataset: the first ``context`` targets are padding."""
    sample = lm_sample(task, bsz=bsz, tsz=tsz, seed=3)
    sample["target"][:, :context] = task.dictionary.pad()
    sample["start_indices"] = [context] * bsz
    return sample


def naive_log_probs(logits, keys, src, pad, mode, tau=1.0, lam=0.0, theta=1.0, window=None):
    """Explicit per-position distributions over the vocabulary; memory = earlier row positions
    j with value src[j+1]. logits: (B, T, V) full-softmax logits; keys: (B, T, d)."""
    bsz, tsz, vocab = logits.shape
    d = keys.size(-1)
    out = torch.zeros(bsz, tsz, vocab, dtype=torch.float64)
    for b in range(bsz):
        for t in range(tsz):
            p_tok = torch.exp(logits[b, t])
            mem = torch.zeros(vocab, dtype=torch.float64)
            for j in range(t):
                if window is not None and t - j > window:
                    continue
                value = int(src[b, j + 1])
                if value == pad:
                    continue
                if mode == "trime":
                    mem[value] += torch.exp(torch.dot(keys[b, t], keys[b, j]) / (math.sqrt(d) * tau))
                else:
                    mem[value] += torch.exp(theta * torch.dot(keys[b, t], keys[b, j]))
            if mode == "trime":
                p = (p_tok + mem) / (p_tok.sum() + mem.sum())
            elif mem.sum() > 0:
                p = (1 - lam) * p_tok / p_tok.sum() + lam * mem / mem.sum()
            else:
                p = p_tok / p_tok.sum()
            out[b, t] = p.log()
    return out


def forward(model, sample):
    with torch.no_grad():
        return model(**sample["net_input"])


@pytest.mark.parametrize("with_context", [False, True])
@pytest.mark.parametrize(
    "options",
    [dict(eval_memory="trime", memory_temperature=0.7), dict(eval_memory="cache", cache_lambda=0.3, cache_theta=0.5, cache_size=3)],
)
def test_eval_lm_scores_equal_naive_reference(options, with_context):
    task = tiny_task(**options)
    model = tiny_lm(task).eval()
    sample = context_window_sample(task) if with_context else lm_sample(task, seed=4)
    net_output = forward(model, sample)
    opt = task.trime_memory_options
    key = net_output[1][TRIME_KEY if opt.mode == "trime" else TRIME_FEATURE]
    reference = naive_log_probs(
        net_output[0], key, sample["net_input"]["src_tokens"], task.dictionary.pad(), opt.mode,
        tau=opt.memory_temperature, lam=opt.cache_lambda, theta=opt.cache_theta, window=opt.cache_size,
    )
    target = sample["target"]
    expected = reference.gather(2, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    ours = scored(model, task, sample)
    start = sample.get("start_indices", [0] * target.size(0))[0]
    torch.testing.assert_close(ours, expected[:, start:].reshape(-1))  # scorer strips the context
    plain = scored(tiny_lm(tiny_task()).eval(), task, sample)
    assert not torch.allclose(ours, plain.to(ours.dtype)), "memory must change the scores"


@pytest.mark.parametrize("mode", ["trime", "cache"])
@pytest.mark.parametrize("adaptive", [False, True])
def test_softmax_batch_chunks_equal_whole_batch(mode, adaptive):
    task = tiny_task(eval_memory=mode)
    model = tiny_lm(task, adaptive=adaptive).eval()
    sample = lm_sample(task, bsz=3, tsz=10, pad_last=3)
    whole = scored(model, task, sample)
    for chunk in (1, 7, 13):  # chunks that straddle rows
        torch.testing.assert_close(scored(model, task, sample, softmax_batch=chunk), whole)


@pytest.mark.parametrize(
    "options",
    [
        MemoryOptions("none"),
        MemoryOptions("trime", memory_temperature=0.5),
        MemoryOptions("cache", cache_lambda=0.2, cache_theta=0.4, cache_size=4),
    ],
)
@pytest.mark.parametrize("adaptive", [False, True])
def test_target_only_scoring_equals_full_distribution(options, adaptive):
    """The tuner's target-only path gives exactly what get_normalized_probs gives."""
    task = tiny_task(eval_memory="trime")
    model = tiny_lm(task, adaptive=adaptive).eval()
    memory = model.trime_eval_memory
    sample = lm_sample(task, bsz=2, tsz=8)
    net_output = forward(model, sample)
    fast = memory.target_log_probs(model.decoder, net_output, sample, options)
    from trime_fairseq.memory.eval_memory import EvalMemory

    full = EvalMemory(options, task.dictionary.pad()).log_probs(model.decoder, net_output, sample)
    torch.testing.assert_close(fast, full.gather(2, sample["target"].unsqueeze(-1)).squeeze(-1))


def test_full_vocabulary_mixing_sums_to_one_and_matches_dense_form():
    torch.manual_seed(0)
    q, m, v = 5, 7, 11
    token = torch.randn(q, v, dtype=torch.float64)
    scores = torch.randn(q, m, dtype=torch.float64)
    values = torch.randint(0, v, (q, m))
    mask = torch.rand(q, m) > 0.3
    mask[2] = False  # a row with no memory
    joint = joint_log_probs(token, token.logsumexp(-1), scores, values, mask)
    dense = torch.zeros(q, v, dtype=torch.float64)
    dense.scatter_add_(1, values, scores.exp() * mask)
    expected = (token.exp() + dense).log() - (token.exp().sum(-1) + (scores.exp() * mask).sum(-1)).log().unsqueeze(-1)
    torch.testing.assert_close(joint, expected)
    torch.testing.assert_close(joint.exp().sum(-1), torch.ones(q, dtype=torch.float64))
    log_q = memory_log_probs(scores, values, mask, v)
    assert log_q[2].isneginf().all()
    mixed = interpolate(token.log_softmax(-1), log_q, 0.25, mask.any(-1))
    torch.testing.assert_close(mixed[2], token.log_softmax(-1)[2])
    torch.testing.assert_close(mixed.exp().sum(-1), torch.ones(q, dtype=torch.float64))


def test_option_errors_are_clear():
    with pytest.raises(ValueError, match="--memory-temperature must be > 0"):
        tiny_task(eval_memory="trime", memory_temperature=0.0)
    with pytest.raises(ValueError, match="--cache-lambda has no effect with --eval-memory trime"):
        tiny_task(eval_memory="trime", cache_lambda=0.1)
    with pytest.raises(ValueError, match="--memory-temperature has no effect with --eval-memory none"):
        tiny_task(memory_temperature=2.0)
    with pytest.raises(ValueError, match="--cache-lambda must lie in"):
        tiny_task(eval_memory="cache", cache_lambda=1.5)
    with pytest.raises(ValueError, match="--cache-size must be >= 1"):
        tiny_task(eval_memory="cache", cache_size=0)
    with pytest.raises(ValueError, match="unknown --eval-memory"):
        memory_options(type("Cfg", (), {"eval_memory": "bogus"})())
    with pytest.raises(ValueError, match="dimension"):
        keys = torch.randn(1, 3, 4)
        causal_memory(keys, torch.randn(1, 3, 5), torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 3, dtype=torch.bool), 1.0)
