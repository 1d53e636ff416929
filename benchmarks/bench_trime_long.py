"""TRIMELM_long costs: training step time, and evaluation throughput vs long-term memory size.

    OMP_NUM_THREADS=1 python benchmarks/bench_trime_long.py [--arch trime_lm_wikitext2_small] \\
        [--tokens 256] [--segments 4] [--runs 7] [--sizes 0,1024,4096,16384] [--context 256]

One process, the model built in-process (random tokens over a WikiText-2-sized
vocabulary, no data files), medians of ``--runs`` repetitions:

1. Training: forward + backward of one batch holding one run of ``--segments``
   (``--full-softmax``: the same architecture without adaptive softmax / input)
   consecutive segments of ``--tokens`` tokens (memory = the whole run) with the
   plain criterion (adaptive_loss / cross_entropy), trime_loss (local memory only),
   trime_long_loss (dense) and trime_long_loss with checkpointed query blocks.
2. Evaluation: fairseq's SequenceScorer (the scorer of fairseq-eval-lm) on rows of
   ``--context`` + ``--tokens`` tokens (batch size 1, as the paper), Eq. 6 with a
   long-term memory of N entries (the ring buffer is filled first: steady state).
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
from fairseq.sequence_scorer import SequenceScorer

import trime_fairseq  # noqa: F401
from trime_fairseq.criterions.trime_long_loss import TrimeLongLoss
from trime_fairseq.criterions.trime_loss import TrimeLoss
from trime_fairseq.memory.eval_memory import EvalMemory, MemoryOptions, attach_eval_memory
from trime_fairseq.memory.keys import ensure_key_capture
from trime_fairseq.tasks.trime_lm import TrimeLMConfig, TrimeLMTask


def build(arch, vocab, tokens, full_softmax=False):
    d = Dictionary()
    for i in range(vocab - d.nspecial):
        d.add_symbol(f"w{i}")
    task = TrimeLMTask(TrimeLMConfig(tokens_per_sample=tokens, batching="consecutive", consecutive_segments=1), d)
    args = Namespace(arch=arch, tokens_per_sample=tokens, max_target_positions=tokens, criterion="cross_entropy")
    ARCH_CONFIG_REGISTRY[arch](args)
    args.dropout = args.attention_dropout = args.activation_dropout = 0.0
    if full_softmax:  # plain output layer: the plain criterion is cross_entropy
        args.adaptive_softmax_cutoff = args.adaptive_input_cutoff = None
        args.adaptive_input = args.tie_adaptive_weights = args.tie_adaptive_proj = False
    model = TransformerLanguageModel.build_model(args, task)
    ensure_key_capture(model)
    return task, model, bool(getattr(args, "adaptive_softmax_cutoff", None))


def median_time(fn, runs, warmup=1):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def train_table(task, model, adaptive, args):
    m, tokens = args.segments, args.tokens
    x = torch.randint(task.dictionary.nspecial, len(task.dictionary), (m, tokens + 1))
    sample = {
        "net_input": {"src_tokens": x[:, :-1].contiguous(), "src_lengths": torch.full((m,), tokens)},
        "target": x[:, 1:].contiguous(), "ntokens": m * tokens, "nsentences": m, "segments_per_run": m,
    }
    common = dict(ce_warmup_ratio=0.0, ce_warmup_updates=None, max_update=0, sentence_avg=False)
    plain_name = "adaptive_loss" if adaptive else "cross_entropy"
    criteria = [
        (plain_name, AdaptiveLoss(task, sentence_avg=False) if adaptive else CrossEntropyCriterion(task, sentence_avg=False)),
        ("trime_loss (local memory)", TrimeLoss(task, **common)),
        (f"trime_long_loss (memory {m} segments, dense)", TrimeLongLoss(task, memory_block_size=0, **common)),
        (f"trime_long_loss (memory {m} segments, blocks of {args.block})",
         TrimeLongLoss(task, memory_block_size=args.block, **common)),
    ]
    model.train()

    def step(criterion):
        def run():
            model.zero_grad(set_to_none=True)
            loss, _, _ = criterion(model, sample)
            loss.backward()
        return run

    times = {}
    for _ in range(args.runs):  # interleave the criteria: same contention for all
        for name, criterion in criteria:
            criterion.train()
            times.setdefault(name, []).append(median_time(step(criterion), 1, warmup=0))
    base = statistics.median(times[plain_name])
    print(f"\nTraining step: arch={args.arch}, batch = 1 run of {m} x {tokens} tokens, "
          f"threads={torch.get_num_threads()}, median of {args.runs}")
    print("| criterion | s/step | tokens/s | vs plain |")
    print("|---|---:|---:|---:|")
    for name, _ in criteria:
        t = statistics.median(times[name])
        print(f"| {name} | {t:.3f} | {m * tokens / t:.0f} | {t / base:.3f} |")


def eval_table(task, model, args):
    sizes = [int(s) for s in args.sizes.split(",")]
    model.eval()
    pad, tokens, context = task.dictionary.pad(), args.tokens, args.context
    scorer = SequenceScorer(task.target_dictionary)
    g = torch.Generator().manual_seed(0)
    row = context + tokens

    def batch(i):
        x = torch.randint(task.dictionary.nspecial, len(task.dictionary), (1, row + 1), generator=g)
        target = x[:, 1:].clone()
        target[:, :context] = pad
        return {"id": torch.tensor([i]), "net_input": {"src_tokens": x[:, :-1], "src_lengths": torch.tensor([row])},
                "target": target, "start_indices": [context], "ntokens": tokens}

    print(f"\nEvaluation: arch={args.arch}, rows of {context} context + {tokens} scored tokens, batch size 1, "
          f"Eq. 6 (trime), threads={torch.get_num_threads()}, median of {args.runs} batches")
    print("| long-term memory N | s/batch | scored tokens/s | vs N=0 |")
    print("|---:|---:|---:|---:|")
    base = None
    for n in sizes:
        options = MemoryOptions("trime", long_memory_size=n)
        memory = EvalMemory(options, pad)
        attach_eval_memory(model, memory)
        if n > 0:  # steady state: a full buffer of N earlier stream entries
            keys = torch.randn(n, model.decoder.embed_dim)
            for buffer in memory.stream.buffers.values():
                buffer.append(keys, torch.randint(4, len(task.dictionary), (n,)), torch.arange(n))
            memory.stream.position, memory.stream.last_id = n, -1
        counter = iter(range(10**6))
        with torch.no_grad():
            t = median_time(lambda: scorer.generate([model], batch(next(counter))), args.runs)
        base = base or t
        print(f"| {n} | {t:.3f} | {tokens / t:.0f} | {t / base:.2f} |")


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="trime_lm_wikitext2_small")
    parser.add_argument("--vocab", type=int, default=33278)
    parser.add_argument("--tokens", type=int, default=256, help="segment length L (training) / scored tokens per row")
    parser.add_argument("--segments", type=int, default=4, help="m: segments per run (training memory)")
    parser.add_argument("--block", type=int, default=256, help="query block of the blockwise trime_long_loss")
    parser.add_argument("--context", type=int, default=256, help="context tokens per evaluation row")
    parser.add_argument("--sizes", default="0,1024,4096,16384", help="long-term memory sizes (evaluation)")
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--full-softmax", action="store_true", help="drop the adaptive softmax / input")
    parser.add_argument("--skip-train", action="store_true")
    parser.add_argument("--skip-eval", action="store_true")
    return parser


def main():
    args = get_parser().parse_args()
    torch.manual_seed(0)
    task, model, adaptive = build(args.arch, args.vocab, max(args.tokens, args.context + args.tokens), args.full_softmax)
    if not args.skip_train:
        train_table(task, model, adaptive, args)
    if not args.skip_eval:
        eval_table(task, model, args)


if __name__ == "__main__":
    main()
