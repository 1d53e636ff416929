"""The grid search shared by trime-tune (perplexity) and trime-tune-mt (BLEU): edges are widened
until the best value is interior or at the option's own bound, each point is scored once."""

import math

import pytest

from trime_fairseq.cli.grid_search import edge_note, grid, search
from trime_fairseq.memory.options import MemoryOptions


class Scorer:
    """A score of each point from ``f(options)``; the plain point scores ``plain``; records every call."""

    def __init__(self, f, plain):
        self.f, self.plain, self.scored = f, plain, []

    def __call__(self, points, r):
        self.scored.extend(points)
        return {p: self.plain if p.mode == "none" else self.f(p) for p in points}


def test_a_temperature_is_widened_until_its_best_is_interior():
    base = MemoryOptions("trime")
    score = Scorer(lambda o: (math.log2(o.memory_temperature) - 3) ** 2, plain=100.0)  # best τ = 8
    scores, best, history = search(base, {"memory_temperature": [1.0, 2.0]}, score, rounds=5, metric="perplexity",
                                   higher_is_better=False)
    assert best.memory_temperature == 8.0
    assert [h["axes"]["memory_temperature"] for h in history] == [[1, 2], [1, 2, 4], [1, 2, 4, 8],
                                                                   [1, 2, 4, 8, 16]]
    assert history[-1]["on_edge"] == [] and history[-1]["perplexity"] == 0.0 and edge_note(history) == ""
    assert len(score.scored) == len(set(score.scored)) == 1 + 5  # plain + 5 temperatures, each once
    assert sum(p.mode == "none" for p in score.scored) == 1 and best.mode == "trime"


def test_lambda_stops_at_its_bound_and_k_at_one():
    base = MemoryOptions("knn", datastore="unused", knn_k=8)
    # BLEU (higher is better) grows with λ and as K shrinks, so both run into their bounds (λ = 1, K = 1);
    # T's one value (an edge) is widened on both sides and its best, 10, becomes interior
    score = Scorer(lambda o: o.knn_lambda - 0.01 * o.knn_k - 0.001 * math.log(o.knn_temperature / 10) ** 2,
                   plain=-1.0)
    axes = {"knn_k": [4, 8], "knn_temperature": [10.0], "knn_lambda": [0.6, 0.8]}
    scores, best, history = search(base, axes, score, rounds=10, metric="bleu", higher_is_better=True)
    assert (best.knn_k, best.knn_temperature, best.knn_lambda) == (1, 10.0, 1.0) and isinstance(best.knn_k, int)
    assert len(history) == 3 and history[-1]["bleu"] == scores[best] == max(scores.values())
    assert history[-1]["axes"] == {"knn_k": [1, 2, 4, 8], "knn_temperature": [5.0, 10.0, 20.0],
                                   "knn_lambda": pytest.approx([0.6, 0.8, 1.0])}
    assert history[-1]["on_edge"] == history[-1]["at_bound"] == ["knn_k", "knn_lambda"]
    assert edge_note(history) == "note: the best value of knn_k, knn_lambda lies at the option's bound"


def test_no_widening_leaves_the_edge_said():
    base = MemoryOptions("trime")
    score = Scorer(lambda o: o.memory_temperature, plain=100.0)  # best on the lower edge
    scores, best, history = search(base, {"memory_temperature": [1.0, 2.0]}, score, rounds=0, metric="perplexity",
                                   higher_is_better=False)
    assert best.memory_temperature == 1.0 and len(history) == 1
    assert edge_note(history) == "note: the best value of memory_temperature lies on the edge of the widened grid"
    assert set(scores) == set(grid(base, {"memory_temperature": [1.0, 2.0]}))


def test_lambda_at_its_bound_stops_the_search():
    base = MemoryOptions("knn", datastore="unused")
    score = Scorer(lambda o: -o.knn_lambda, plain=0.0)  # perplexity falls with λ: λ = 1 is the bound
    scores, best, history = search(base, {"knn_lambda": [0.5, 1.0]}, score, rounds=3, metric="perplexity",
                                   higher_is_better=False)
    assert best.knn_lambda == 1.0 and len(history) == 1 and history[0]["at_bound"] == ["knn_lambda"]
    assert edge_note(history) == "note: the best value of knn_lambda lies at the option's bound"


def test_negative_rounds_is_an_error_before_any_scoring():
    score = Scorer(lambda o: 0.0, plain=0.0)
    with pytest.raises(ValueError, match="--widen-edges must be >= 0"):
        search(MemoryOptions("trime"), {"memory_temperature": [1.0]}, score, rounds=-1, metric="perplexity",
               higher_is_better=False)
    assert score.scored == []


def test_an_interrupted_search_resumes_from_its_score_log(tmp_path):
    """ScoreLog: the points scored before an interruption are read back and not scored again; the search's
    result is the uninterrupted one's. A cut last line is dropped, a log of another tuning is refused."""
    from trime_fairseq.cli.score_log import ScoreLog

    base = MemoryOptions(mode="knn", datastore="d")
    axes = {"knn_temperature": [1.0, 2.0, 4.0], "knn_lambda": [0.2, 0.4]}
    f = lambda p: -abs(p.knn_temperature - 2) - abs(p.knn_lambda - 0.4)  # noqa: E731
    full = Scorer(f, plain=-10.0)
    expected, best, _ = search(base, axes, full, rounds=0, metric="m", higher_is_better=True)

    log = ScoreLog(tmp_path / "points.jsonl", {"checkpoint": "a.pt", "sentences": [0, 1, 2]})
    assert log.load() == {}

    class Interrupted(Exception):
        pass

    def stops_after_three(points, r):
        out = {}
        for p in points:
            if len(out) == 3:
                raise Interrupted
            out[p] = full(([p]), r)[p]
            log.append(p, out[p])
        return out

    with pytest.raises(Interrupted):
        search(base, axes, stops_after_three, rounds=0, metric="m", higher_is_better=True)
    with open(log.path, "a") as cut:  # an append cut short by the interruption
        cut.write('{"options": {"mode": "kn')
    known = ScoreLog(log.path, {"checkpoint": "a.pt", "sentences": [0, 1, 2]}).load()
    assert len(known) == 3 and log.path.read_text().endswith("}\n")  # the cut line is gone from the file too
    rest = Scorer(f, plain=-10.0)
    scores, best_again, _ = search(base, axes, rest, rounds=0, metric="m", higher_is_better=True, known=known)
    assert scores == expected and best_again == best
    assert len(rest.scored) == len(expected) - 3 and not set(rest.scored) & set(known)

    with pytest.raises(ValueError, match="another tuning"):
        ScoreLog(log.path, {"checkpoint": "b.pt", "sentences": [0, 1, 2]}).load()
    lines = log.path.read_text().splitlines()
    log.path.write_text("\n".join([lines[0], "not json", *lines[1:]]) + "\n")  # damage inside: refused
    with pytest.raises(ValueError, match="line 2 is not a scored point"):
        ScoreLog(log.path, {"checkpoint": "a.pt", "sentences": [0, 1, 2]}).load()
