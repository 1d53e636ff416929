"""LongMem efficiency in one run: retrieval + fusion cost vs the backbone forward, and LongMem vs a long dense context.

    OMP_NUM_THREADS=1 python benchmarks/bench_longmem.py                  # --preset cpu on a CPU
    python benchmarks/bench_longmem.py --preset paper --device cuda       # the paper's sizes (fp16)

Models are built in-process with random weights (timing does not depend on training) from the
registered classes: an ``alibi_lm`` backbone and ``longmem`` on it; tokens are Zipfian random ids.

1. **Retrieval and fusion shares** (LongMem §3.1: retrieval alone takes 15 ms per 1k tokens, 55% of the
   backbone forward; target for retrieval + fusion <= 25%): one row, a segment of ``--segment`` tokens, a full bank of ``--memory`` tokens. Retrieval =
   :meth:`ChunkMemoryBank.retrieve` (mean-pooled chunk search, top K/csz chunks, gather, scores of the K
   pairs); fusion = the memory half of the joint attention (softmax over the K pairs, weighted values,
   gated mix with the local attention). Both per 1k tokens, as a share of the backbone forward of the
   same segment (layers + output layer, no grad).
2. **LongMem (local 1k + memory 3k) vs the backbone attending to 4k** (LongMem Table 6): a stream of
   ``--context`` tokens scored by LongMem in segments of ``--segment`` with a bank of context − segment
   tokens, and by the backbone in one pass (ALiBi attends over the whole context); tokens/s and peak
   memory above the starting point (CUDA: max_memory_allocated; CPU: torch.profiler allocations).

Times are medians of ``--runs`` repetitions after one warm-up.
"""

import argparse
import math
import statistics
import time
from argparse import Namespace

import torch
from fairseq.data import Dictionary

import trime_fairseq  # noqa: F401  (registers the models)
from bench_lamemo_vs_txl import peak_bytes, sync, zipf_tokens
from trime_fairseq.memory.bank import ChunkMemoryBank
from trime_fairseq.models.alibi_lm import AlibiLMConfig, AlibiLMDecoder, alibi_lm_gpt2_medium
from trime_fairseq.models.longmem import LongMemConfig, LongMemDecoder
from trime_fairseq.models.relative_attention import masked_softmax

PRESETS = {
    # LongMem Table 7: 24 x 1024, 16 heads, vocab 52k; M = 65,536, K = 64, csz = 4, memory layer 9 <- 18
    "paper": dict(layers=24, dim=1024, heads=16, ffn=4096, vocab=52000, memory=65536, memory_layer=9),
    # affordable on one CPU thread: 12 x 512, 8 heads, vocab 32k; M = 16,384; memory layer 5 <- 10
    "cpu": dict(layers=12, dim=512, heads=8, ffn=2048, vocab=32000, memory=16384, memory_layer=5),
}


def build(preset, memory, device, dtype):
    p = PRESETS[preset]
    args = Namespace(decoder_layers=p["layers"], decoder_embed_dim=p["dim"], decoder_attention_heads=p["heads"],
                     decoder_ffn_embed_dim=p["ffn"], dropout=0.0, attention_dropout=0.0)
    alibi_lm_gpt2_medium(args)  # every other field: the paper's architecture defaults
    cfg = AlibiLMConfig(**{k: getattr(args, k) for k in AlibiLMConfig.__dataclass_fields__ if hasattr(args, k)})
    cfg.max_target_positions = None
    dictionary = Dictionary()
    for i in range(p["vocab"] - dictionary.nspecial):
        dictionary.add_symbol(f"w{i}")
    torch.manual_seed(1)
    backbone = AlibiLMDecoder(cfg, dictionary)
    longmem_cfg = LongMemConfig(memory_size=memory, chunk_size=4, memory_k=64, memory_layer=p["memory_layer"],
                                dropout=0.0, tokens_per_sample=None)
    decoder = LongMemDecoder(longmem_cfg, dictionary, backbone).to(device=device, dtype=dtype).eval()
    decoder.recurrent_memory.enable(True)
    return decoder


def median_seconds(fn, device, runs):
    fn()  # warm-up
    times = []
    for _ in range(runs):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@torch.no_grad()
