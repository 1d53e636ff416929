"""Where a SPALM model relies on its long-term memory: the gate g_t = σ(w_g·h_t) over a split (paper §5.3).

Takes every ``fairseq-eval-lm`` option (data, ``--path`` of a ``spalm`` checkpoint,
``--neighbours``, ``--batching stream`` or ``--context-window``, ``--gen-subset``)
and reads the gate of every scored position (g = 1: local context and
Transformer-XL memory only; g = 0: the neighbours' embeddings only). Prints a
markdown summary -- mean, quantiles, the mean where a neighbour holds the target
and where none does, and how much of z comes from the memory (the gate weighs
vectors of different norms: ‖m‖ ≤ max ‖y_k‖, ‖h‖ the final state's) -- and writes a
histogram (PNG)::

    python -m trime_fairseq.cli.spalm_gates data-bin/wikitext-2 --user-dir trime_fairseq --task trime_lm \\
        --path runs/spalm/checkpoint_last.pt --neighbours runs/neighbours --gen-subset valid \\
        --batching stream --tokens-per-sample 64 --batch-size 8 --histogram gates_valid.png
"""

import sys

import numpy as np
import torch

from trime_fairseq.atomic import atomic_path
from trime_fairseq.cli import setup_logging
from trime_fairseq.cli.loading import eval_batches, eval_lm_config, load_eval_models
from trime_fairseq.memory.keys import NEIGHBOUR_TOKENS
from trime_fairseq.models.spalm import SPALM_GATE, SPALM_HIDDEN, SPALM_MEMORY


def add_args(parser):
    group = parser.add_argument_group("spalm gates")
    group.add_argument("--histogram", required=True, help="PNG to write the gate histogram to")
    group.add_argument("--bins", type=int, default=50)


def get_parser():
    """The parser: fairseq-eval-lm's plus the options above (parse it with ``options.parse_args_and_arch``)."""
    from fairseq import options

    parser = options.get_eval_lm_parser()
    add_args(parser)
    return parser


@torch.no_grad()
def collect_gates(cfg):
    """(gates (P,), target among the neighbours (P,) bool, share of z from the long-term memory (P,)) of the
    split's scored positions, in stream order; the share is ‖(1 − g)·m‖ / (‖(1 − g)·m‖ + ‖g·h‖)."""
    models, task = load_eval_models(cfg)
    if len(models) != 1:
        raise ValueError("give one --path")
    model = models[0]
    pad = task.target_dictionary.pad()
    gates, hits, shares = [], [], []
    for sample in eval_batches(cfg, task, models):
        _, extra = model(**sample["net_input"])
        if SPALM_GATE not in extra:
            raise ValueError(f"{type(model).__name__} has no SPALM gate: give a spalm checkpoint")
        scored = sample["target"].ne(pad)  # (B, T)
        target_in_memory = extra[NEIGHBOUR_TOKENS].eq(sample["target"].unsqueeze(-1)).any(-1)  # (B, T)
        g = extra[SPALM_GATE].unsqueeze(-1)
        long_term = ((1 - g) * extra[SPALM_MEMORY]).norm(dim=-1)  # (B, T)
        local = (g * extra[SPALM_HIDDEN]).norm(dim=-1)
        gates.append(extra[SPALM_GATE][scored].float().cpu())
        hits.append(target_in_memory[scored].cpu())
        shares.append((long_term / (long_term + local).clamp(min=1e-12))[scored].float().cpu())
    if not gates:
        raise ValueError(f"no tokens to score in split '{cfg.dataset.gen_subset}'")
    return torch.cat(gates).numpy(), torch.cat(hits).numpy(), torch.cat(shares).numpy()


def summary(gates: np.ndarray, hits: np.ndarray, shares: np.ndarray, split: str) -> str:
    q = np.quantile(gates, [0.05, 0.25, 0.5, 0.75, 0.95])
    rows = [
        f"SPALM gate g on {split} ({len(gates)} tokens; g = 1: local context and short-term memory only)",
        "",
        "| statistic | value |",
        "|---|---|",
        f"| mean g | {gates.mean():.4f} |",
        f"| quantiles 5 / 25 / 50 / 75 / 95 % | {' / '.join(f'{x:.3f}' for x in q)} |",
        f"| share of tokens with g < 0.5 | {(gates < 0.5).mean():.4f} |",
        f"| tokens whose target is among the neighbours | {hits.mean():.4f} |",
        f"| mean g where it is | {gates[hits].mean() if hits.any() else float('nan'):.4f} |",
        f"| mean g where it is not | {gates[~hits].mean() if (~hits).any() else float('nan'):.4f} |",
        f"| mean share of z from the memory, ‖(1−g)·m‖ / (‖(1−g)·m‖ + ‖g·h‖) | {shares.mean():.4f} |",
    ]
    return "\n".join(rows)


def plot(gates: np.ndarray, hits: np.ndarray, path: str, bins: int, split: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    edges = np.linspace(0.0, 1.0, bins + 1)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.hist([gates[hits], gates[~hits]], bins=edges, stacked=True, weights=[np.full(hits.sum(), 1 / len(gates)),
            np.full((~hits).sum(), 1 / len(gates))], label=["target among the neighbours", "target not among them"])
    ax.axvline(gates.mean(), color="black", linestyle="--", linewidth=1, label=f"mean {gates.mean():.3f}")
    ax.set_xlabel("gate g (1: local context, 0: long-term memory)")
    ax.set_ylabel("share of tokens")
    ax.set_title(f"SPALM gate values, {split}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def main(argv=None):
    cfg, args = eval_lm_config(sys.argv[1:] if argv is None else argv, add_args)
    gates, hits, shares = collect_gates(cfg)
    print(summary(gates, hits, shares, cfg.dataset.gen_subset))
    plot(gates, hits, args.histogram, args.bins, cfg.dataset.gen_subset)
    return gates, hits, shares


if __name__ == "__main__":
    setup_logging()
    main()
