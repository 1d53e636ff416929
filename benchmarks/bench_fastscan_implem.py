"""FAISS fast-scan search time by implementation on a datastore's IVF index (docs/results_datastore.md, runs 7-8):
``implem`` (0 = auto, 10-15) and ``qbs`` of ``IndexIVFPQFastScan``, one search of ``--num-queries`` stored keys of a
second datastore (the evaluated split's) for K neighbours, each setting ``--runs`` times, and the overlap of its
hits with the default's (the implementations differ in how they keep the K best, not in the distances).

    python benchmarks/bench_fastscan_implem.py runs/fast-lm7/index0 runs/fast-lm7/queries-test --nprobe 16 --k 1024
"""

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import faiss  # noqa: E402

from trime_fairseq.memory.datastore import Datastore  # noqa: E402

SETTINGS = [(0, 0), (10, 0), (11, 0), (12, 0), (12, 0x33), (13, 0), (13, 0x33), (14, 0), (15, 0)]


def fastscan_index(store: Datastore):
    ivf = faiss.try_extract_index_ivf(store.index)
    ivf = None if ivf is None else faiss.downcast_index(ivf)
    if not hasattr(ivf, "implem"):
        raise SystemExit(f"{store.path}: not an IVF fast-scan index ({type(ivf).__name__}); e.g. IVF4096,PQ64x4fs")
    return ivf


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("datastore", help="a datastore whose index is IVF...,PQ...x4fs")
    p.add_argument("queries", help="a datastore of the evaluated split: its first --num-queries keys are the queries")
    p.add_argument("--num-queries", type=int, default=2048)
    p.add_argument("--k", type=int, default=1024)
    p.add_argument("--nprobe", type=int, default=16)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    return p


def main(argv=None):
    args = get_parser().parse_args(argv)
    faiss.omp_set_num_threads(args.threads)
    store = Datastore.load(args.datastore)
    ivf = fastscan_index(store)
    ivf.nprobe = args.nprobe
    queries = Datastore.load(args.queries)
    if queries.dim != store.dim:
        raise SystemExit(f"queries have dimension {queries.dim}, the datastore {store.dim}")
    q = np.asarray(queries.keys[:args.num_queries], dtype=np.float32)
    store.index.search(q[:64], args.k)  # first touch of the index, untimed
    base = None
    print(f"{len(q)} queries, K {args.k}, nprobe {args.nprobe}, {args.threads} thread(s), best of {args.runs} runs")
    print("| implem | qbs | seconds | hits shared with implem 0 |\n|---:|---:|---:|---:|")
    for implem, qbs in SETTINGS:
        ivf.implem, ivf.qbs = implem, qbs
        times = []
        for _ in range(args.runs):
            start = time.perf_counter()
            _, ids = store.index.search(q, args.k)
            times.append(time.perf_counter() - start)
        base = ids if base is None else base
        shared = np.mean([len(np.intersect1d(a, b)) / args.k for a, b in zip(ids, base)])
        print(f"| {implem} | {qbs:#x} | {min(times):.3f} | {shared:.3f} |")
    ivf.implem, ivf.qbs = 0, 0


if __name__ == "__main__":
    main()