def retrieval_share(args, device, dtype):
    decoder = build(args.preset, args.memory, device, dtype)
    backbone, layer = decoder.backbone, decoder.layers[decoder.memory_layer - 1]
    heads, head_dim = decoder.num_heads, decoder.head_dim
    segment = zipf_tokens(len(backbone.dictionary), (1, args.segment)).to(device)
    # a full bank: the layer-m keys / values of M / segment earlier segments of the stream
    bank = ChunkMemoryBank.empty(decoder.bank_config, 1, heads, head_dim, dtype, device)
    for s in range(math.ceil(args.memory / args.segment)):
        keys, values = backbone.encode(zipf_tokens(len(backbone.dictionary), (1, args.segment), seed=s + 1).to(device)).key_values[
            decoder.backbone_memory_layer - 1]
        bank.append(keys, values, torch.ones(1, args.segment, dtype=torch.bool, device=device))
    x = backbone.encode(segment).hidden[2 * decoder.memory_layer - 2]
    q, k, v = layer.self_attn.project(layer.attn_norm(x))
    visible = torch.ones(args.segment, args.segment, dtype=torch.bool, device=device).tril().view(1, 1, args.segment, -1)
    local = layer.local_attention(q, k, v, visible)
    scale = 1.0 / math.sqrt(head_dim)
    batch = bank.retrieve(q, scale)

    def fuse():
        probs, _ = masked_softmax(batch.scores, batch.mask)
        retrieved = torch.einsum("bhtk,bhtkd->bthd", probs.to(dtype), batch.values)
        gate = torch.sigmoid(layer.gate.float()).view(1, 1, -1, 1)
        return gate * local.float() + (1 - gate) * retrieved.float()

    forward = median_seconds(lambda: backbone(segment), device, args.runs)
    retrieve = median_seconds(lambda: bank.retrieve(q, scale), device, args.runs)
    fusion = median_seconds(fuse, device, args.runs)
    per_1k = 1000.0 / args.segment
    print(f"\n## Retrieval + fusion vs backbone forward ({args.preset}: M = {args.memory}, K = 64, csz = 4, "
          f"segment {args.segment}, {device.type}, {str(dtype).replace('torch.', '')})\n")
    print("| step | ms per 1k tokens | share of the backbone forward |")
    print("|---|---|---|")
    for name, seconds in [("backbone forward (layers + output layer)", forward), ("retrieval (search + gather + scores)", retrieve),
                          ("fusion (memory softmax + values + gate)", fusion), ("retrieval + fusion", retrieve + fusion)]:
        print(f"| {name} | {1000 * seconds * per_1k:.1f} | {seconds / forward:.1%} |")
    print(f"\nretrieval / backbone forward = {retrieve / forward:.3f} (paper, retrieval only: 0.55); "
          f"retrieval + fusion / backbone forward = {(retrieve + fusion) / forward:.3f} (target <= 0.25)")


@torch.no_grad()
def long_context(args, device, dtype):
    memory = args.context - args.segment
    decoder = build(args.preset, memory, device, dtype)
    tokens = zipf_tokens(len(decoder.backbone.dictionary), (1, args.context), seed=7).to(device)

    def longmem():
        decoder.recurrent_memory.reset()
        for s in range(0, args.context, args.segment):
            decoder(tokens[:, s : s + args.segment])

    def dense():
        decoder.backbone(tokens)

    rows = []
    for name, fn, local, mem in [("backbone (ALiBi)", dense, args.context, "-"),
                                 ("LongMem", longmem, args.segment, memory)]:
        seconds = median_seconds(fn, device, args.runs)
        rows.append((name, local, mem, args.context / seconds, peak_bytes(fn, device) / 2**20))
    print(f"\n## LongMem vs a long dense context ({args.preset}, {args.context} tokens, {device.type}, "
          f"{str(dtype).replace('torch.', '')}; LongMem Table 6)\n")
    print("| model | in-context | in-memory | tokens/s | peak memory (MiB) |")
    print("|---|---|---|---|---|")
    for name, local, mem, speed, peak in rows:
        print(f"| {name} | {local} | {mem} | {speed:.0f} | {peak:.0f} |")
    print(f"\nLongMem / backbone: speed x{rows[1][3] / rows[0][3]:.2f}, peak memory x{rows[1][4] / rows[0][4]:.2f} "
          "(paper, 1k+3k vs 4k: speed x1.54, memory x0.65)")


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--memory", type=int, default=None, help="bank size M of part 1 (default: the preset's)")
    parser.add_argument("--segment", type=int, default=1024, help="local context (tokens per segment)")
    parser.add_argument("--context", type=int, default=4096, help="part 2: tokens of the long context")
    parser.add_argument("--runs", type=int, default=3)
    return parser


def main():
    args = get_parser().parse_args()
    args.memory = args.memory or PRESETS[args.preset]["memory"]
    device = torch.device(args.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    retrieval_share(args, device, dtype)
    long_context(args, device, dtype)


if __name__ == "__main__":
    main()
