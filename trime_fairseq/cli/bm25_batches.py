"""``trime-bm25-batches``: TRIME's BM25 batch order for ``--batching bm25`` (§4.3).

Cuts the training split into the segments ``trime_lm`` trains on, finds each
segment's top BM25 neighbours, chains them greedily and writes the chain (a
permutation of segment ids, with a JSON header) atomically::

    trime-bm25-batches --data data-bin/wikitext-103 --tokens-per-sample 3072 \\
        --output data-bin/wikitext-103/bm25-3072.order --workers 2

    # 690k segments of 150 tokens: prune candidate generation, re-score exactly
    trime-bm25-batches --data data-bin/wikitext-103 --tokens-per-sample 150 \\
        --max-df 0.05 --query-terms 30 --candidates 100 --output ... --workers 2

Train with ``fairseq-train --task trime_lm --batching bm25 --bm25-order FILE``.

Translation (TRIME-MT, Appendix B: target sentences with high BM25 scores share a batch):
the items are the target sentences of a language pair::

    trime-bm25-batches --data data-bin/iwslt14.de-en --source-lang de --target-lang en \
        --output data-bin/iwslt14.de-en/bm25-target.order --workers 2

and ``fairseq-train --task trime_translation --batching bm25 --bm25-order FILE``.
"""

import argparse
import logging
import os
import time

import numpy as np

from trime_fairseq.cli import setup_logging
from trime_fairseq.data.bm25 import (
    LUCENE_STOP_WORDS,
    VARIANTS,
    TopKScorer,
    bm25_params,
    bm25_topk,
    bm25_weights,
    cost_summary,
    document_frequency,
    greedy_chain,
    kept_terms,
    term_counts,
    write_order_file,
)
from trime_fairseq.checksums import dictionary_checksum
from trime_fairseq.data.bm25_segments import load_segments

logger = logging.getLogger("trime_fairseq.cli.bm25_batches")


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="trime-bm25-batches", description=__doc__.split("\n\n")[0])
    src = p.add_argument_group("segments")
    src.add_argument("--data", help="fairseq-preprocess output folder (dict.txt, SPLIT.bin/.idx)")
    src.add_argument("--split", default="train")
    src.add_argument("--token-ids", help="instead of --data: a .npy file of token ids (1-D), cut into "
                     "consecutive segments of --tokens-per-sample")
    src.add_argument("--tokens-per-sample", type=int, default=None,
                     help="segment length L (as in training; language modelling)")
    src.add_argument("--source-lang", default=None, help="translation: the pair's source language")
    src.add_argument("--target-lang", default=None,
                     help="translation: the items are the target sentences of SPLIT.SRC-TGT.TGT (dict.TGT.txt)")
    src.add_argument("--sample-break-mode", default="none", choices=["none", "complete", "complete_doc", "eos"],
                     help="as fairseq's --sample-break-mode (with --data)")
    src.add_argument("--dataset-impl", default=None)
    bm = p.add_argument_group("BM25")
    bm.add_argument("--variant", default="lucene", choices=VARIANTS,
                    help="lucene: Lucene/Pyserini BM25 (k1=0.9, b=0.4); okapi: rank_bm25.BM25Okapi (k1=1.5, b=0.75)")
    bm.add_argument("--k1", type=float, default=None)
    bm.add_argument("--b", type=float, default=None)
    bm.add_argument("--epsilon", type=float, default=0.25, help="okapi: floor of negative idf (× mean idf)")
    bm.add_argument("--ignore-stopwords", action="store_true",
                    help="remove Lucene's English stop words (any case) before scoring, as Anserini's default "
                    "analyzer does (needs --data for the dictionary)")
    bm.add_argument("--topk", type=int, default=20, help="neighbours kept per segment (TRIME: 20 hits)")
    pr = p.add_argument_group("pruning (approximate candidates, exact re-scoring)")
    pr.add_argument("--max-df", type=float, default=None,
                    help="candidates come only from terms held by at most this fraction of segments")
    pr.add_argument("--query-terms", type=int, default=None,
                    help="candidates come only from each segment's T best terms by qtf·idf")
    pr.add_argument("--candidates", type=int, default=100,
                    help="with pruning: candidates re-scored exactly per segment")
    run = p.add_argument_group("run")
    run.add_argument("--output", required=True, help="order file to write (atomically)")
    run.add_argument("--save-neighbours", default=None, help="also write the top-k ids/scores (.npz)")
    run.add_argument("--seed", type=int, default=1, help="seed of the chain's start and random jumps")
    run.add_argument("--workers", type=int, default=1, help="processes scoring row blocks")
    run.add_argument("--block-rows", type=int, default=256)
    run.add_argument("--dense-ratio", type=float, default=0.1,
                     help="exact mode: terms with df >= this fraction of segments use a dense product")
    run.add_argument("--no-progress-bar", action="store_true")
    return p


