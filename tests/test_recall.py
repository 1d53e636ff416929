"""The recall benchmark (trime-recall): seeded generation, exact gaps, the index through fairseq-preprocess, the
per-gap statistics against a naive count, the scorer against fairseq-eval-lm, its causality by perturbation,
the refusal of a datastore built from the scored split, and the report's verdicts."""

import json
import math
import os
import subprocess
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import PYTHON, ROOT, perplexity, run_cli

from trime_fairseq.recall.corpus import EOS, line_tokens, make_corpus, read_lines
from trime_fairseq.recall.index import RecallIndex, split_tokens
from trime_fairseq.recall.report import plot, report_markdown, verdict
from trime_fairseq.recall.stats import bucket_stats

SMALL = dict(train_lines=300, eval_lines=200, gaps="0,8,64,300", episodes=2, train_gaps="8,64", train_rate=2.0)


def stream_of(folder: Path, split: str):
    return line_tokens(read_lines(folder / f"wiki.{split}.tokens"))


@pytest.fixture(scope="module")
def corpus(wikitext2_raw, tmp_path_factory):
    out = tmp_path_factory.mktemp("recall") / "raw"
    make_corpus(wikitext2_raw, out, seed=3, **SMALL)
    return out


@pytest.fixture(scope="module")
def binarised(corpus, tmp_path_factory):
    dest = tmp_path_factory.mktemp("recall_bin") / "bin"
    run_cli(["bash", ROOT / "scripts" / "prepare_recall.sh", corpus, dest], env={"WORKERS": "1"})
    return dest


@pytest.fixture(scope="module")
def checkpoint(binarised, tmp_path_factory):
    """A tiny transformer_lm after 3 updates on the recall training split."""
    save = tmp_path_factory.mktemp("recall_ckpt")
    run_cli(["fairseq-train", binarised, "--user-dir", "trime_fairseq", "--task", "trime_lm", "--arch",
             "transformer_lm", "--decoder-layers", "1", "--decoder-embed-dim", "16", "--decoder-ffn-embed-dim", "32",
             "--decoder-attention-heads", "2", "--tokens-per-sample", "64", "--batch-size", "4", "--max-update", "3",
             "--optimizer", "adam", "--lr", "0.003", "--criterion", "cross_entropy", "--save-dir", save,
             "--no-epoch-checkpoints", "--cpu", "--disable-validation", "--seed", "1"])
    return save / "checkpoint_last.pt"


def test_generation_is_seeded_and_reproducible(wikitext2_raw, corpus, tmp_path):
    again = tmp_path / "again"
    make_corpus(wikitext2_raw, again, seed=3, **SMALL)
    for name in ("wiki.train.tokens", "wiki.valid.tokens", "wiki.test.tokens", "memory.valid.tokens",
                 "valid.recall.json", "test.recall.json", "train.recall.json"):
        assert (again / name).read_bytes() == (corpus / name).read_bytes(), name
    other = tmp_path / "other"
    make_corpus(wikitext2_raw, other, seed=4, **SMALL)
    assert (other / "wiki.valid.tokens").read_bytes() != (corpus / "wiki.valid.tokens").read_bytes()


def test_gaps_are_exact_and_occurrences_hold_the_span(corpus):
    for split in ("train", "valid", "test"):
        index = RecallIndex.load(corpus / f"{split}.recall.json")  # load checks gaps, order and overlaps too
        tokens = stream_of(corpus, split)
        assert len(tokens) == index.tokens
        if split != "train":
            assert {(e.variant, e.gap) for e in index.episodes} == {(v, g) for v in ("span", "passkey")
                                                                    for g in (0, 8, 64, 300)}
        for e in index.episodes:
            assert e.second - (e.first + e.length) == e.gap  # exactly G tokens between them, EOS included
            assert tokens[e.first:e.first + e.length] == e.words == tokens[e.second:e.second + e.length]
            assert EOS not in e.words
        # the scored tokens: the span's words but the first; the pass key's keys
        for e in index.episodes:
            assert (e.scored_from, e.scored_to) == ((1, e.length) if e.variant == "span" else (6, e.length - 1))
        assert [tokens[p] for p in index.position] == index.words == [tokens[p] for p in index.first_position]


