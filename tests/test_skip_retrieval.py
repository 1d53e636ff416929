"""Adaptive retrieval (--knn-skip-predictor, He et al. 2021) in the three drivers of the one composition, against a
naive reference: a skipped position's distribution is exactly the model's own, a searched one is exact kNN's; the
decision never reads the target; the predictor file, its checks and its fitting."""

import numpy as np
import pytest
import torch
from fairseq.sequence_scorer import SequenceScorer
from test_knn_eval import build_datastore, eval_sample, forward
from tiny_models import tiny_lm, tiny_task

from trime_fairseq.checksums import dictionary_checksum, model_checksum
from trime_fairseq.memory.eval_memory import EvalMemory, MemoryOptions, build_eval_memory
from trime_fairseq.memory.keys import TRIME_KEY, get_keys
from trime_fairseq.memory.skip import SkipPredictor, SkipPredictorError, choose_threshold, fit, threshold_table

KNN = dict(knn_k=8, knn_temperature=2.0, knn_lambda=0.4)


def entropy_rule(task, model, cut: float, path) -> SkipPredictor:
    """A logistic regression that searches iff the entropy of the model's distribution >= ``cut``."""
    predictor = SkipPredictor(mean=[0.0, 0.0, 0.0], std=[1.0, 1.0, 1.0], layers=[([[50.0, 0.0, 0.0]], [-50.0 * cut])],
                              threshold=0.5, dictionary_sha256=dictionary_checksum(task.dictionary),
                              model_sha256=model_checksum(model.state_dict()))
    predictor.save(path)
    return predictor


def naive_entropy(logits):
    """(…,) float64 entropy of softmax(logits), by hand."""
    p = torch.softmax(logits.double(), -1)
    return -(p * p.log()).sum(-1)


@pytest.fixture
def setup(tmp_path):
    task = tiny_task()
    model = tiny_lm(task).eval()
    build_datastore(tmp_path / "ds", model, task, [eval_sample(task, seed=s) for s in (7, 8)])
    sample = eval_sample(task, seed=3, bsz=3, tsz=10)
    logits = forward(model, sample)[0]
    entropy = naive_entropy(logits)  # (B, T)
    values = entropy[sample["target"].ne(task.dictionary.pad())].sort().values
    middle = values.numel() // 2
    cut = float(values[middle - 1] + values[middle]) / 2  # between two positions: no rounding decides
    entropy_rule(task, model, cut, tmp_path / "skip.json")
    return task, model, sample, entropy >= cut, tmp_path


def own(model, x, partition=False):
    """The model's own log-probabilities (…, V), as the evaluation memory computes them: for an interpolation-only
    mode (kNN-LM here) both drivers use the fused log-softmax (partition=False); joint (Eq. 5/6) compositions
    logits − logsumexp (partition=True)."""
    from trime_fairseq.memory.token_scores import all_token_log_probs

    return all_token_log_probs(model.decoder, x, partition=partition)[0].view(*x.shape[:-1], -1)


def memories(task, path, **extra):
    """(exact kNN, kNN with the skip predictor) EvalMemories on the datastore at ``path``."""
    exact = MemoryOptions("knn", datastore=str(path / "ds"), **KNN)
    skipping = MemoryOptions("knn", datastore=str(path / "ds"), knn_skip_predictor=str(path / "skip.json"),
                             **KNN, **extra)
    return build_eval_memory(exact, task.dictionary), build_eval_memory(skipping, task.dictionary)


