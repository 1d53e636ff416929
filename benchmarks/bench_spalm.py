"""SPALM vs Transformer-XL training step time (target ratio <= 1.10), and neighbour search throughput.

    OMP_NUM_THREADS=1 python benchmarks/bench_spalm.py [--size wikitext2_small] [--tgt 64] [--mem 64] \
        [--batch 8] [--vocab 33278] [--k 4] [--steps 5] [--runs 5] [--device cpu]
    OMP_NUM_THREADS=1 python benchmarks/bench_spalm.py --skip-train --data data-bin/wikitext-2 \
        --neighbours runs/wikitext2-spalm-1500/neighbours --datastore runs/wikitext2-spalm-1500/dstore \
        [--queries 16384] [--nprobe 16]

1. Training step: both decoders are built in-process from the same architecture
   function with the same seed (random Zipfian tokens, and for SPALM random
   Zipfian neighbour tokens (B, T, k)), run on a stream of segments with a full
   memory, and timed alternately in one process: forward + adaptive-softmax loss
   + backward + Adam step. Medians over ``--runs`` × ``--steps`` steps; the
   printed ratio is SPALM / Transformer-XL. The neighbours arrive precomputed, so
   the extra work is k embedding lookups, a (k × d) attention per position and the gate.
2. ``--data DIR --neighbours DIR``: the data side of a training step -- batches of
   ``--batch`` × ``--tgt`` tokens in stream order from the real split, with and without
   the neighbours (memmap reads, the per-item target check, collation), ms per batch.
3. ``--datastore DIR`` (a ``trime-build-datastore`` folder): the search part of
   ``trime-neighbours`` on its own index -- ``--queries`` consecutive training
   positions, their stored keys as queries (what trime-neighbours recomputes),
   in batches of 1024, k = ``--k`` -- without exclusion, excluding the own entry,
   and excluding the own document (over-fetch and refetch), as tokens/s of one
   process (wall and CPU).
"""

import argparse
import os
import statistics
import sys
import time
from argparse import Namespace
from pathlib import Path

import numpy as np
import torch
from fairseq.data import Dictionary

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_lamemo_vs_txl import SIZES, lm_loss, zipf_tokens  # noqa: E402

import trime_fairseq  # noqa: E402,F401  (registers the models)
from trime_fairseq.models.spalm import SpalmConfig, SpalmDecoder  # noqa: E402
from trime_fairseq.models.transformer_xl import TransformerXLConfig, TransformerXLDecoder  # noqa: E402

MODELS = {"Transformer-XL": (TransformerXLDecoder, TransformerXLConfig), "SPALM": (SpalmDecoder, SpalmConfig)}


def build(name, size, vocab, mem, k, device, seed=1):
    decoder_cls, config_cls = MODELS[name]
    args = Namespace(mem_len=mem, spalm_k=k)
    SIZES[size](args, config_cls)
    args.max_target_positions = None
    if args.adaptive_softmax_cutoff is None:
        args.share_decoder_input_output_embed = True  # SPALM's value embeddings are the tied ones
    d = Dictionary()
    for i in range(vocab - d.nspecial):
        d.add_symbol(f"w{i}")
    torch.manual_seed(seed)
    decoder = decoder_cls(args, d).to(device).train()
    decoder.recurrent_memory.enable(True)
    return decoder


def train_step(decoder, optimizer, segment, target, neighbours):
    optimizer.zero_grad(set_to_none=True)
    extra = {"neighbour_tokens": neighbours} if isinstance(decoder, SpalmDecoder) else {}
    features, _ = decoder(segment, features_only=True, **extra)
    lm_loss(decoder, features, target).backward()
    optimizer.step()


def bench_train(args, device):
    decoders = {name: build(name, args.size, args.vocab, args.mem, args.k, device) for name in MODELS}
    params = {name: sum(p.numel() for p in d.parameters()) for name, d in decoders.items()}
    optimizers = {name: torch.optim.Adam(d.parameters(), lr=1e-4) for name, d in decoders.items()}
    steps = args.steps + 1
    stream = zipf_tokens(args.vocab, (args.batch, steps * args.tgt + 1), seed=0).to(device)
    neighbours = zipf_tokens(args.vocab, (args.batch, steps * args.tgt, args.k), seed=1).to(device)
    times = {name: [] for name in MODELS}
    for _ in range(args.runs):
        for name, decoder in decoders.items():  # alternate: both see the same machine load
            decoder.recurrent_memory.reset()
            for s in range(steps):
                cols = slice(s * args.tgt, (s + 1) * args.tgt)
                segment, target = stream[:, cols], stream[:, s * args.tgt + 1:(s + 1) * args.tgt + 1]
                if device.type == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                train_step(decoder, optimizers[name], segment, target, neighbours[:, cols])
                if device.type == "cuda":
                    torch.cuda.synchronize()
                if s > 0:  # the first segment fills the memory
                    times[name].append(time.perf_counter() - start)
    median = {name: statistics.median(t) for name, t in times.items()}
    tokens = args.batch * args.tgt
    print(f"## training step, {args.size}: batch {args.batch} x tgt {args.tgt}, mem {args.mem}, vocab {args.vocab}, "
          f"k {args.k}, {device.type}, {args.runs} x {args.steps} steps\n")
    print("| model | parameters | median step (ms) | tokens/s |")
    print("|---|---|---|---|")
    for name in MODELS:
        print(f"| {name} | {params[name] / 1e6:.2f}M | {median[name] * 1e3:.1f} | {tokens / median[name]:.0f} |")
    ratio = median["SPALM"] / median["Transformer-XL"]
    print(f"\nstep time ratio SPALM / Transformer-XL: {ratio:.3f} (target <= 1.10)\n")
    return ratio


