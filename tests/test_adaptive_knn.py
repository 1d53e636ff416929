"""Adaptive kNN-MT (--eval-memory adaptive_knn, Zheng et al. 2021): the Meta-k network's step equals the explicit
mixture over its choices and the vocabulary (values and gradients, float64); the mode in the three drivers of the
one composition on tiny models; the network file and its checks; trime-train-adaptive-knn end to end."""

import json
import math

import pytest
import torch
from fairseq.sequence_generator import SequenceGenerator
from test_translation import batch, build_datastore, mt_task, pairs, teacher_forced_keys, tiny_mt

from trime_fairseq.checksums import dictionary_checksum, loaded_model_checksum
from trime_fairseq.memory.adaptive_knn import (
    AdaptiveKnnError,
    AdaptiveKnnNetwork,
    AdaptiveRule,
    MetaKNetwork,
    adaptive_features,
    choices_for,
)
from trime_fairseq.memory.compose import full_log_probs, target_log_prob
from trime_fairseq.memory.keys import TRIME_KEY, get_keys
from trime_fairseq.memory.modes import mode_of
from trime_fairseq.memory.options import MemoryOptions
from trime_fairseq.memory.sources import MemoryBatch

K, T = 8, 3.0


def naive_features(raw, values, mask):
    """(Q, 2K) float64 [d, c] by loops: d_i = −raw_i (0 hidden), c_i = #distinct visible values among hits 1..i."""
    q, k = raw.shape
    out = torch.zeros(q, 2 * k, dtype=torch.float64)
    for row in range(q):
        seen = set()
        for i in range(k):
            if mask[row, i]:
                out[row, i] = -raw[row, i]
                seen.add(int(values[row, i]))
            out[row, k + i] = len(seen)
    return out


def naive_mixture(network, log_p, raw, values, mask, temperature):
    """(Q, V) float64 log p = log(w_0·p + Σ_{r≥1} w_r·p_kNN^{k_r}) by loops over rows, choices and hits; the
    choices whose first k_r hits are all hidden are dropped and the weights renormalised."""
    q, vocab = log_p.shape
    weights = torch.softmax(network.out(torch.tanh(network.hidden(naive_features(raw, values, mask)))), -1)
    rows = []
    for row in range(q):
        p = log_p[row].exp()
        exists = [r == 0 or bool(mask[row, :k].any()) for r, k in enumerate(network.choices)]
        total = sum(weights[row, r] for r in range(len(exists)) if exists[r])
        mixed = weights[row, 0] / total * p
        for r, k in enumerate(network.choices):
            if r == 0 or not exists[r]:
                continue
            knn = torch.zeros(vocab, dtype=torch.float64)
            z = sum(torch.exp(raw[row, i] / temperature) for i in range(k) if mask[row, i])
            for i in range(k):
                if mask[row, i]:
                    knn = knn + torch.nn.functional.one_hot(values[row, i], vocab) * torch.exp(raw[row, i] / temperature) / z
            mixed = mixed + weights[row, r] / total * knn
        rows.append(mixed.log())
    return torch.stack(rows)


def random_case(seed=0, q=6, vocab=11, k=K):
    g = torch.Generator().manual_seed(seed)
    log_p = torch.log_softmax(torch.randn(q, vocab, generator=g, dtype=torch.float64), -1)
    raw = -torch.rand(q, k, generator=g, dtype=torch.float64).mul(20).sort(-1).values  # best first: −d, d ascending
    values = torch.randint(0, 5, (q, k), generator=g)
    mask = torch.ones(q, k, dtype=torch.bool)
    mask[1, 5:] = False  # fewer hits than K
    mask[2, 1:] = False  # one hit: only k ∈ {0, 1, ...} with it
    mask[3] = False  # nothing visible: λ = 0
    mask[4, 0] = False  # a hidden best hit: the choice k = 1 does not exist
    target = torch.randint(0, 5, (q,), generator=g)
    return log_p, raw, values, mask, target