def test_skip_features_are_what_they_say():
    logits = torch.randn(5, 11, dtype=torch.float64)
    queries = torch.randn(5, 4)
    from trime_fairseq.memory.skip import skip_features

    f = skip_features(torch.log_softmax(logits, -1), queries)
    assert f.dtype == torch.float32 and f.shape == (5, 3)
    torch.testing.assert_close(f[:, 0].double(), naive_entropy(logits), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(f[:, 1].double(), torch.log_softmax(logits, -1).max(-1).values, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(f[:, 2], queries.norm(dim=-1))
    with_zero = torch.log_softmax(logits, -1)
    with_zero[:, 0] = float("-inf")  # a token of probability 0 adds nothing (0·log 0 = 0)
    assert torch.isfinite(skip_features(with_zero, queries)).all()


def test_log_probs_without_the_partition_are_the_same_distribution():
    """The per-step driver's fused log-softmax (partition=False, for interpolation-only modes) gives the
    log-probabilities of logits − logsumexp; a joint composition without the partition is refused."""
    import types

    from trime_fairseq.memory.compose import full_log_probs
    from trime_fairseq.memory.token_scores import all_token_log_probs

    logits = torch.randn(6, 13) * 4
    with_lse, lse = all_token_log_probs(types.SimpleNamespace(), logits)
    fused, none = all_token_log_probs(types.SimpleNamespace(), logits, partition=False)
    assert none is None and lse.shape == (6,)
    torch.testing.assert_close(fused, with_lse, rtol=0, atol=1e-5)
    torch.testing.assert_close(fused, torch.log_softmax(logits.double(), -1).float(), rtol=0, atol=1e-5)
    joint = types.SimpleNamespace(joint=(object(),), interpolations=())
    with pytest.raises(ValueError, match="log-partition"):
        full_log_probs(joint, fused, None, {})


@pytest.mark.parametrize("softmax_batch", [None, 7])
def test_full_vocabulary_driver_skips_exactly(setup, softmax_batch):
    task, model, sample, search, path = setup
    exact, skipping = memories(task, path)
    net_output = forward(model, sample)
    pad = task.dictionary.pad()
    plain = own(model, net_output[0])  # (B, T, V) the model's own
    knn = exact.log_probs(model.decoder, net_output, sample)  # (B, T, V) exact kNN-LM (tested in test_knn_eval)
    from trime_fairseq.memory.eval_memory import attach_eval_memory

    attach_eval_memory(model, skipping)
    scorer = SequenceScorer(task.target_dictionary, softmax_batch=softmax_batch)
    got = torch.cat([h[0]["positional_scores"] for h in scorer.generate([model], dict(sample))])
    target = sample["target"]
    scored = target.ne(pad)
    expected = torch.where(search, knn.gather(2, target.unsqueeze(-1)).squeeze(-1),
                           plain.gather(2, target.unsqueeze(-1)).squeeze(-1))[scored]
    skipped = ~search[scored]
    assert 0 < int(skipped.sum()) < int(scored.sum())
    assert torch.equal(got[skipped].to(expected.dtype), expected[skipped])  # exactly the model's own
    torch.testing.assert_close(got[~skipped].to(expected.dtype), expected[~skipped])
    assert (skipping.external.searched, skipping.external.skipped) == (int((~skipped).sum()), int(skipped.sum()))
    # the whole distribution of a position, through the full driver without chunks
    whole = build_eval_memory(skipping.options, task.dictionary).log_probs(model.decoder, net_output, sample)
    rows = search & scored
    assert torch.equal(whole[scored & ~search], plain[scored & ~search])
    torch.testing.assert_close(whole[rows], knn[rows])


def test_target_only_driver_skips_exactly(setup):
    task, model, sample, search, path = setup
    exact, skipping = memories(task, path)
    net_output = forward(model, sample)
    target = sample["target"]
    scored = target.ne(task.dictionary.pad())
    knn = exact.target_log_probs(model.decoder, net_output, sample, exact.options)
    got = skipping.target_log_probs(model.decoder, net_output, sample, skipping.options)
    plain = own(model, net_output[0], partition=True).gather(2, target.unsqueeze(-1)).squeeze(-1)
    assert torch.equal(got[scored & ~search], plain[scored & ~search])
    torch.testing.assert_close(got[scored & search], knn[scored & search])
    # a tuning grid point with another λ / T reuses the same (skipped) search
    other = MemoryOptions(**{**skipping.options.__dict__, "knn_lambda": 0.7})
    again = skipping.target_log_probs(model.decoder, net_output, sample, other)
    assert torch.equal(again[scored & ~search], plain[scored & ~search])
    with pytest.raises(ValueError, match="skip predictor"):
        skipping.target_log_probs(model.decoder, net_output, sample,
                                  MemoryOptions(**{**skipping.options.__dict__, "knn_skip_threshold": 0.9}))


def test_per_step_driver_skips_exactly(setup):
    """fairseq-generate's driver: the last position of every live row; skipped rows keep the model's own."""
    task, model, sample, search, path = setup
    exact, skipping = memories(task, path)
    net_output = forward(model, sample)
    knn = exact.step_log_probs(model.decoder, net_output)  # (B, 1, V)
    got = skipping.step_log_probs(model.decoder, net_output)
    plain = own(model, net_output[0][:, -1:], partition=False)
    last = search[:, -1]  # (B,)
    assert torch.equal(got[~last], plain[~last]) and bool((~last).any() or last.any())
    torch.testing.assert_close(got[last], knn[last])
    # a threshold of 0 searches everywhere (= exact kNN), of 1 nowhere reached by σ < 1 (= the model's own)
    everywhere = memories(task, path, knn_skip_threshold=0.0)[1].step_log_probs(model.decoder, net_output)
    torch.testing.assert_close(everywhere, knn)


def test_the_decision_never_reads_the_target(setup):
    """Another target at every position (same inputs): the same positions search, the same distributions."""
    task, model, sample, _, path = setup
    _, first = memories(task, path)
    _, second = memories(task, path)
    net_output = forward(model, sample)
    other = dict(sample, target=sample["target"].clone())
    pad = task.dictionary.pad()
    real = other["target"].ne(pad)
    other["target"][real] = (other["target"][real] - task.dictionary.nspecial + 1) % 6 + task.dictionary.nspecial
    a = first.log_probs(model.decoder, net_output, sample)
    b = second.log_probs(model.decoder, forward(model, sample), other)
    assert torch.equal(a[real], b[real])
    assert (first.external.searched, first.external.skipped) == (second.external.searched, second.external.skipped)


def test_predictor_checks_and_options(setup, tmp_path):
    task, model, _, _, path = setup
    predictor = SkipPredictor.load(path / "skip.json")
    assert predictor.threshold == 0.5 and predictor.layers[0][1] == pytest.approx([predictor.layers[0][1][0]])
    with pytest.raises(ValueError, match="--knn-skip-threshold needs --knn-skip-predictor"):
        MemoryOptions("knn", datastore="d", knn_skip_threshold=0.3)
    with pytest.raises(ValueError, match=r"probability in \[0, 1\]"):
        MemoryOptions("knn", datastore="d", knn_skip_predictor="p", knn_skip_threshold=1.5)
    with pytest.raises(ValueError, match="--knn-skip-predictor has no effect with --eval-memory trime_ext"):
        MemoryOptions.from_flags("trime_ext", {"datastore": "d", "knn_skip_predictor": "p"})
    options = MemoryOptions("knn", datastore=str(path / "ds"), knn_skip_predictor=str(path / "skip.json"), **KNN)
    with pytest.raises(SkipPredictorError, match="another dictionary"):
        predictor.check(dictionary=tiny_task(words=21).dictionary)
    predictor.check(dictionary=task.dictionary, model=model)
    memory = build_eval_memory(options, task.dictionary)
    other = tiny_lm(task, seed=5).eval()  # another model's weights: refused at its first search
    memory.external.bind(other)
    other.load_state_dict(other.state_dict())
    with pytest.raises(Exception, match="another model"):
        memory.step_log_probs(other.decoder, forward(other, eval_sample(task)))
    (tmp_path / "bad.json").write_text('{"format": "x"}')
    with pytest.raises(SkipPredictorError, match="not a trime-skip-predictor"):
        SkipPredictor.load(tmp_path / "bad.json")
    with pytest.raises(FileNotFoundError, match="trime-train-skip-predictor"):
        SkipPredictor.load(tmp_path / "none.json")


def test_fit_learns_a_rule_and_the_threshold_keeps_perplexity():
    g = torch.Generator().manual_seed(0)
    features = torch.randn(2000, 3, generator=g)
    helps = features[:, 0] > 0.3  # retrieval helps where the entropy is high
    for hidden in (0, 8):
        mean, std, layers = fit(features, helps, hidden=hidden, epochs=300)
        p = SkipPredictor(mean, std, layers, 0.5, "0" * 64, "0" * 64)
        assert float(((p.benefit(features) >= 0.5) == helps).float().mean()) > 0.95
    knn = torch.where(helps, torch.tensor(-1.0), torch.tensor(-2.01)).double()
    plain = torch.where(helps, torch.tensor(-3.0), torch.tensor(-2.0)).double()
    table = threshold_table(p.benefit(features), knn, plain, [0.0, 0.5, 1.0])
    assert table[0]["skipped"] == 0.0 and table[0]["ppl"] == pytest.approx(float((-knn.mean()).exp()))
    assert table[2]["skipped"] > 0.95  # P >= 1 only where σ rounds to 1
    best = choose_threshold(table, float((-knn.mean()).exp()), 0.01)
    assert best["threshold"] == 0.5 and 0.5 < best["skipped"] < 0.8


def test_empty_datastore_part_keys_shape(setup):
    """Skipped rows are empty MemoryBatch rows: mask False, score -inf, value 0 (the mixing keeps p there)."""
    task, model, sample, search, path = setup
    _, skipping = memories(task, path)
    net_output = forward(model, sample)
    keys = get_keys(net_output, TRIME_KEY)[:, -1]
    from trime_fairseq.memory.skip import skip_features

    features = skip_features(own(model, net_output[0][:, -1]), keys)
    hits = skipping.external.search(keys, features)
    skipped = ~search[:, -1]
    assert not hits.mask[skipped].any() and torch.isneginf(hits.scores[skipped]).all()
    assert (hits.values[skipped] == 0).all() and hits.mask[~skipped].all()
    with pytest.raises(ValueError, match="needs the features"):
        skipping.external.search(keys)
    assert np.isclose(skipping.external.skip_threshold, 0.5)
    assert isinstance(EvalMemory, type)


def test_cli_trains_a_predictor_that_fairseq_eval_lm_applies(tmp_path):
    """trime-train-skip-predictor on a random-weight tiny LM's valid split, then fairseq-eval-lm with the file:
    threshold 0 = exact kNN-LM's perplexity; the checksums tie the file to the model and the dictionary."""
    import json
    import re

    from conftest import PYTHON, ROOT, run_cli
    from tiny_checkpoint import tiny_corpus, tiny_lm_checkpoint

    from trime_fairseq.cli import build_datastore as builder
    from trime_fairseq.cli import train_skip_predictor

    data = tiny_corpus(tmp_path / "data")
    checkpoint = tiny_lm_checkpoint(tmp_path / "ckpt.pt", data)
    builder.main(builder.get_parser().parse_args(
        ["--path", str(checkpoint), "--data", str(data), "--gen-subset", "train", "--output", str(tmp_path / "ds"),
         "--index-factory", "Flat", "--metric", "l2", "--cpu", "--no-progress-bar"]))
    common = [str(data), "--user-dir", str(ROOT / "trime_fairseq"), "--task", "trime_lm", "--path", str(checkpoint),
              "--gen-subset", "valid", "--cpu", "--tokens-per-sample", "32", "--no-progress-bar",
              "--eval-memory", "knn", "--datastore", str(tmp_path / "ds"), "--knn-k", "8"]
    predictor = train_skip_predictor.main(common + ["--output", str(tmp_path / "skip.json"), "--epochs", "50"])
    stored = json.loads((tmp_path / "skip.json").read_text())
    assert stored["format"] == "trime-skip-predictor" and stored["threshold"] == predictor.threshold
    assert stored["report"]["thresholds"][0]["threshold"] == 0.0 and stored["report"]["positions"] > 100
    assert stored["model_sha256"] == json.loads((tmp_path / "ds" / "datastore.json").read_text())["model_sha256"]

    def ppl(*extra):
        out = run_cli([PYTHON, "-m", "fairseq_cli.eval_lm", *common, *extra])
        return float(re.search(r"Perplexity: ([0-9.]+)", out).group(1))

    exact = ppl()
    assert ppl("--knn-skip-predictor", tmp_path / "skip.json", "--knn-skip-threshold", "0") == pytest.approx(exact)
    ppl("--knn-skip-predictor", tmp_path / "skip.json")  # the file's threshold
    other = tiny_lm_checkpoint(tmp_path / "other.pt", data, seed=7)
    with pytest.raises(ValueError, match="another model"):  # the datastore refuses it first: rebuild, then retry
        train_skip_predictor.main([a if a != str(checkpoint) else str(other) for a in common]
                                  + ["--output", str(tmp_path / "x.json")])
