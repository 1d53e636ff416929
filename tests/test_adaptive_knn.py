"""Adaptive kNN-MT (--eval-memory adaptive_knn, Zheng et al. 2021): the Meta-k network's step equals the explicit
mixture over its choices and the vocabulary (values and gradients, float64); the mode in the three drivers of the
one composition on tiny models; the network file and its checks; trime-train-adaptive-knn end to end."""

import dataclasses
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


# -- the mode on a tiny translation model, in the three drivers -----------------------------------------------

def perturbed_network(k=K, seed=3):
    network = MetaKNetwork(k, hidden=4, seed=seed)
    with torch.no_grad():
        for p in network.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(seed + p.numel())) * 0.5)
    return network


@pytest.fixture
def adaptive_store(tmp_path):
    """A tiny float64 translation model, an exact l2 datastore of its keys and a (random) network file for it."""
    task = mt_task()
    model = tiny_mt(task)
    keys, values = build_datastore(tmp_path / "ds", model, task, batch(pairs(task, n=8, seed=5)), "l2")
    stored = AdaptiveKnnNetwork.of(perturbed_network(), T, dictionary_checksum(task.target_dictionary),
                                   loaded_model_checksum(model))
    stored.save(tmp_path / "net.json")
    return tmp_path, keys, values, stored


def adaptive_mt(path, **extra):
    options = dict(eval_memory="adaptive_knn", datastore=str(path / "ds"), knn_k=K, knn_temperature=T,
                   knn_adaptive_network=str(path / "net.json"))
    task = mt_task(**{**options, **extra})
    return task, tiny_mt(task)


def naive_rows(stored, logits, queries, keys, values):
    """(n, V) float64 adaptive kNN-MT by brute force: top-K of −‖q − k‖², then :func:`naive_mixture`."""
    top = (-torch.cdist(queries, keys) ** 2).topk(K, dim=-1)
    mask = torch.ones_like(top.values, dtype=torch.bool)
    return naive_mixture(stored.network().double(), torch.log_softmax(logits, -1), top.values, values[top.indices],
                         mask, T)


def test_mode_record_and_options(adaptive_store):
    path, _, _, stored = adaptive_store
    record = mode_of("adaptive_knn")
    assert record.without_local and record.decoding_axes == () and "Meta-k" in record.describe()
    given = dict(datastore=str(path / "ds"), knn_k=K, knn_temperature=T, knn_adaptive_network=str(path / "net.json"))
    options = MemoryOptions.from_flags("adaptive_knn", given)
    assert record.flags(options, ()) == f"--eval-memory adaptive_knn --knn-temperature {T:g}"
    with pytest.raises(ValueError, match="needs --knn-adaptive-network"):
        MemoryOptions.from_flags("adaptive_knn", {k: v for k, v in given.items() if k != "knn_adaptive_network"})
    with pytest.raises(ValueError, match="--knn-lambda has no effect"):
        MemoryOptions.from_flags("adaptive_knn", {**given, "knn_lambda": 0.3})
    with pytest.raises(ValueError, match="--knn-adaptive-network has no effect"):
        MemoryOptions.from_flags("knn", given)
    with pytest.raises(ValueError, match="needs --knn-adaptive-network"):
        MemoryOptions("adaptive_knn", datastore="d")
    with pytest.raises(ValueError, match="give --knn-k 8 --knn-temperature 3"):
        adaptive_mt(path, knn_k=4)
    with pytest.raises(ValueError, match="give --knn-k 8 --knn-temperature 3"):
        adaptive_mt(path, knn_temperature=10.0)
    with pytest.raises(ValueError, match="skip-predictor has no effect"):
        adaptive_mt(path, knn_skip_predictor=str(path / "skip.json"))
    for field, message in (("model_sha256", "another model"), ("dictionary_sha256", "another dictionary")):
        other = dataclasses.replace(stored, **{field: "0" * 64})
        other.save(path / "net.json")
        with pytest.raises(AdaptiveKnnError, match=message):
            adaptive_mt(path)
    (path / "net.json").write_text(json.dumps({"format": "something else"}))
    with pytest.raises(AdaptiveKnnError, match="is not a trime-adaptive-knn v1 file"):
        adaptive_mt(path)


