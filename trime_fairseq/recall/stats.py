"""Per-gap statistics of a scored split: mean log-probability, perplexity and top-1 accuracy of the scored
tokens of every (variant, gap), in their second occurrence (recall) and their first (the same words before
they were ever seen: the control)."""

import math
from typing import Dict, List

import numpy as np

from trime_fairseq.recall.index import RecallIndex, positions_of, selection

OCCURRENCES = ("second", "first")


def summarise(log_probs: np.ndarray, correct: np.ndarray) -> Dict:
    """tokens, mean log-probability (nats), perplexity exp(−mean), top-1 accuracy."""
    n = int(len(log_probs))
    if n == 0:
        return dict(tokens=0, mean_log_prob=None, ppl=None, accuracy=None)
    mean = float(np.mean(log_probs, dtype=np.float64))
    return dict(tokens=n, mean_log_prob=mean, ppl=math.exp(-mean), accuracy=float(np.mean(correct)))


def bucket_stats(index: RecallIndex, log_probs: np.ndarray, correct: np.ndarray) -> List[Dict]:
    """One row per (variant, gap, occurrence). ``log_probs`` / ``correct``: (tokens,) arrays by stream position
    (the log-probability of the token at that position given the ones before, and whether it was the top-1)."""
    log_probs, correct = np.asarray(log_probs), np.asarray(correct, dtype=bool)
    if log_probs.shape != (index.tokens,) or correct.shape != (index.tokens,):
        raise ValueError(f"expected arrays of the split's {index.tokens} positions, got {log_probs.shape}")
    rows = []
    for variant in index.variants:
        for gap in index.gaps:
            chosen = selection(index, variant, gap)
            for occurrence in OCCURRENCES:
                at = positions_of(index, occurrence)[chosen]
                values = log_probs[at]
                if np.isnan(values).any():
                    raise ValueError(f"{int(np.isnan(values).sum())} indexed positions ({variant}, gap {gap}, "
                                     f"{occurrence}) were not scored")
                row = dict(variant=variant, gap=int(gap), occurrence=occurrence,
                           episodes=int(len(set(index.episode[chosen].tolist()))))
                row.update(summarise(values, correct[at]))
                row["log_probs"] = [round(float(x), 6) for x in values]  # in index order: paired across runs
                rows.append(row)
    return rows


def find(rows: List[Dict], variant: str, gap: int, occurrence: str = "second") -> Dict:
    for r in rows:
        if r["variant"] == variant and r["gap"] == gap and r["occurrence"] == occurrence:
            return r
    raise KeyError((variant, gap, occurrence))


def markdown(rows: List[Dict], title: str = "") -> str:
    """A table: one line per (variant, gap), perplexity and accuracy of both occurrences."""
    lines = [title, ""] if title else []
    lines += ["| variant | gap | tokens | 2nd ppl | 2nd acc | 1st ppl (control) | 1st acc |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    keys = sorted({(r["variant"], r["gap"]) for r in rows}, key=lambda k: (k[0] != "span", k[1]))
    for variant, gap in keys:
        s, f = find(rows, variant, gap, "second"), find(rows, variant, gap, "first")
        lines.append(f"| {variant} | {gap} | {s['tokens']} | {_num(s['ppl'])} | {_num(s['accuracy'], 3)} | "
                     f"{_num(f['ppl'])} | {_num(f['accuracy'], 3)} |")
    return "\n".join(lines) + "\n"


def _num(value, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"
