"""Datastore build time, search throughput and recall of IVF-PQ against exact search at K=1024.

Keys are a real datastore's (``--keys DATASTORE``, metric from its datastore.json) with queries drawn from
another datastore of the same model (``--queries-from``, e.g. the valid split's), or else synthetic (no trained
WikiText-103 model offline): a Gaussian mixture of
``--clusters`` anisotropic clusters in ``--dim`` dimensions, stored as float16 like
real keys; queries are fresh draws from the same mixture. Recall@K is the share of
the exact top-K (flat index over the same float16 keys) that the approximate search
returns; ``top-1 found`` is the share of queries whose exact nearest entry is among
the K returned. Times are CPU seconds of this process (FAISS uses OMP_NUM_THREADS
threads), not wall time, so that a shared machine does not inflate them. Prints
markdown tables (docs/results_datastore.md).

    OMP_NUM_THREADS=1 python benchmarks/bench_datastore.py --n 200000 --dim 128
    OMP_NUM_THREADS=1 python benchmarks/bench_datastore.py --keys runs/X/dstore_transformer \
        --queries-from runs/X/dstore_valid --k 64 --factories "IVF256,Flat;IVF1024,Flat" --nprobes 16,32 --no-rescore
"""

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

clock = time.process_time  # CPU seconds: FAISS runs on OMP_NUM_THREADS threads of this process

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from trime_fairseq.memory.datastore import Datastore, DatastoreSpec, DatastoreWriter  # noqa: E402


def mixture(n, dim, clusters, seed):
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((clusters, dim)).astype(np.float32) * 2.0
    scales = rng.uniform(0.3, 1.5, size=(clusters, dim)).astype(np.float32)  # anisotropic clusters
    which = rng.integers(0, clusters, n)
    out = np.empty((n, dim), np.float32)
    for s in range(0, n, 100_000):
        w = which[s:s + 100_000]
        out[s:s + len(w)] = centers[w] + scales[w] * rng.standard_normal((len(w), dim)).astype(np.float32)
    return out


def build(path, keys, values, factory, metric, ntrain, nprobe):
    spec = DatastoreSpec(dim=keys.shape[1], key_type="trime_key", metric=metric, dictionary_size=int(values.max()) + 1,
                         dictionary_sha256="0" * 64, model_path="synthetic", model_sha256="0" * 64)
    times = {}
    t = clock()
    w = DatastoreWriter(path, spec, capacity=len(keys), overwrite=True)
    for s in range(0, len(keys), 65536):
        w.add(keys[s:s + 65536], values[s:s + 65536])
    w.commit(1)
    w.finish_keys()
    times["write keys"] = clock() - t
    t = clock()
    w.build_index(factory, ntrain=ntrain, progress_bar=False)
    times["train + add"] = clock() - t
    times["train"] = w.progress.get("train_cpu_seconds", 0.0)
    times["add"] = times["train + add"] - times["train"]
    w.finalize(nprobe=nprobe)
    return times


def real_keys(path):
    """(keys float16 [N, d], values int64 [N], metric) of a complete datastore."""
    from trime_fairseq.memory.datastore.reading import open_entries, read_metadata

    meta = read_metadata(path)
    keys, values, _ = open_entries(Path(path), meta)
    return np.asarray(keys, dtype=np.float16), np.asarray(values, dtype=np.int64), meta["metric"]


def recall(approx, exact):
    return float(np.mean([len(set(a[a >= 0]) & set(e)) / len(e) for a, e in zip(approx, exact)]))


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=200_000)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--clusters", type=int, default=2000)
    p.add_argument("--queries", type=int, default=500)
    p.add_argument("--k", type=int, default=1024)
    p.add_argument("--metric", default="ip", choices=["ip", "l2"])
    p.add_argument("--factories", default="IVF4096,PQ64;IVF1024,PQ32")
    p.add_argument("--nprobes", default="8,32,128")
    p.add_argument("--ntrain", type=int, default=1_000_000)
    p.add_argument("--dir", default=None, help="work folder (default: a temporary one, removed)")
    p.add_argument("--keys", default=None, help="datastore folder whose keys (and metric) are indexed")
    p.add_argument("--queries-from", default=None, help="datastore folder whose keys are the queries (with --keys)")
    p.add_argument("--no-rescore", action="store_true", help="measure without exact re-scoring only")
    return p


