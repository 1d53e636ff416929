"""benchmarks/bench_fast_retrieval.py: recall@K against a naive reference, and the whole benchmark end to end on a
random-weight tiny LM at minimal sizes (every setting measured, ratios and recalls printed in one run)."""

import importlib.util

import numpy as np
import pytest
from conftest import ROOT
from tiny_checkpoint import tiny_corpus, tiny_lm_checkpoint


def bench():
    spec = importlib.util.spec_from_file_location("bench_fast_retrieval", ROOT / "benchmarks" / "bench_fast_retrieval.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def naive_recall(exact, approx):
    out = []
    for q in range(len(exact)):
        truth = [i for i in exact[q] if i != -1]
        if truth:
            out.append(sum(1 for i in truth if i in list(approx[q])) / len(truth))
    return sum(out) / len(out)


def test_recall_at_k_equals_a_naive_count():
    rng = np.random.default_rng(0)  # a search returns distinct ids, then -1 for missing hits
    exact = np.stack([rng.permutation(40)[:8] for _ in range(30)])
    approx = np.stack([np.concatenate([rng.permutation(np.concatenate([e[:4], 40 + np.arange(4)]))[:6], [-1, -1]])
                       for e in exact])
    exact[3] = -1  # a query without exact hits does not count
    exact[4, 5:] = -1  # nor do its missing hits
    assert bench().recall_at_k(exact, approx) == pytest.approx(naive_recall(exact, approx))
    assert bench().recall_at_k(exact, exact) == 1.0
    with pytest.raises(ValueError, match="rows"):
        bench().recall_at_k(exact, approx[:3])


def test_benchmark_runs_end_to_end_on_a_tiny_lm(tmp_path, capsys):
    data = tiny_corpus(tmp_path / "data", lines=(("train", 120), ("valid", 40), ("test", 30)))
    checkpoint = tiny_lm_checkpoint(tmp_path / "ckpt.pt", data)
    results, recalls = bench().main([
        str(data), "--path", str(checkpoint), "--indexes", "IVF4,Flat;PCA8,IVF4,Flat", "--nprobe", "2", "--k", "8",
        "--batches", "2", "--recall-queries", "50", "--eval-args", "--tokens-per-sample 32 --batch-size 4",
        "--skip-args", "--epochs 30", "--work", str(tmp_path / "work"), "--profile", "3"])
    out = capsys.readouterr().out
    assert set(results) == {"plain", "kNN exact (Flat)", "kNN IVF4,Flat", "kNN PCA8,IVF4,Flat", "kNN exact + skip",
                            "kNN IVF4,Flat + skip", "kNN PCA8,IVF4,Flat + skip"}
    assert all(r["rate"] > 0 and np.isfinite(r["quality"]) for r in results.values())
    assert results["plain"]["skipped"] is None and 0.0 <= results["kNN exact + skip"]["skipped"] <= 1.0
    assert [r["index"] for r in recalls] == ["IVF4,Flat", "PCA8,IVF4,Flat"]
    assert all(0.0 <= r["recall"] <= 1.0 for r in recalls)
    assert "| kNN exact + skip |" in out and "recall@8" in out and "vs plain" in out
    assert all(f"## profile: {name} (2 batches" in out for name in results)  # --profile: one pass per setting
