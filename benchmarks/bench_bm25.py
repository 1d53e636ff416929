"""BM25 batching speed and pruning quality; prints markdown tables (docs/results_datastore.md).

WikiText-103 itself is not available offline, so the WikiText-103-scale runs use a
*proxy*: the binarized WikiText-2 training split repeated R times, each copy rotated
by a random offset (so no two segments are identical). R = 50 gives 104M tokens,
WikiText-103's size: 34k segments at L=3072, 696k at L=150. The proxy keeps
WikiText-2's relative document frequencies, so the work per query is a realistic to
pessimistic estimate (WikiText-103's larger vocabulary makes rare query terms rarer
and candidate lists shorter). Times for all rows are projected from sampled row
blocks (a block's cost depends only on its queries): t_all = t_sample · N / rows.
All times are CPU seconds of one worker process (``time.process_time``), so that a
shared machine does not inflate them; ``--workers W`` divides the top-k part by W
(row blocks are independent).

    OMP_NUM_THREADS=1 python benchmarks/bench_bm25.py --data data-bin/wikitext-2 [--quick]
"""

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from trime_fairseq.data.bm25 import (  # noqa: E402
    TopKScorer,
    bm25_params,
    bm25_topk,
    bm25_weights,
    document_frequency,
    greedy_chain,
    kept_terms,
    term_counts,
)
from trime_fairseq.data.bm25_segments import load_segments  # noqa: E402


def proxy_segments(base: np.ndarray, replicas: int, length: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    tokens = np.concatenate([np.roll(base, -int(rng.integers(len(base)))) for _ in range(replicas)])
    offsets = np.minimum(np.arange(0, len(tokens) + length, length, dtype=np.int64), len(tokens))
    return tokens, np.unique(offsets)


def prepare(tokens, offsets, vocab, ignore, variant="lucene"):
    counts = term_counts(tokens, offsets, vocab, ignore=ignore)
    weights, idf = bm25_weights(counts, bm25_params(variant))
    return counts, weights, idf


def clock():
    """CPU seconds of this process: the benchmarks run one worker, and the machine is shared."""
    return time.process_time()


def sampled_topk(scorer, k, rows, blocks=4, seed=0):
    """CPU seconds for ``rows`` rows in ``blocks`` random blocks -> (seconds, rows)."""
    n = scorer.n
    if rows >= n:
        t = clock()
        bm25_topk(scorer, k, progress=False)
        return clock() - t, n
    per = rows // blocks
    starts = np.random.default_rng(seed).choice(n - per, size=blocks, replace=False)
    t = clock()
    for s in starts:
        bm25_topk(scorer, k, rows=(int(s), int(s) + per), progress=False)
    return clock() - t, per * blocks


def overlap(a, b):
    """Mean share of the exact neighbours (a) found by the approximate run (b)."""
    total, count = 0.0, 0
    for x, y in zip(a, b):
        x = set(x[x >= 0].tolist())
        if x:
            total += len(x & set(y[y >= 0].tolist())) / len(x)
            count += 1
    return total / max(count, 1)


def scaling_table(base, vocab, ignore, length, replicas, sample_rows, k, prune=None):
    rows_out = []
    for r in replicas:
        tokens, offsets = proxy_segments(base, r, length)
        t0 = clock()
        counts, weights, idf = prepare(tokens, offsets, vocab, ignore)
        n = counts.shape[0]
        kw = {}
        if prune:
            kw = dict(keep=kept_terms(document_frequency(counts), n, prune["max_df"]),
                      query_terms=prune["query_terms"], candidates=prune["candidates"], idf=idf)
        scorer = TopKScorer(counts, weights, **kw)
        setup = clock() - t0
        secs, done = sampled_topk(scorer, k, sample_rows)
        search = secs * n / done
        neighbours = np.random.default_rng(0).integers(-1, n, size=(n, k)).astype(np.int32)
        t = clock()
        greedy_chain(neighbours, 1)
        chain = clock() - t
        rows_out.append((r, len(tokens), n, setup, done, secs, search, chain, setup + search + chain,
                         setup + search / 2 + chain))
        print(f"  R={r} N={n}: setup {setup:.1f}s, {done} rows {secs:.1f}s", file=sys.stderr, flush=True)
        del counts, weights, scorer
    head = ("| R | tokens | segments N | prepare (s) | sampled rows | their time (s) | top-k all rows, 1 worker (s) "
            "| chain (s) | total, 1 worker (min) | total, 2 workers (min) |")
    lines = [head, "|" + "---|" * 10]
    for r, t, n, setup, done, secs, search, chain, tot1, tot2 in rows_out:
        lines.append(f"| {r} | {t / 1e6:.1f}M | {n:,} | {setup:.1f} | {done} | {secs:.1f} | {search:.0f} | "
                     f"{chain:.1f} | {tot1 / 60:.1f} | {tot2 / 60:.1f} |")
    return "\n".join(lines)


def quality_table(seg, ignore, length, k, settings):
    d = seg.dictionary
    counts, weights, idf = prepare(seg.tokens, seg.offsets, len(d), ignore)
    n = counts.shape[0]
    df = document_frequency(counts)
    t = clock()
    exact_ids, _ = bm25_topk(TopKScorer(counts, weights), k, progress=False)
    exact_t = clock() - t
    lines = [f"WikiText-2 train, L={length}: {n:,} segments, k={k}; exact top-k {exact_t:.1f}s",
             "", "| max_df | query_terms | candidates | overlap@k with exact | top-1 agreement | time (s) |",
             "|---|---|---|---|---|---|"]
    for max_df, terms, cand in settings:
        scorer = TopKScorer(counts, weights, keep=kept_terms(df, n, max_df), query_terms=terms, candidates=cand,
                            idf=idf)
        t = clock()
        ids, _ = bm25_topk(scorer, k, progress=False)
        secs = clock() - t
        top1 = float(np.mean(ids[:, 0] == exact_ids[:, 0]))
        lines.append(f"| {max_df} | {terms} | {cand} | {overlap(exact_ids, ids):.3f} | {top1:.3f} | {secs:.1f} |")
    return "\n".join(lines)


def rank_bm25_table(seg, ignore, length, sizes, target_n):
    import rank_bm25

    lines = ["| segments n | rank_bm25.BM25Okapi all queries (s) | ours, okapi, exact (s) | rank_bm25 projected to "
             f"N={target_n:,} (h) |", "|---|---|---|---|"]
    ignore = set(ignore)
    for n in sizes:
        docs = [[int(t) for t in seg.segment(i) if int(t) not in ignore] for i in range(n)]
        t = clock()
        model = rank_bm25.BM25Okapi(docs)
        for q in docs:
            model.get_scores(q)
        ref = clock() - t
        tokens = np.concatenate([np.asarray(x, dtype=np.int64) for x in docs])
        offsets = np.zeros(n + 1, dtype=np.int64)
        np.cumsum([len(x) for x in docs], out=offsets[1:])
        t = clock()
        counts, weights, _ = prepare(tokens, offsets, len(seg.dictionary), [], "okapi")
        bm25_topk(TopKScorer(counts, weights), 20, progress=False)
        ours = clock() - t
        lines.append(f"| {n} | {ref:.1f} | {ours:.2f} | {ref * (target_n / n) ** 2 / 3600:.0f} |")
    return "\n".join(lines)


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="binarized WikiText-2 (scripts/prepare_wikitext.sh)")
    p.add_argument("--quick", action="store_true", help="small sizes only (a smoke run)")
    p.add_argument("--k", type=int, default=20)
    return p