def test_full_and_target_drivers_equal_the_naive_mixture(adaptive_store):
    """--score-reference's full-vocabulary driver and the target-only driver give the brute-force mixture at every
    teacher-forced position of a tiny translation model."""
    path, keys, values, stored = adaptive_store
    task, model = adaptive_mt(path)
    memory = model.trime_eval_memory
    sample = batch(pairs(task, n=4, seed=11))
    with torch.no_grad():
        out, g = teacher_forced_keys(model, sample)
        full = memory.log_probs(model.decoder, out, sample)  # (B, T, V)
        fast = memory.target_log_probs(model.decoder, out, sample, memory.options)  # (B, T)
    target, real = sample["target"], sample["target"].ne(task.target_dictionary.pad())
    expected = naive_rows(stored, out[0][real].double(), g[real].double(), keys, values)
    torch.testing.assert_close(full[real].double(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fast[real].double(), expected.gather(1, target[real].unsqueeze(1)).squeeze(1),
                               rtol=1e-5, atol=1e-5)


def test_beam_search_steps_equal_the_naive_mixture(adaptive_store):
    """fairseq's SequenceGenerator (beam 3, incremental decoding): every step is the brute-force mixture at the
    live hypotheses' last position."""
    path, keys, values, stored = adaptive_store
    task, model = adaptive_mt(path)
    memory = model.trime_eval_memory
    calls, original = [], memory.step_log_probs

    def record(decoder, net_output):
        out = original(decoder, net_output)
        calls.append((net_output[0][:, -1].clone(), get_keys(net_output, TRIME_KEY)[:, -1].clone(), out.clone()))
        return out

    memory.step_log_probs = record
    generator = SequenceGenerator([model], task.target_dictionary, beam_size=3, max_len_b=6)
    with torch.no_grad():
        hypos = generator.generate([model], batch(pairs(task, n=3, seed=9)))
    assert len(hypos) == 3 and len(calls) >= 3
    for logits, query, got in calls:
        expected = naive_rows(stored, logits.double(), query.double(), keys, values)
        torch.testing.assert_close(got[:, 0].double(), expected, rtol=1e-5, atol=1e-5)


# -- trime-train-adaptive-knn end to end ------------------------------------------------------------------------

def test_cli_trains_a_network_that_fairseq_generate_applies(tmp_path):
    """trime-build-datastore on a tiny translation corpus, trime-train-adaptive-knn on valid (training lowers the
    held-out NLL below the untrained network's), fairseq-generate with the file; another model is refused."""
    import re

    from conftest import PYTHON, ROOT, run_cli
    from tiny_checkpoint import tiny_mt_checkpoint, tiny_mt_corpus

    from trime_fairseq.cli import build_datastore as builder
    from trime_fairseq.cli import train_adaptive_knn

    data = tiny_mt_corpus(tmp_path / "data")
    checkpoint = tiny_mt_checkpoint(tmp_path / "ckpt.pt", data)
    builder.main(builder.get_parser().parse_args(
        ["--path", str(checkpoint), "--gen-subset", "train", "--output", str(tmp_path / "ds"),
         "--index-factory", "Flat", "--metric", "l2", "--cpu", "--no-progress-bar"]))
    common = [str(data), "--user-dir", str(ROOT / "trime_fairseq"), "--task", "trime_translation", "-s", "de", "-t",
              "en", "--path", str(checkpoint), "--gen-subset", "valid", "--cpu", "--max-tokens", "2000",
              "--datastore", str(tmp_path / "ds"), "--knn-k", "4", "--knn-temperature", "10"]
    with pytest.raises(ValueError, match="needs --eval-memory knn"):
        train_adaptive_knn.main(common[:common.index("--datastore")] + ["--output", str(tmp_path / "x.json")])
    stored = train_adaptive_knn.main(common + ["--eval-memory", "knn", "--output", str(tmp_path / "net.json"),
                                               "--epochs", "15", "--learning-rate", "0.01", "--batch-positions", "32"])
    report = stored.report
    assert report["positions"] > 200 and report["held_out"] > 40
    assert report["adaptive_nll"] < report["initial_nll"] - 0.01, report
    assert report["knn_nll"] < report["plain_nll"], report  # the datastore helps this toy task
    loaded = AdaptiveKnnNetwork.load(tmp_path / "net.json")
    assert loaded.k == 4 and loaded.choices == [0, 1, 2, 4] and loaded.temperature == 10.0
    assert loaded.model_sha256 == json.loads((tmp_path / "ds" / "datastore.json").read_text())["model_sha256"]
    out = run_cli([PYTHON, "-m", "fairseq_cli.generate", *common[:common.index("--datastore")], "--beam", "2",
                   "--eval-memory", "adaptive_knn", *common[common.index("--datastore"):],
                   "--knn-adaptive-network", tmp_path / "net.json"], env={"OMP_NUM_THREADS": "1"})
    assert re.search(r"Generate valid with beam=2: BLEU4? = [0-9.]+", out), out[-2000:]
    other = tiny_mt_checkpoint(tmp_path / "other.pt", data, seed=7)
    with pytest.raises(ValueError, match="another model"):  # the datastore refuses it first
        train_adaptive_knn.main([a if a != str(checkpoint) else str(other) for a in common]
                                + ["--eval-memory", "knn", "--output", str(tmp_path / "y.json")])
