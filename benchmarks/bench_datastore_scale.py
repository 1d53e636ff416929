"""Datastore at WikiText-103 scale (103M keys, d = 1024) by measured rates and simulation, on CPU.

The full datastore (211 GB of float16 keys, an IVF4096,PQ64 index trained on 1M keys) cannot
be built on a 2-core machine; this measures every step's rate on synthetic keys at d = 1024 and
extrapolates, each step through the code that does it (``DatastoreWriter``, FAISS):

* write: ``DatastoreWriter.add`` of float16 keys in chunks (keys/s);
* train: FAISS k-means at d = 1024 (multiply-adds per second, then IVF4096 on 1M keys with the
  index's own iteration count) and PQ64 training (a constant: FAISS samples 256 points per centroid);
* add: chunks of keys into an IVF4096,PQ64 index (coarse quantizer of 4096 random centroids, PQ
  trained above: the same work per key as a trained one) -- keys/s, and the process's anonymous
  memory (RssAnon, without the file-backed memmap pages) after each chunk minus the index's codes:
  bounded by the chunk, not by N;
* search: an IVF index whose lists hold WikiText-103's 103M / 4096 = 25k codes each (IVF64 over
  1.6M keys), K = 1024, queries per CPU second vs nprobe, plus the coarse search over 4096 centroids.

Times are CPU seconds of this process (``time.process_time``, FAISS on OMP_NUM_THREADS threads), so a
shared machine does not inflate them. Prints markdown (docs/scaling.md).

    OMP_NUM_THREADS=1 python benchmarks/bench_datastore_scale.py --dir runs/scale
"""

import argparse
import os
import shutil
import sys
import tempfile
import time

import numpy as np

clock = time.process_time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from trime_fairseq.memory.datastore import DatastoreSpec, DatastoreWriter  # noqa: E402

WT103_KEYS, DIM = 103_227_021, 1024  # WikiText-103 training tokens (one key each), TRIME's d


def rss_anon_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 1024
    return float("nan")


class Keys:
    """Synthetic keys in chunks: a Gaussian mixture (float16), reproducible per chunk."""

    def __init__(self, dim: int, clusters: int = 512, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.centers = rng.standard_normal((clusters, dim)).astype(np.float32)
        self.scales = rng.uniform(0.3, 1.0, size=(clusters, dim)).astype(np.float32)
        self.dim, self.seed = dim, seed

    def chunk(self, index: int, n: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, index])
        which = rng.integers(0, len(self.centers), n)
        noise = rng.standard_normal((n, self.dim), dtype=np.float32)
        return (self.centers[which] + self.scales[which] * noise).astype(np.float16)