def main():
    args = get_parser().parse_args()
    import faiss

    print(f"# bench_datastore ({time.strftime('%Y-%m-%d %H:%M')}, load average {os.getloadavg()[0]:.1f}, "
          f"{os.cpu_count()} CPUs, FAISS threads {faiss.omp_get_max_threads()}, faiss {faiss.__version__})\n")
    if args.keys:
        if not args.queries_from:
            raise SystemExit("--keys needs --queries-from (queries held out of the indexed keys)")
        keys, values, args.metric = real_keys(args.keys)
        held_out, _, _ = real_keys(args.queries_from)
        if held_out.shape[1] != keys.shape[1]:
            raise SystemExit(f"--queries-from has dimension {held_out.shape[1]}, --keys {keys.shape[1]}")
        pick = np.random.default_rng(0).choice(len(held_out), min(args.queries, len(held_out)), replace=False)
        queries = held_out[np.sort(pick)].astype(np.float32)
        print(f"N = {len(keys):,} keys of {args.keys}, d = {keys.shape[1]}, metric {args.metric}, {len(queries)} "
              f"queries from {args.queries_from}, K = {args.k}\n")
    else:
        print(f"N = {args.n:,} synthetic keys, d = {args.dim}, metric {args.metric}, {args.queries} queries, "
              f"K = {args.k}\n")
        all_keys = mixture(args.n + args.queries, args.dim, args.clusters, seed=0).astype(np.float16)
        keys, queries = all_keys[:args.n], all_keys[args.n:].astype(np.float32)
        values = np.random.default_rng(1).integers(0, 267_744, args.n)
    work = args.dir or tempfile.mkdtemp(prefix="bench_datastore_")

    dim = keys.shape[1]
    flat = faiss.IndexFlatIP(dim) if args.metric == "ip" else faiss.IndexFlatL2(dim)
    flat.add(keys.astype(np.float32))
    t = clock()
    _, exact = flat.search(queries, args.k)
    exact_qps = len(queries) / (clock() - t)

    build_rows, search_rows = [], []
    for factory in args.factories.split(";"):
        path = os.path.join(work, factory.replace(",", "_"))
        times = build(path, keys, values, factory, args.metric, args.ntrain, nprobe=32)
        build_rows.append((factory, times))
        for nprobe in [int(x) for x in args.nprobes.split(",")]:
            for rescore in (False,) if args.no_rescore else (False, True):
                store = Datastore.load(path, nprobe=nprobe, rescore=rescore)
                store.search_ids(queries[:8], args.k)  # warm-up
                t = clock()
                _, ids = store.search_ids(queries, args.k)
                qps = len(queries) / (clock() - t)
                top1 = float(np.mean([e[0] in set(a) for a, e in zip(ids, exact)]))
                top64 = recall(ids[:, :64], exact[:, :64])
                search_rows.append((factory, nprobe, rescore, qps, recall(ids, exact), top1, top64))
        print(f"  {factory} done", file=sys.stderr, flush=True)
    if args.dir is None:
        shutil.rmtree(work)

    print("## Build\n")
    print("| index | write keys (CPU s) | train (CPU s) | add (CPU s) |\n|---|---|---|---|")
    for factory, t in build_rows:
        print(f"| {factory} | {t['write keys']:.1f} | {t['train']:.1f} | {t['add']:.1f} |")
    print(f"\n## Search, K = {args.k} (exact flat search: {exact_qps:.0f} queries per CPU s)\n")
    print(f"| index | nprobe | exact re-scoring | queries per CPU s | recall@{args.k} | top-1 found | "
          "recall@64 of the first 64 |\n|---|---|---|---|---|---|---|")
    for factory, nprobe, rescore, qps, rec, top1, top64 in search_rows:
        print(f"| {factory} | {nprobe} | {'yes' if rescore else 'no'} | {qps:.0f} | {rec:.3f} | {top1:.3f} | "
              f"{top64:.3f} |")


if __name__ == "__main__":
    main()
