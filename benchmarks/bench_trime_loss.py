"""Training step time of trime_loss vs the plain criterion on the same model and batch.

    python benchmarks/bench_trime_loss.py [--arch trime_lm_wiki103_7m] [--tokens 512] [--batch 4] [--runs 7]

Builds the model in-process (no data files: random tokens over a WikiText-2-sized
vocabulary), alternates the criteria step by step, and prints the median step
time (forward + backward) of each and their ratio. The plain criterion is
`adaptive_loss` for adaptive-softmax models, `cross_entropy` otherwise.
Paper (TRIME Table 2): identical throughput, 3.6k tokens/s for both; target ratio <= 1.05.
"""

import argparse
import statistics
import time
from argparse import Namespace

import torch
from fairseq.criterions.adaptive_loss import AdaptiveLoss
from fairseq.criterions.cross_entropy import CrossEntropyCriterion
from fairseq.data import Dictionary
from fairseq.models import ARCH_CONFIG_REGISTRY
from fairseq.models.transformer_lm import TransformerLanguageModel

import trime_fairseq  # noqa: F401
from trime_fairseq.criterions.trime_loss import TrimeLoss
from trime_fairseq.tasks.trime_lm import TrimeLMConfig, TrimeLMTask


def build(arch, vocab, tokens):
    d = Dictionary()
    for i in range(vocab - d.nspecial):
        d.add_symbol(f"w{i}")
    task = TrimeLMTask(TrimeLMConfig(tokens_per_sample=tokens), d)
    args = Namespace(arch=arch, tokens_per_sample=tokens, max_target_positions=tokens, criterion="cross_entropy")
    ARCH_CONFIG_REGISTRY[arch](args)
    args.dropout = args.attention_dropout = args.activation_dropout = 0.0
    cutoff = getattr(args, "adaptive_softmax_cutoff", None)
    if cutoff:  # keep the paper's cluster count, scaled to the vocabulary
        args.adaptive_softmax_cutoff = args.adaptive_input_cutoff = f"{vocab // 16},{vocab // 3}"
    model = TransformerLanguageModel.build_model(args, task)
    return task, model, bool(cutoff)


def step_time(model, criterion, sample):
    model.zero_grad(set_to_none=True)
    start = time.perf_counter()
    loss, _, _ = criterion(model, sample)
    loss.backward()
    return time.perf_counter() - start


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="trime_lm_wiki103_7m")
    parser.add_argument("--vocab", type=int, default=33278)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--runs", type=int, default=7)
    return parser


def main():
    args = get_parser().parse_args()

    torch.manual_seed(0)
    task, model, adaptive = build(args.arch, args.vocab, args.tokens)
    model.train()
    trime = TrimeLoss(task, ce_warmup_ratio=0.0, ce_warmup_updates=None, max_update=0, sentence_avg=False)
    plain = AdaptiveLoss(task, sentence_avg=False) if adaptive else CrossEntropyCriterion(task, sentence_avg=False)
    trime.train()
    plain.train()
    x = torch.randint(task.dictionary.nspecial, args.vocab, (args.batch, args.tokens + 1))
    sample = {
        "net_input": {"src_tokens": x[:, :-1].contiguous(), "src_lengths": torch.full((args.batch,), args.tokens)},
        "target": x[:, 1:].contiguous(),
        "ntokens": args.batch * args.tokens,
        "nsentences": args.batch,
    }
    times = {"plain": [], "trime": []}
    for _ in range(2):  # warm-up
        step_time(model, plain, sample), step_time(model, trime, sample)
    for _ in range(args.runs):
        times["plain"].append(step_time(model, plain, sample))
        times["trime"].append(step_time(model, trime, sample))
    med = {k: statistics.median(v) for k, v in times.items()}
    tokens = args.batch * args.tokens
    name = "adaptive_loss" if adaptive else "cross_entropy"
    print(f"arch={args.arch} vocab={args.vocab} batch={args.batch}x{args.tokens} threads={torch.get_num_threads()} runs={args.runs}")
    print(f"| criterion | median step (s) | tokens/s |")
    print(f"|---|---|---|")
    print(f"| {name} | {med['plain']:.4f} | {tokens / med['plain']:.0f} |")
    print(f"| trime_loss | {med['trime']:.4f} | {tokens / med['trime']:.0f} |")
    print(f"ratio trime_loss / {name}: {med['trime'] / med['plain']:.3f}")


if __name__ == "__main__":
    main()