def measure_write(work, keys: Keys, n: int, chunk: int):
    spec = DatastoreSpec(dim=keys.dim, key_type="trime_key", metric="ip", dictionary_size=267_744,
                         dictionary_sha256="0" * 64, model_path="synthetic", model_sha256="0" * 64)
    chunks = [keys.chunk(i, chunk) for i in range(n // chunk)]  # generated first: only the writing is timed
    values = np.zeros(chunk, np.int32)
    base = rss_anon_mb()
    t = clock()
    writer = DatastoreWriter(os.path.join(work, "write"), spec, capacity=n, overwrite=True)
    peak = 0.0
    for i, block in enumerate(chunks):
        writer.add(block, values)
        writer.commit(i + 1)
        peak = max(peak, rss_anon_mb() - base)
    writer.finish_keys()
    seconds = clock() - t
    shutil.rmtree(os.path.join(work, "write"))
    return n / seconds, peak


def measure_kmeans(keys: Keys, n: int, k: int, niter: int):
    import faiss

    x = np.concatenate([keys.chunk(1000 + i, 16384) for i in range(n // 16384)]).astype(np.float32)
    km = faiss.Kmeans(keys.dim, k, niter=niter, seed=1, max_points_per_centroid=1 << 30)
    t = clock()
    km.train(x)
    seconds = clock() - t
    return len(x) * k * keys.dim * niter / seconds  # multiply-adds per CPU second


def train_pq(keys: Keys, m: int, n: int):
    import faiss

    x = np.concatenate([keys.chunk(2000 + i, 16384) for i in range(n // 16384)]).astype(np.float32)
    pq = faiss.ProductQuantizer(keys.dim, m, 8)
    t = clock()
    pq.train(x)
    return pq, clock() - t


def random_ivfpq(keys: Keys, nlist: int, pq):
    """IVF<nlist>,PQ<m> with random centroids and a trained PQ: the per-key work of a trained index."""
    import faiss

    quantizer = faiss.IndexFlatIP(keys.dim)
    quantizer.add(keys.chunk(3000, nlist).astype(np.float32))
    index = faiss.IndexIVFPQ(quantizer, keys.dim, nlist, pq.M, 8, faiss.METRIC_INNER_PRODUCT)
    index.own_fields = False
    faiss.copy_array_to_vector(faiss.vector_to_array(pq.centroids), index.pq.centroids)
    index.is_trained = True
    return index, quantizer


def measure_add(keys: Keys, pq, nlist: int, chunks: int, chunk: int):
    index, quantizer = random_ivfpq(keys, nlist, pq)
    code_bytes = index.code_size + 8  # PQ code + 64-bit id per entry
    base = rss_anon_mb()
    rows, seconds = [], 0.0
    for i in range(chunks):
        x = keys.chunk(4000 + i, chunk).astype(np.float32)
        t = clock()
        index.add(x)
        seconds += clock() - t
        del x
        rows.append((index.ntotal, rss_anon_mb() - base, index.ntotal * code_bytes / 2**20))
    return index.ntotal / seconds, rows, code_bytes


def measure_search(keys: Keys, pq_train_n: int, n: int, nlist: int, nprobes, queries: int, k: int, chunk: int):
    import faiss

    index = faiss.index_factory(keys.dim, f"IVF{nlist},PQ64", faiss.METRIC_INNER_PRODUCT)
    sample = np.concatenate([keys.chunk(5000 + i, 16384) for i in range(pq_train_n // 16384)]).astype(np.float32)
    index.train(sample)
    del sample
    for i in range(n // chunk):
        index.add(keys.chunk(6000 + i, chunk).astype(np.float32))
    q = keys.chunk(9999, queries).astype(np.float32)
    rows = []
    for nprobe in nprobes:
        index.nprobe = nprobe
        index.search(q[:4], k)
        t = clock()
        index.search(q, k)
        rows.append((nprobe, queries / (clock() - t)))
    coarse = faiss.IndexFlatIP(keys.dim)
    coarse.add(keys.chunk(3000, 4096).astype(np.float32))
    t = clock()
    coarse.search(q, 64)
    coarse_qps = queries / (clock() - t)
    return index.ntotal / nlist, rows, coarse_qps


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dim", type=int, default=DIM)
    p.add_argument("--write-keys", type=int, default=1 << 20, help="keys written through DatastoreWriter")
    p.add_argument("--chunk", type=int, default=65536, help="keys per chunk (write / add)")
    p.add_argument("--add-chunks", type=int, default=6)
    p.add_argument("--search-keys", type=int, default=1_600_000, help="keys of the search index (IVF64: 25k per list)")
    p.add_argument("--search-nlist", type=int, default=64)
    p.add_argument("--queries", type=int, default=64)
    p.add_argument("--k", type=int, default=1024)
    p.add_argument("--dir", default=None, help="work folder (default: a temporary one, removed)")
    return p


def main():
    args = get_parser().parse_args()
    import faiss

    work = args.dir or tempfile.mkdtemp(prefix="bench_scale_")
    os.makedirs(work, exist_ok=True)
    keys = Keys(args.dim)
    print(f"# bench_datastore_scale ({time.strftime('%Y-%m-%d %H:%M')}, load average {os.getloadavg()[0]:.1f}, "
          f"{os.cpu_count()} CPUs, FAISS threads {faiss.omp_get_max_threads()}, faiss {faiss.__version__}, "
          f"d = {args.dim})\n", flush=True)

    write_rate, write_peak = measure_write(work, keys, args.write_keys, args.chunk)
    print(f"write: {write_rate:,.0f} keys per CPU s ({write_rate * args.dim * 2 / 2**20:,.0f} MB/s float16), "
          f"anonymous memory +{write_peak:.0f} MB over {args.write_keys:,} keys", flush=True)
    kmeans_rate = measure_kmeans(keys, 65536, 256, 4)
    ivf_niter = faiss.index_factory(args.dim, "IVF4096,PQ64").cp.niter
    ivf_train = 1_048_576 * 4096 * args.dim * ivf_niter / kmeans_rate
    print(f"k-means: {kmeans_rate / 1e9:.2f} G multiply-adds per CPU s; IVF4096 on 1,048,576 keys x "
          f"{ivf_niter} iterations: {ivf_train / 3600:.1f} CPU h", flush=True)
    pq, pq_seconds = train_pq(keys, 64, 65536)
    print(f"PQ64 training on 65,536 keys (FAISS's sample: 256 per centroid): {pq_seconds:.0f} CPU s", flush=True)
    add_rate, add_rows, code_bytes = measure_add(keys, pq, 4096, args.add_chunks, args.chunk)
    print(f"add (IVF4096,PQ64): {add_rate:,.0f} keys per CPU s; {code_bytes} bytes per entry", flush=True)
    for ntotal, anon, codes in add_rows:
        print(f"  after {ntotal:>9,} keys: anonymous memory +{anon:7.0f} MB, of which codes {codes:6.0f} MB "
              f"-> {anon - codes:5.0f} MB besides the codes", flush=True)
    list_len, search_rows, coarse_qps = measure_search(keys, 65536, args.search_keys, args.search_nlist,
                                                       [1, 4, 8, 32], args.queries, args.k, args.chunk)
    print(f"search: {list_len:,.0f} codes per list (WikiText-103 at IVF4096: {WT103_KEYS / 4096:,.0f}), "
          f"K = {args.k}; coarse search over 4096 centroids: {coarse_qps:,.0f} queries per CPU s", flush=True)

    n = WT103_KEYS
    print("\n## Extrapolated to WikiText-103 (103,227,021 keys, d = 1024, IVF4096,PQ64, 1 CPU core)\n")
    print("| step | rate measured here | WikiText-103 |\n|---|---|---|")
    print(f"| write keys (float16) | {write_rate:,.0f} keys/s | {n / write_rate / 60:.0f} CPU min, "
          f"{n * args.dim * 2 / 1e9:.0f} GB |")
    print(f"| train IVF4096 (1M keys, {ivf_niter} it.) | {kmeans_rate / 1e9:.1f} G MAC/s | {ivf_train / 3600:.1f} CPU h |")
    print(f"| train PQ64 | {pq_seconds:.0f} s (constant) | {pq_seconds / 60:.1f} CPU min |")
    print(f"| add | {add_rate:,.0f} keys/s | {n / add_rate / 3600:.1f} CPU h |")
    print(f"| index in RAM (search) | {code_bytes} B/entry | {n * code_bytes / 1e9:.1f} GB |")
    print(f"\n## Search, K = {args.k}, lists of {list_len:,.0f} codes (1 CPU core)\n")
    print("| nprobe | scanned codes per query | queries per CPU s (lists) | with the 4096-centroid coarse search |")
    print("|---|---|---|---|")
    for nprobe, qps in search_rows:
        both = 1 / (1 / qps + 1 / coarse_qps)
        print(f"| {nprobe} | {nprobe * list_len:,.0f} | {qps:,.1f} | {both:,.1f} |")
    if args.dir is None:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