def main():
    args = get_parser().parse_args()
    print(f"# bench_bm25 ({time.strftime('%Y-%m-%d %H:%M')}, load average {os.getloadavg()[0]:.1f}, "
          f"{os.cpu_count()} CPUs, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')})\n")
    whole = load_segments(args.data, "train", 10 ** 9)
    d = whole.dictionary
    ignore = [d.pad(), d.eos(), d.bos()]
    base = whole.tokens
    replicas = [1, 4] if args.quick else [1, 4, 16, 50]

    print("## Exact BM25 top-k, L=3072 (WikiText-103 proxy at R=50)\n")
    print(scaling_table(base, len(d), ignore, 3072, replicas, 256 if args.quick else 1024, args.k))
    prune = dict(max_df=0.05, query_terms=30, candidates=100)
    print("\n## Pruned BM25 top-k, L=150, --max-df 0.05 --query-terms 30 --candidates 100\n")
    print(scaling_table(base, len(d), ignore, 150, [1] if args.quick else [1, 10, 50],
                        256 if args.quick else 2048, args.k, prune))
    if not args.quick:
        print("\n## Exact BM25 top-k, L=150 (for comparison)\n")
        print(scaling_table(base, len(d), ignore, 150, [1, 50], 1024, args.k))

    print("\n## Pruning quality (candidates re-scored exactly)\n")
    seg150 = load_segments(args.data, "train", 150)
    settings = [(None, 30, 100), (0.05, 30, 100), (0.05, 20, 100), (0.02, 20, 100), (None, 20, 200),
                (0.05, 30, 200)]
    print(quality_table(seg150, ignore, 150, args.k, settings[:2] if args.quick else settings))

    print("\n## rank_bm25 for comparison (okapi variant, all-pairs scores)\n")
    seg3072 = load_segments(args.data, "train", 3072)
    print(rank_bm25_table(seg3072, ignore, 3072, [25, 50] if args.quick else [50, 100], 33_994))


if __name__ == "__main__":
    main()