def test_spans_never_occur_a_third_time(corpus):
    index = RecallIndex.load(corpus / "test.recall.json")
    text = " ".join(t if t != EOS else "|" for t in stream_of(corpus, "test"))
    for e in index.episodes:
        if e.variant == "span":
            assert text.count(" ".join(e.words)) == 2


def test_index_survives_binarisation(binarised):
    from fairseq.data import Dictionary

    dictionary = Dictionary.load(str(binarised / "dict.txt"))
    for split in ("train", "valid", "test"):
        index = RecallIndex.load(binarised / f"{split}.recall.json")
        ids = split_tokens(binarised, split)
        memory = split_tokens(binarised, f"{split}_memory") if split != "train" else None
        index.check_stream(ids, dictionary, memory)  # raises on any mismatch
        assert [dictionary[i] for i in ids[index.position]] == [dictionary[dictionary.index(w)] for w in index.words]
        if memory is not None:
            assert len(memory) == index.memory["tokens"] == sum(e.length + 1 for e in index.episodes)
    # the check does catch a shift
    with pytest.raises(ValueError):
        index.check_stream(np.roll(split_tokens(binarised, "test"), 1), dictionary)


def test_bucket_statistics_equal_a_naive_count(corpus):
    index = RecallIndex.load(corpus / "valid.recall.json")
    rng = np.random.default_rng(0)
    log_probs = -rng.exponential(3.0, index.tokens)
    correct = rng.random(index.tokens) < 0.3
    rows = bucket_stats(index, log_probs, correct)
    assert len(rows) == 2 * 4 * 2
    for row in rows:
        values, hits = [], []
        for e in index.episodes:
            if e.variant != row["variant"] or e.gap != row["gap"]:
                continue
            start = e.second if row["occurrence"] == "second" else e.first
            for j in range(e.scored_from, e.scored_to):
                values.append(log_probs[start + j])
                hits.append(correct[start + j])
        assert row["tokens"] == len(values) and row["episodes"] == 2
        assert row["mean_log_prob"] == pytest.approx(sum(values) / len(values), rel=1e-12)
        assert row["ppl"] == pytest.approx(math.exp(-sum(values) / len(values)), rel=1e-12)
        assert row["accuracy"] == pytest.approx(sum(hits) / len(hits))
    with pytest.raises(ValueError, match="not scored"):
        bucket_stats(index, np.where(np.arange(index.tokens) == index.position[0], np.nan, log_probs), correct)


EVAL = ["--user-dir", "trime_fairseq", "--task", "trime_lm", "--tokens-per-sample", "64", "--context-window", "32",
        "--batch-size", "4", "--cpu", "--no-progress-bar"]


