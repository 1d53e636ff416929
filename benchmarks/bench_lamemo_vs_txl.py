"""LaMemo vs Transformer-XL at equal sizes: training step time, evaluation tokens/s, peak memory, FLOPs.

    OMP_NUM_THREADS=1 python benchmarks/bench_lamemo_vs_txl.py [--size wikitext2_small] [--tgt 64] [--mem 64]
        [--batch 8] [--vocab 33278] [--steps 5] [--runs 5] [--device cpu] [--flops]
    OMP_NUM_THREADS=1 python benchmarks/bench_lamemo_vs_txl.py --flops-only --size wt103_base \
        --tgt 150 --mem 150 --batch 1 --vocab 267735

Both models are built in-process from the same architecture function (no data
files: random tokens with Zipfian frequencies), run on a stream of segments with a full memory (one
warm-up segment first), and are measured alternately in one process:

* train step: forward + adaptive-softmax / cross-entropy loss + backward + Adam step;
* eval: no-grad forward of one segment and its targets' log-probabilities, as tokens/s;
* peak memory above the starting point during one train step / one eval forward
  (CPU: summed allocation events of torch.profiler; CUDA: max_memory_allocated);
* ``--flops``: matmul FLOPs per token of one eval step (torch.utils.flop_counter; the
  adaptive softmax counts the head and the target's tail clusters).

Times are medians over ``--runs`` × ``--steps`` steps; on the CPU they are the process's CPU time
(``time.process_time``, with ``OMP_NUM_THREADS=1``), which other jobs on a shared machine do not
inflate, on a GPU wall time after synchronising. Paper (LaMemo Table 1, WT103 base,
tgt = mem = 150): 157M vs 191M FLOPs per token, ratio 1.22; target ratio <= 1.3.
"""

import argparse
import statistics
import time
from argparse import Namespace

import torch
import torch.nn.functional as F
from fairseq.data import Dictionary

import trime_fairseq  # noqa: F401  (registers the models)
from trime_fairseq.models import lamemo as lamemo_module
from trime_fairseq.models import transformer_xl as xl_module

SIZES = {"wikitext2_small": xl_module.wikitext2_small, "wt103_base": xl_module.wt103_base, "enwik8": xl_module.enwik8_base}
MODELS = {
    "Transformer-XL": (xl_module.TransformerXLDecoder, xl_module.TransformerXLConfig),
    "LaMemo": (lamemo_module.LaMemoDecoder, lamemo_module.LaMemoConfig),
}


def build(name, size, vocab, mem, device, seed=1):
    decoder_cls, config_cls = MODELS[name]
    args = Namespace(mem_len=mem)
    SIZES[size](args, config_cls)
    args.max_target_positions = None
    d = Dictionary()
    for i in range(vocab - d.nspecial):
        d.add_symbol(f"w{i}")
    torch.manual_seed(seed)
    decoder = decoder_cls(args, d).to(device)
    decoder.recurrent_memory.enable(True)
    return decoder


def zipf_tokens(vocab: int, shape, seed: int = 0) -> torch.Tensor:
    """Random tokens with Zipfian frequencies (p(rank r) ∝ 1/r), like text over a frequency-sorted
    fairseq dictionary: the adaptive softmax's clusters are used as on real data."""
    g = torch.Generator().manual_seed(seed)
    weights = 1.0 / torch.arange(1, vocab - 4 + 1, dtype=torch.float64)
    flat = torch.multinomial(weights, int(torch.tensor(shape).prod()), replacement=True, generator=g)
    return (flat + 4).view(*shape)


def lm_loss(decoder, features, target):
    asm = decoder.adaptive_softmax
    if asm is None:
        logits = decoder.output_layer(features)
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), target.reshape(-1))
    logits, targets = asm(features, target.reshape(-1))
    loss = sum(F.cross_entropy(l.float(), t, reduction="sum") for l, t in zip(logits, targets) if t is not None)
    return loss / target.numel()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def clock(device) -> float:
    """CPU time of this process on the CPU (robust to other jobs on the machine), wall time on a GPU."""
    return time.perf_counter() if device.type == "cuda" else time.process_time()


def train_step(decoder, optimizer, segment, target):
    optimizer.zero_grad(set_to_none=True)
    features, _ = decoder(segment, features_only=True)
    lm_loss(decoder, features, target).backward()
    optimizer.step()


@torch.no_grad()
def eval_step(decoder, segment, target):
    """Scoring a segment: forward + log-probability of the targets (what fairseq-eval-lm does)."""
    features, _ = decoder(segment, features_only=True)
    return lm_loss(decoder, features, target)


def peak_bytes(fn, device):
    """Peak memory allocated above the starting point while ``fn`` runs."""
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        fn()
        sync(device)
        return torch.cuda.max_memory_allocated(device) - start
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    deltas = []
    for event in prof.events():  # allocations attributed to ops (self), frees as [memory] events
        size = event.cpu_memory_usage if event.name == "[memory]" else event.self_cpu_memory_usage
        if size:
            deltas.append((event.time_range.start, size))
    running = peak = 0
    for _, size in sorted(deltas):
        running += size
        peak = max(peak, running)
    return peak