def _target_sentences(args):
    """The items of a translation split: its target sentences (EOS included, ignored by BM25)."""
    from fairseq.data import Dictionary, data_utils

    if args.token_ids is not None or args.tokens_per_sample is not None or args.sample_break_mode != "none":
        raise SystemExit("--target-lang items are sentences: no --token-ids, --tokens-per-sample or "
                         "--sample-break-mode")
    if not args.source_lang or not args.target_lang:
        raise SystemExit("a language pair needs both --source-lang and --target-lang")
    src, tgt = args.source_lang, args.target_lang
    dict_path = os.path.join(args.data, f"dict.{tgt}.txt")
    if not os.path.isfile(dict_path):
        raise SystemExit(f"no target dictionary at {dict_path}")
    d = Dictionary.load(dict_path)
    prefix = os.path.join(args.data, f"{args.split}.{src}-{tgt}.{tgt}")
    dataset = data_utils.load_indexed_dataset(prefix, d, args.dataset_impl)
    if dataset is None:
        raise SystemExit(f"target side not found: {prefix}.{{bin,idx}}")
    from trime_fairseq.data.bm25_segments import _flat_tokens

    tokens = _flat_tokens(dataset)
    offsets = np.zeros(len(dataset) + 1, dtype=np.int64)
    np.cumsum(np.asarray(dataset.sizes, dtype=np.int64), out=offsets[1:])
    ignore = {d.pad(), d.eos(), d.bos(), d.unk()}
    if args.ignore_stopwords:
        ignore |= {i for i, s in enumerate(d.symbols) if s.lower() in LUCENE_STOP_WORDS}
    meta = dict(data=os.path.abspath(args.data), split=args.split, items="target_sentences", source_lang=src,
                target_lang=tgt, num_tokens=int(len(tokens)), dictionary_size=len(d),
                dictionary_sha256=dictionary_checksum(d))
    return tokens, offsets, len(d), sorted(ignore), meta


def _segments(args):
    """(tokens, offsets, ignore ids, source metadata)."""
    if (args.data is None) == (args.token_ids is None):
        raise SystemExit("give exactly one of --data or --token-ids")
    if args.target_lang or args.source_lang:
        if args.data is None:
            raise SystemExit("a language pair needs --data")
        return _target_sentences(args)
    if args.tokens_per_sample is None:
        raise SystemExit("--tokens-per-sample is required for language-modelling segments")
    if args.data is not None:
        seg = load_segments(args.data, args.split, args.tokens_per_sample, args.sample_break_mode,
                            args.dataset_impl)
        d = seg.dictionary
        ignore = {d.pad(), d.eos(), d.bos()}
        if args.ignore_stopwords:
            ignore |= {i for i, s in enumerate(d.symbols) if s.lower() in LUCENE_STOP_WORDS}
        meta = dict(data=os.path.abspath(args.data), split=args.split, tokens_per_sample=args.tokens_per_sample,
                    sample_break_mode=args.sample_break_mode, num_tokens=int(len(seg.tokens)),
                    dictionary_size=len(d), dictionary_sha256=dictionary_checksum(d))
        return seg.tokens, seg.offsets, len(d), sorted(ignore), meta
    if args.ignore_stopwords:
        raise SystemExit("--ignore-stopwords needs --data (the dictionary maps words to ids)")
    if args.sample_break_mode != "none":
        raise SystemExit("--token-ids is cut into fixed-length segments: --sample-break-mode must be none")
    tokens = np.load(args.token_ids)
    if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
        raise SystemExit(f"{args.token_ids}: expected a 1-D integer array, got {tokens.dtype} {tokens.shape}")
    L = args.tokens_per_sample
    offsets = np.minimum(np.arange(0, len(tokens) + L, L, dtype=np.int64), len(tokens))
    offsets = np.unique(offsets)  # drops a duplicated end when len is a multiple of L
    meta = dict(token_ids=os.path.abspath(args.token_ids), tokens_per_sample=L, sample_break_mode="none",
                num_tokens=int(len(tokens)))
    return tokens, offsets, int(tokens.max()) + 1 if len(tokens) else 1, [], meta


def main(args) -> dict:
    if (args.tokens_per_sample is not None and args.tokens_per_sample < 1) or args.topk < 1 or args.workers < 1:
        raise SystemExit("--tokens-per-sample, --topk and --workers must be >= 1")
    progress = not args.no_progress_bar
    t0 = time.time()
    tokens, offsets, vocab, ignore, source = _segments(args)
    n = len(offsets) - 1
    logger.info(f"{n} {source.get('items', 'segments of <= %s tokens' % args.tokens_per_sample)} "
                f"({len(tokens)} tokens)")
    params = bm25_params(args.variant, args.k1, args.b, args.epsilon)
    counts = term_counts(tokens, offsets, vocab, ignore=ignore)
    weights, idf = bm25_weights(counts, params)
    df = document_frequency(counts)
    pruned = args.max_df is not None or args.query_terms is not None
    scorer = TopKScorer(counts, weights, keep=kept_terms(df, n, args.max_df), query_terms=args.query_terms,
                        candidates=args.candidates, dense_ratio=args.dense_ratio, idf=idf)
    del counts, weights
    logger.info(f"scoring: {cost_summary(scorer)}" + (" (pruned candidates, exact re-scoring)" if pruned else ""))
    t1 = time.time()
    ids, scores = bm25_topk(scorer, args.topk, block_rows=args.block_rows, workers=args.workers, progress=progress)
    t2 = time.time()
    order, jumps = greedy_chain(ids, args.seed)
    t3 = time.time()
    meta = dict(
        source,
        num_segments=n,
        bm25=params.to_dict(),
        ignore_stopwords=bool(args.ignore_stopwords),
        topk=args.topk,
        pruning=dict(max_df=args.max_df, query_terms=args.query_terms, candidates=args.candidates) if pruned else None,
        seed=args.seed,
        random_jumps=int(jumps),
        seconds=dict(prepare=round(t1 - t0, 2), search=round(t2 - t1, 2), chain=round(t3 - t2, 2)),
    )
    if args.save_neighbours:
        from trime_fairseq.atomic import atomic_path

        with atomic_path(args.save_neighbours) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, ids=ids, scores=scores)
    write_order_file(args.output, order, meta)
    logger.info(f"wrote {args.output}: {n} segments, {jumps} random jumps; prepare {t1 - t0:.1f}s, "
                f"search {t2 - t1:.1f}s, chain {t3 - t2:.1f}s")
    return meta


def cli_main(argv=None):
    setup_logging(stdout=True)
    main(get_parser().parse_args(argv))


if __name__ == "__main__":
    cli_main()