def test_score_matches_fairseq_eval_lm_and_refuses_the_scored_split_as_datastore(binarised, checkpoint, tmp_path):
    out = tmp_path / "cache.json"
    score = [PYTHON, "-m", "trime_fairseq.cli.recall", "score", binarised, "--path", checkpoint, "--gen-subset", "test",
             *EVAL, "--recall-index", binarised / "test.recall.json"]
    memory = ["--eval-memory", "cache", "--long-memory-size", "512"]
    run_cli([*score, "--label", "cache", "--control", "vanilla", "--reach", "512:600", "--output", out, *memory])
    result = json.loads(out.read_text())
    reference = perplexity(run_cli(["fairseq-eval-lm", binarised, "--path", checkpoint, "--gen-subset", "test",
                                    *EVAL, *memory]))
    assert result["overall"]["ppl"] == pytest.approx(reference, rel=1e-4)
    assert result["overall"]["tokens"] == RecallIndex.load(binarised / "test.recall.json").tokens
    assert out.with_suffix(".md").read_text().count("| span |") == 4
    # a datastore of the scored split itself holds the scored positions: refused; its memory split is fine
    for split in ("test", "test_memory"):
        run_cli([PYTHON, "-m", "trime_fairseq.cli.build_datastore", "--path", checkpoint, "--data", binarised,
                 "--gen-subset", split, "--tokens-per-sample", "64", "--context-window", "32", "--batch-size", "4",
                 "--output", tmp_path / split, "--metric", "l2", "--index-factory", "Flat", "--cpu",
                 "--no-progress-bar"])
    knn = ["--label", "knn", "--output", tmp_path / "knn.json", "--eval-memory", "knn", "--knn-k", "8"]
    with pytest.raises(pytest.fail.Exception, match="built from the scored split"):
        run_cli([*score, *knn, "--datastore", tmp_path / "test"])
    run_cli([*score, *knn, "--datastore", tmp_path / "test_memory"])
    assert json.loads((tmp_path / "knn.json").read_text())["overall"]["tokens"] == result["overall"]["tokens"]


def perturbed_copy(binarised: Path, dest: Path, after: int) -> Path:
    """``binarised`` with every word of the test split after stream position ``after`` replaced by another word
    (line ends kept, so every position stays where it was), binarised with the same dictionary."""
    from fairseq.data import Dictionary

    dictionary = Dictionary.load(str(binarised / "dict.txt"))
    ids = split_tokens(binarised, "test")
    words, lines, line = [dictionary[i] for i in ids], [], []
    for p, w in enumerate(words):
        if w == "</s>":
            lines.append(" ".join(line) + "\n")
            line = []
        else:
            line.append(w if p < after else ("the" if w != "the" else "of"))
    dest.mkdir()
    (dest / "test.txt").write_text("".join(lines), encoding="utf-8")
    run_cli(["fairseq-preprocess", "--only-source", "--srcdict", binarised / "dict.txt", "--testpref",
             dest / "test.txt", "--destdir", dest / "bin", "--workers", "1"])
    return dest / "bin"


@pytest.mark.parametrize("memory", [["--eval-memory", "trime", "--long-memory-size", "512"],
                                    ["--eval-memory", "cache", "--long-memory-size", "512"]])