def flops_per_token(decoder, segment, target):
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        eval_step(decoder, segment, target)
    return counter.get_total_flops() / segment.numel()


def measure_flops(args):
    """FLOPs per token only (no timing): affordable on CPU at the papers' sizes."""
    device = torch.device(args.device)
    tokens = zipf_tokens(args.vocab, (args.batch, 2 * args.tgt + 1)).to(device)
    first, second = (tokens[:, : args.tgt], tokens[:, 1 : args.tgt + 1]), (tokens[:, args.tgt : -1], tokens[:, args.tgt + 1 :])
    results = {}
    for name in MODELS:
        decoder = build(name, args.size, args.vocab, args.mem, device).eval()
        eval_step(decoder, *first)  # fills the memory
        results[name] = {
            "params": sum(p.numel() for p in decoder.parameters()),
            "flops": flops_per_token(decoder, *second),
        }
        del decoder
    return results


def measure(args):
    device = torch.device(args.device)
    total = args.tgt * (1 + args.steps + 1)
    tokens = zipf_tokens(args.vocab, (args.batch, total + 1)).to(device)
    segments = [
        (tokens[:, s : s + args.tgt], tokens[:, s + 1 : s + 1 + args.tgt]) for s in range(0, total, args.tgt)
    ]
    models = {name: build(name, args.size, args.vocab, args.mem, device) for name in MODELS}
    optimizers = {name: torch.optim.Adam(m.parameters(), lr=1e-4) for name, m in models.items()}
    results = {name: {"train": [], "eval": []} for name in models}
    for _ in range(args.runs):
        for name, decoder in models.items():  # alternate the models: shared-machine noise hits both
            decoder.train()
            decoder.recurrent_memory.reset()
            train_step(decoder, optimizers[name], *segments[0])  # fills the memory (and Adam's state)
            for segment, target in segments[1 : 1 + args.steps]:
                sync(device)
                start = clock(device)
                train_step(decoder, optimizers[name], segment, target)
                sync(device)
                results[name]["train"].append(clock(device) - start)
            decoder.eval()
            decoder.recurrent_memory.reset()
            eval_step(decoder, *segments[0])
            for segment, target in segments[1 : 1 + args.steps]:
                sync(device)
                start = clock(device)
                eval_step(decoder, segment, target)
                sync(device)
                results[name]["eval"].append(segment.numel() / (clock(device) - start))
    for name, decoder in models.items():
        decoder.train()
        decoder.recurrent_memory.reset()
        train_step(decoder, optimizers[name], *segments[0])
        results[name]["train_peak"] = peak_bytes(lambda: train_step(decoder, optimizers[name], *segments[1]), device)
        decoder.eval()
        decoder.recurrent_memory.reset()
        eval_step(decoder, *segments[0])
        results[name]["eval_peak"] = peak_bytes(lambda: eval_step(decoder, *segments[1]), device)
        results[name]["params"] = sum(p.numel() for p in decoder.parameters())
        if args.flops:
            decoder.recurrent_memory.reset()
            eval_step(decoder, *segments[0])
            results[name]["flops"] = flops_per_token(decoder, *segments[1])
    return results


def table(results, args):
    xl, la = results["Transformer-XL"], results["LaMemo"]
    rows = [("params (M)", lambda r: r["params"] / 1e6, "{:.2f}")]
    if not args.flops_only:
        rows += [
            ("train step (ms, median)" + (" CPU time" if args.device == "cpu" else ""),
             lambda r: 1e3 * statistics.median(r["train"]), "{:.1f}"),
            ("eval tokens/s (median)", lambda r: statistics.median(r["eval"]), "{:.0f}"),
            ("peak memory train (MiB)", lambda r: r["train_peak"] / 2**20, "{:.1f}"),
            ("peak memory eval (MiB)", lambda r: r["eval_peak"] / 2**20, "{:.1f}"),
        ]
    if args.flops or args.flops_only:
        rows.append(("FLOPs per token (M, eval)", lambda r: r["flops"] / 1e6, "{:.1f}"))
    runs = "FLOPs only" if args.flops_only else f"{args.runs} runs × {args.steps} steps"
    lines = [
        f"size {args.size}, tgt {args.tgt}, mem {args.mem}, batch {args.batch}, vocab {args.vocab}, "
        f"device {args.device}, {runs}",
        "",
        "| metric | Transformer-XL | LaMemo | LaMemo / XL |",
        "|---|---|---|---|",
    ]
    for label, get, fmt in rows:
        a, b = get(xl), get(la)
        lines.append(f"| {label} | {fmt.format(a)} | {fmt.format(b)} | {b / a:.2f} |")
    return "\n".join(lines)


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="wikitext2_small")
    parser.add_argument("--tgt", type=int, default=64, help="segment length (tokens per sample)")
    parser.add_argument("--mem", type=int, default=64, help="memory length")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=33278, help="WikiText-2's vocabulary size by default")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per run")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--flops", action="store_true", help="also count matmul FLOPs per token")
    parser.add_argument("--flops-only", action="store_true", help="only count FLOPs (e.g. --size wt103_base)")
    return parser


def main():
    args = get_parser().parse_args()
    print(table(measure_flops(args) if args.flops_only else measure(args), args))


if __name__ == "__main__":
    main()