def bench_batches(args):
    from trime_fairseq.tasks.trime_lm import TrimeLMConfig, TrimeLMTask

    dictionary = Dictionary.load(str(Path(args.data) / "dict.txt"))
    common = dict(data=args.data, tokens_per_sample=args.tgt, sample_break_mode="none", seed=1, batch_size=None,
                  batch_size_valid=None, dataset_impl=None, data_buffer_size=0, tpu=False, use_plasma_view=False,
                  plasma_path="/tmp/plasma", update_freq=[1], batching="stream")
    rows = []
    for name, neighbours in (("without neighbours", None), ("with neighbours", args.neighbours)):
        task = TrimeLMTask(TrimeLMConfig(**common, neighbours=neighbours), dictionary)
        task.load_dataset("train")
        itr = task.get_batch_iterator(task.dataset("train"), max_sentences=args.batch).next_epoch_itr(shuffle=False)
        start, count = time.perf_counter(), 0
        for _ in zip(range(args.data_batches), itr):
            count += 1
        rows.append((name, (time.perf_counter() - start) / count * 1e3))
    print(f"## batches of the training split: {args.batch} x {args.tgt} tokens, stream order, {args.data_batches} "
          "batches\n")
    print("| batches | ms per batch |")
    print("|---|---|")
    for name, ms in rows:
        print(f"| {name} | {ms:.2f} |")
    print()


def bench_search(args):
    from trime_fairseq.memory.documents import DocumentBoundaries
    from trime_fairseq.data.neighbours import document_labels
    from trime_fairseq.memory.datastore import Datastore, Exclusion

    store = Datastore.load(args.datastore, nprobe=args.nprobe)
    dictionary = Dictionary.load(str(Path(store.meta["source"]["data"]) / "dict.txt"))
    query_docs, entry_docs = document_labels(np.asarray(store.values), DocumentBoundaries.from_dictionary(dictionary))
    n = min(args.queries, store.size)
    start = (store.size - n) // 2
    positions = np.arange(start, start + n)
    queries = np.asarray(store.keys[start:start + n], dtype=np.float32)
    rows = []
    for name, exclusion in (
        ("none", lambda p: None),
        ("self (own entry)", lambda p: Exclusion.own_entry(p)),
        ("document (own entry + own document)", lambda p: Exclusion.own_entry(p, query_docs[p], entry_docs)),
    ):
        wall, cpu = time.perf_counter(), time.process_time()
        for s in range(0, n, 1024):
            p = positions[s:s + 1024]
            store.search_ids(queries[s:s + 1024], args.k, exclude=exclusion(p))
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        rows.append((name, n / wall, n / cpu))
    index = store.meta["index"]
    print(f"## neighbour search: {store.size} entries of dimension {store.dim}, index {index['factory']}, "
          f"nprobe {args.nprobe or index.get('nprobe')}, k {args.k}, {n} training positions\n")
    print("| exclusion | tokens/s (wall) | tokens/s (CPU of the process) |")
    print("|---|---|---|")
    for name, per_wall, per_cpu in rows:
        print(f"| {name} | {per_wall:.0f} | {per_cpu:.0f} |")
    print()


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="wikitext2_small", choices=sorted(SIZES))
    p.add_argument("--tgt", type=int, default=64)
    p.add_argument("--mem", type=int, default=64)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--vocab", type=int, default=33278)
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--device", default="cpu")
    p.add_argument("--skip-train", action="store_true")
    p.add_argument("--data", default=None, help="binarized data: also time the batches, with --neighbours")
    p.add_argument("--neighbours", default=None, help="a trime-neighbours folder holding train/")
    p.add_argument("--data-batches", type=int, default=300)
    p.add_argument("--datastore", default=None, help="a trime-build-datastore folder: also time the search")
    p.add_argument("--queries", type=int, default=16384)
    p.add_argument("--nprobe", type=int, default=None)
    return p


def main():
    args = get_parser().parse_args()
    if not args.skip_train:
        bench_train(args, torch.device(args.device))
    if args.data and args.neighbours:
        bench_batches(args)
    if args.datastore:
        bench_search(args)


if __name__ == "__main__":
    main()
