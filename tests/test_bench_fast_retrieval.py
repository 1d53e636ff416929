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
        "--skip-args", "--epochs 30", "--work", str(tmp_path / "work"), "--profile", "3",
        "--repeats", "2"])
    out = capsys.readouterr().out
    assert set(results) == {"plain", "kNN exact (Flat)", "kNN IVF4,Flat", "kNN PCA8,IVF4,Flat", "kNN exact + skip",
                            "kNN IVF4,Flat + skip", "kNN PCA8,IVF4,Flat + skip"}
    assert all(r["rate"] > 0 and np.isfinite(r["quality"]) for r in results.values())
    assert results["plain"]["skipped"] is None and 0.0 <= results["kNN exact + skip"]["skipped"] <= 1.0
    assert [r["index"] for r in recalls] == ["IVF4,Flat", "PCA8,IVF4,Flat"]
    assert all(0.0 <= r["recall"] <= 1.0 for r in recalls)
    assert "| kNN exact + skip |" in out and "recall@8" in out and "vs plain" in out
    assert all(f"## profile: {name} (2 batches" in out for name in results)  # --profile: one pass per setting
    # --repeats 2: a ratio per timed pass, exact search timed once; the table shows the passes' spread
    assert results["plain"]["ratios"] == [1.0, 1.0] and len(results["kNN exact (Flat)"]["ratios"]) == 1
    assert all(len(r["ratios"]) == 2 for name, r in results.items() if name != "kNN exact (Flat)")
    assert "| kNN IVF4,Flat | " in out and "2 timed pass(es)" in out


def test_interleaved_timing_alternates_settings_and_records_the_first_pass():
    b = bench()
    calls, kept = [], []

    def call(name, i):
        calls.append((name, i))
        return None if (name == "short" and i >= 1) else (name, i)

    seconds = b.interleaved(["plain", b.EXACT, "short"], 2, 3, call, lambda name, result: kept.append(result))
    first = [("plain", 0), (b.EXACT, 0), ("short", 0), ("plain", 1), (b.EXACT, 1), ("short", 1)]
    assert calls == first + [("plain", 0), ("short", 0), ("plain", 1), ("short", 1)] * 2  # exact: first pass only
    assert kept == [c for c in first if c != ("short", 1)]  # a missing item is neither timed nor recorded
    assert [len(seconds[n]) for n in ("plain", b.EXACT, "short")] == [3, 1, 3]
    assert b.ratios({"plain": [1.0, 2.0], "x": [2.0, 2.0]}, "x") == [0.5, 1.0]