def test_choices_and_features():
    assert choices_for(1) == (0, 1) and choices_for(8) == (0, 1, 2, 4, 8) and choices_for(6) == (0, 1, 2, 4, 6)
    _, raw, values, mask, _ = random_case()
    got = adaptive_features(raw / T, values, mask, T)
    torch.testing.assert_close(got, naive_features(raw, values, mask))


@pytest.mark.parametrize("driver", ["full", "target"])
def test_the_step_is_the_explicit_mixture_values_and_gradients(driver):
    """Both combiners with the network's rule == the float64 loop over choices r and the vocabulary, and so are the
    gradients w.r.t. every parameter of the network (the target-only one: trime-train-adaptive-knn's; the full one
    works in place, for evaluation); rows with fewer than K, one or no visible hits included."""
    log_p, raw, values, mask, target = random_case()
    network = MetaKNetwork(K, hidden=5, seed=3).double()
    with torch.no_grad():  # weights large enough that the choices differ clearly
        for p in network.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel()), dtype=p.dtype) * 0.3)
    comp = mode_of("adaptive_knn").composition_of(AdaptiveRule(network, T), T)
    parts = {"datastore": MemoryBatch(raw, values, mask)}
    if driver == "full":
        out = full_log_probs(comp, log_p.clone(), torch.zeros(log_p.size(0), dtype=torch.float64), parts)
        got = out.gather(1, target.unsqueeze(1)).squeeze(1)
    else:
        got = target_log_prob(comp, log_p.gather(1, target.unsqueeze(1)).squeeze(1), torch.zeros(len(target)),
                              target, summarize=None,
                              entries=lambda terms: MemoryBatch(raw * terms[0].scale, values, mask))
    expected_all = naive_mixture(network, log_p, raw, values, mask, T)
    if driver == "full":
        torch.testing.assert_close(out, expected_all, rtol=1e-9, atol=1e-9)
    expected = expected_all.gather(1, target.unsqueeze(1)).squeeze(1)
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)
    assert torch.equal(got[3], log_p[3, target[3]])  # nothing visible: the model's own
    if driver == "full":
        return
    grads = torch.autograd.grad(got.sum(), list(network.parameters()))
    reference = torch.autograd.grad(expected.sum(), list(network.parameters()))
    for a, b in zip(grads, reference):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-9)


def test_no_nan_with_empty_rows_or_saturated_weights():
    """All rows without hits, and a network so confident that λ rounds to 1 in float32: finite values and
    gradients (λ is carried as logs)."""
    log_p, raw, values, mask, target = random_case()
    network = MetaKNetwork(K, hidden=4, seed=0)
    with torch.no_grad():
        network.out.bias.copy_(torch.tensor([-40.0, 0, 0, 0, 40.0]))  # w_0 ≈ e^-80
    comp = mode_of("adaptive_knn").composition_of(AdaptiveRule(network, T), T)
    for m in (torch.zeros_like(mask), mask):
        batch_ = MemoryBatch(raw.float() / T, values, m)
        entries, lam = AdaptiveRule(network, T)(batch_)
        assert torch.isfinite(entries.scores).all() and torch.isfinite(lam.keep).all()
        got = target_log_prob(comp, log_p.float().gather(1, target.unsqueeze(1)).squeeze(1), torch.zeros(len(target)),
                              target, None, lambda terms: MemoryBatch(raw.float() * terms[0].scale, values, m))
        assert not got.isnan().any()
        full = full_log_probs(comp, log_p.float().clone(), torch.zeros(len(target)),
                              {"datastore": MemoryBatch(raw.float(), values, m)})
        assert not full.isnan().any()
        got.clamp(min=-1e4).sum().backward()
        for p in network.parameters():
            assert torch.isfinite(p.grad).all()
            p.grad = None
    empty = target_log_prob(comp, log_p.float().gather(1, target.unsqueeze(1)).squeeze(1), torch.zeros(len(target)),
                            target, None, lambda terms: MemoryBatch(raw.float(), values, torch.zeros_like(mask)))
    torch.testing.assert_close(empty, log_p.float().gather(1, target.unsqueeze(1)).squeeze(1))
