"""Every system against its control (``trime-recall report``) and the plot (``trime-recall plot``).

A score file (``trime-recall score``) names its control (the same model without the memory) and its reach
[lo, hi]: a token whose copy lies at distance d = S + gap is inside the memory when d <= lo, beyond it when
d > hi. The gain of a memory on a set of tokens is its mean log-probability minus the control's (nats per
token). The verdicts:

* inside the memory's reach and beyond the control's: the memory must gain on the second occurrences, and more
  than on the first occurrences (the same words before any copy exists) -- except for an unbounded memory whose
  store holds the first occurrences themselves (datastore), where the first occurrences are no control;
* beyond the memory's reach: its gain on the second occurrences may exceed its gain on the first by at most the
  tolerance (a larger one would be recall from where the memory cannot reach: a leak);
* inside both reaches or at an edge: reported, no verdict.
"""

import json
import math
from pathlib import Path
from typing import Dict, List, Optional

from trime_fairseq.atomic import atomic_path
from trime_fairseq.recall.stats import find


def load_scores(paths) -> List[Dict]:
    scores = [json.loads(Path(p).read_text(encoding="utf-8")) for p in paths]
    labels = [s["label"] for s in scores]
    if len(set(labels)) != len(labels):
        raise ValueError(f"two score files share a label: {labels}")
    known = set(labels)
    for s in scores:
        if s.get("control") and s["control"] not in known:
            raise ValueError(f"{s['label']}: its control '{s['control']}' is not among the score files")
    return scores


def region(distance: float, reach: Optional[List[float]]) -> str:
    if reach is None:
        return "none"
    lo, hi = reach
    return "inside" if distance <= lo else "beyond" if distance > hi else "edge"


def gain(memory: Dict, control: Dict, variant: str, gap: int, occurrence: str) -> float:
    """Mean log-probability of ``memory`` minus its control's on one bucket (nats per token)."""
    return (find(memory["buckets"], variant, gap, occurrence)["mean_log_prob"]
            - find(control["buckets"], variant, gap, occurrence)["mean_log_prob"])


def verdict(memory: Dict, control: Dict, variant: str, gap: int, tolerance: float) -> Dict:
    d = memory["lengths"][variant] + gap  # from a token of the second occurrence back to its copy
    mine, theirs = region(d, memory.get("reach")), region(d, control.get("reach"))
    m2, c2 = find(memory["buckets"], variant, gap, "second"), find(control["buckets"], variant, gap, "second")
    m1, c1 = find(memory["buckets"], variant, gap, "first"), find(control["buckets"], variant, gap, "first")
    gain2, gain1 = gain(memory, control, variant, gap, "second"), gain(memory, control, variant, gap, "first")
    se2 = _standard_error(m2, c2)
    se_diff = _standard_error(m2, c2, m1, c1)
    unbounded = memory.get("reach") is not None and math.isinf(memory["reach"][1])
    if mine == "inside" and theirs != "inside":
        ok = gain2 > 2 * se2 and (unbounded or gain2 - gain1 > 2 * se_diff)
        expected = "gain"
    elif mine == "beyond":
        ok = gain2 - gain1 <= tolerance + 2 * se_diff
        expected = "no gain"
    else:
        ok, expected = None, "inside both" if mine == "inside" else "edge"
    return dict(gain_second=gain2, gain_first=gain1, expected=expected, ok=ok)


def _standard_error(*rows) -> float:
    """The standard error of the mean of the per-token differences rows[0] − rows[1] (+ rows[3] − rows[2]...:
    (memory − control) on the second occurrences minus the same on the first); 0 without per-token values."""
    if any("log_probs" not in r for r in rows):
        return 0.0
    import numpy as np

    values = [np.asarray(r["log_probs"], dtype=np.float64) for r in rows]
    diff = values[0] - values[1]
    if len(values) == 4:
        diff = diff - (values[2] - values[3])
    return float(diff.std(ddof=1) / math.sqrt(len(diff))) if len(diff) > 1 else 0.0