def test_scores_do_not_depend_on_later_tokens(binarised, checkpoint, tmp_path, memory):
    """Changing every token after a second occurrence leaves the scores of every position up to it unchanged."""
    from trime_fairseq.cli.loading import eval_lm_config
    from trime_fairseq.cli.recall import score_stream

    index = RecallIndex.load(binarised / "test.recall.json")
    episode = sorted(index.episodes, key=lambda e: e.second)[len(index.episodes) // 2]
    end = episode.second + episode.length
    changed = perturbed_copy(binarised, tmp_path / "perturbed", end)

    def scores(data):
        cfg, _ = eval_lm_config([str(data), "--path", str(checkpoint), "--gen-subset", "test", *EVAL, *memory])
        return score_stream(cfg)

    original, perturbed = scores(binarised), scores(changed)
    assert np.array_equal(original[2][:end], perturbed[2][:end]) and not np.array_equal(original[2], perturbed[2])
    np.testing.assert_allclose(perturbed[0][:end], original[0][:end], rtol=0, atol=1e-5)
    assert np.array_equal(perturbed[1][:end], original[1][:end])
    assert not np.allclose(perturbed[0][end:], original[0][end:])  # the change did reach the model


def fake_score(label, control, reach, second, first, gap=100, length=16):
    rows = [dict(variant="span", gap=gap, occurrence=o, tokens=10, episodes=2, mean_log_prob=v, ppl=math.exp(-v),
                 accuracy=0.5) for o, v in (("second", second), ("first", first))]
    return dict(label=label, control=control, reach=reach, lengths=dict(span=length), buckets=rows)


def test_report_verdicts():
    control = fake_score("vanilla", None, [32, 63], -5.0, -5.0)
    inside = fake_score("cache", "vanilla", [512, 600], -2.0, -4.9)
    assert verdict(inside, control, "span", 100, 0.05)["ok"] is True
    no_copy = fake_score("cache", "vanilla", [512, 600], -4.8, -4.8)  # gains as much on unseen words: no recall
    assert verdict(no_copy, control, "span", 100, 0.05)["ok"] is False
    leak = fake_score("cache", "vanilla", [64, 80], -2.0, -4.9)  # recall from beyond its reach
    assert verdict(leak, control, "span", 100, 0.05)["ok"] is False
    fine = fake_score("cache", "vanilla", [64, 80], -4.88, -4.9)
    assert verdict(fine, control, "span", 100, 0.05) == pytest.approx(
        dict(gain_second=0.12, gain_first=0.1, expected="no gain", ok=True))
    # with per-token values, a difference within two standard errors of the paired differences is noise
    noisy = fake_score("cache", "vanilla", [64, 80], -4.8, -4.9)
    for score, second, first in ((noisy, [-4.0, -5.6], [-4.9, -4.9]), (control, [-5.0, -5.0], [-5.0, -5.0])):
        for row, values in zip(score["buckets"], (second, first)):
            row["log_probs"] = values
    assert verdict(noisy, control, "span", 100, 0.05)["ok"] is True  # +0.1 vs 0.05 + 2 x 0.8
    noisy["buckets"][0]["log_probs"] = [-4.8, -4.8]
    assert verdict(noisy, control, "span", 100, 0.05)["ok"] is False  # +0.1 exactly, no spread
    text = report_markdown([control, inside])
    assert "gain ✓" in text and "0 verdict(s) failed" in text


def test_plot_draws_a_panel_per_control_with_each_memory_s_gain(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    control = fake_score("vanilla", None, [32, 63], -5.0, -5.0)
    cache = fake_score("cache", "vanilla", [512, 600], -2.0, -4.9)
    txl0 = fake_score("txl-mem0", None, [0, 63], -6.0, -6.0)
    txl = fake_score("txl-mem64", "txl-mem0", [64, 127], -5.5, -6.0)
    drawn = {}
    real_savefig = plt.Figure.savefig

    def spy(fig, *args, **kwargs):
        drawn["axes"] = [ax for ax in fig.axes if ax.lines]
        return real_savefig(fig, *args, **kwargs)

    plt.Figure.savefig = spy
    try:
        plot([control, cache, txl0, txl], tmp_path / "recall.png")
    finally:
        plt.Figure.savefig = real_savefig
    assert (tmp_path / "recall.png").read_bytes()[:4] == b"\x89PNG"
    titles = sorted(ax.get_title() for ax in drawn["axes"])
    assert titles == ["memories of txl-mem0", "memories of vanilla"]
    gains = {ax.get_title(): ax.lines[0].get_ydata() for ax in drawn["axes"]}
    assert gains["memories of vanilla"] == pytest.approx([3.0])  # -2.0 - (-5.0) on the second occurrence
    assert gains["memories of txl-mem0"] == pytest.approx([0.5])


def test_pipeline_script_is_executable_and_checks_its_systems(tmp_path):
    script = ROOT / "scripts" / "recall_benchmark.sh"
    assert script.stat().st_mode & 0o111
    run_cli(["bash", "-n", script])  # the pipeline is bash: a machine without it cannot run it either
    for systems, message in (("vanilla cachex", "unknown system 'cachex'"), ("spalm", "spalm needs vanilla")):
        done = subprocess.run(["bash", str(script)], env={**os.environ, "SYSTEMS": systems,
                              "OUT": str(tmp_path / "out")}, capture_output=True, text=True)
        assert done.returncode == 2 and message in done.stderr, done.stderr
    assert not (tmp_path / "out").exists()