def report_markdown(scores: List[Dict], tolerance: float = 0.05) -> str:
    by_label = {s["label"]: s for s in scores}
    variants = [v for v in ("span", "passkey") if any(b["variant"] == v for s in scores for b in s["buckets"])]
    gaps = sorted({b["gap"] for s in scores for b in s["buckets"]})
    out = []
    for variant in variants:
        out += [f"**{variant}**: perplexity / top-1 accuracy of the scored tokens' second occurrence "
                "(first occurrence in brackets: the same words before any copy)", "",
                "| system | control | reach | " + " | ".join(f"gap {g}" for g in gaps) + " |",
                "|---|---|---|" + "---:|" * len(gaps)]
        for s in scores:
            cells = []
            for g in gaps:
                second, first = find(s["buckets"], variant, g, "second"), find(s["buckets"], variant, g, "first")
                cells.append(f"{second['ppl']:.1f} / {second['accuracy']:.2f} ({first['ppl']:.1f})")
            out.append(f"| {s['label']} | {s.get('control') or '-'} | {_reach(s.get('reach'))} | " + " | ".join(cells) + " |")
        out.append("")
    out += ["Verdicts (gain = mean log-prob of the memory minus its control's, nats/token, 2nd occurrence / 1st):",
            "", "| system | variant | " + " | ".join(f"gap {g}" for g in gaps) + " |", "|---|---|" + "---|" * len(gaps)]
    failures = 0
    for s in scores:
        if not s.get("control"):
            continue
        control = by_label[s["control"]]
        for variant in variants:
            cells = []
            for g in gaps:
                v = verdict(s, control, variant, g, tolerance)
                mark = {True: "✓", False: "✗", None: ""}[v["ok"]]
                failures += v["ok"] is False
                cells.append(f"{v['gain_second']:+.2f} / {v['gain_first']:+.2f} {v['expected']} {mark}".strip())
            out.append(f"| {s['label']} | {variant} | " + " | ".join(cells) + " |")
    out += ["", f"{failures} verdict(s) failed (tolerance {tolerance} nats)."]
    return "\n".join(out) + "\n"


def _reach(reach) -> str:
    if reach is None:
        return "-"
    lo, hi = reach
    fmt = lambda x: "∞" if math.isinf(x) else str(int(x))  # noqa: E731
    return fmt(lo) if lo == hi else f"{fmt(lo)}–{fmt(hi)}"


def plot(scores: List[Dict], path) -> None:
    """The gain of every memory over its control on the second occurrences (nats per token) vs gap, a panel per
    control (the memories of one model): spans solid, pass keys dashed, a dotted line at the gap where the copy
    leaves the memory's reach (distance S + gap > hi). Without memories (controls alone): their perplexities."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_label = {s["label"]: s for s in scores}
    variants = [v for v in ("span", "passkey") if any(b["variant"] == v for s in scores for b in s["buckets"])]
    families: Dict[str, List[Dict]] = {}
    for s in scores:
        if s.get("control"):
            families.setdefault(s["control"], []).append(s)
    compared = bool(families)
    if not compared:  # controls alone: nothing to compare, show what they score
        families = {s["label"]: [s] for s in scores}
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    n = len(families)
    cols = min(n, 4)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
    for ax, (control, members) in zip(axes.flat, families.items()):
        for k, s in enumerate(members):
            colour = colours[k % len(colours)]
            for variant, style in zip(variants, ("-", "--")):
                gaps = sorted({b["gap"] for b in s["buckets"] if b["variant"] == variant})
                ys = [gain(s, by_label[control], variant, g, "second") if compared
                      else math.log(find(s["buckets"], variant, g, "second")["ppl"]) for g in gaps]
                ax.plot([max(g, 1) for g in gaps], ys, linestyle=style, marker="o", markersize=3, color=colour,
                        label=f"{s['label']} ({variant})")
            reach = s.get("reach")
            if reach is not None and not math.isinf(reach[1]):
                edge = reach[1] - min(s["lengths"].values())  # the largest gap whose copy can still be inside
                if edge > 0:
                    ax.axvline(edge, color=colour, linestyle=":", linewidth=1)
        ax.axhline(0.0, color="black", linewidth=0.6)
        ax.set_xscale("log")
        ax.set_title(f"memories of {control}" if compared else control, fontsize=9)
        ax.set_xlabel("gap (tokens)", fontsize=8)
        ax.set_ylabel("gain over the control (nats/token)" if compared else "log perplexity", fontsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
