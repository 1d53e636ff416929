"""``trime-retrieve-pairs``: SK-MT's sentence retrieval, the m most BM25-similar training pairs of every sentence of a split.

BM25 scores each sentence's **source** tokens against the training sources (idf and lengths of the
training sources; Lucene's BM25 by default, as Elasticsearch, which the paper uses) and keeps the m best
training pair ids; on the training split a sentence never retrieves itself. Target sides are never read.
The file (atomically written, :mod:`trime_fairseq.data.retrieved_pairs`) records what it was built from,
and ``--eval-memory sk_mt --sk-pairs FILE`` refuses it on another split, dictionary or changed data::

    trime-retrieve-pairs --data data-bin/multi30k --source-lang de --target-lang en --split valid \\
        --m 16 --output data-bin/multi30k/sk-pairs/valid.npz
    trime-retrieve-pairs --data data-bin/multi30k --source-lang de --target-lang en --split test \\
        --m 16 --output data-bin/multi30k/sk-pairs/test.npz

Differences to the paper, by design: terms are the dictionary's (BPE) token ids, not Elasticsearch's
analysed words, and there is no edit-distance re-ranking (as knn-box's SK-MT).
"""

import argparse
import logging
import os
import time

import numpy as np

from trime_fairseq.cli import setup_logging
from trime_fairseq.data.bm25 import LUCENE_STOP_WORDS, VARIANTS, bm25_params

logger = logging.getLogger("trime_fairseq.cli.retrieve_pairs")


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="trime-retrieve-pairs", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="fairseq-preprocess folder of the language pair")
    p.add_argument("--source-lang", required=True)
    p.add_argument("--target-lang", required=True)
    p.add_argument("--split", required=True, help="split whose sentences get retrieved pairs (valid, test, train)")
    p.add_argument("--train-split", default="train", help="split the pairs are retrieved from")
    p.add_argument("--m", type=int, default=16, help="pairs kept per sentence (paper: 2..16)")
    p.add_argument("--variant", default="lucene", choices=VARIANTS,
                   help="lucene: Lucene's BM25 (default k1=0.9, b=0.4 as Pyserini; Elasticsearch's defaults are "
                   "--k1 1.2 --b 0.75); okapi: rank_bm25.BM25Okapi (k1=1.5, b=0.75)")
    p.add_argument("--k1", type=float, default=None)
    p.add_argument("--b", type=float, default=None)
    p.add_argument("--ignore-stopwords", action="store_true",
                   help="remove Lucene's English stop words (any case) from queries and documents")
    p.add_argument("--dataset-impl", default=None)
    p.add_argument("--workers", type=int, default=1, help="processes scoring query blocks")
    p.add_argument("--output", required=True, help="retrieval file to write (.npz, atomically)")
    p.add_argument("--no-progress-bar", action="store_true")
    return p


def source_side(data: str, split: str, src: str, tgt: str, dictionary, dataset_impl=None):
    """The source-side indexed dataset of ``split`` (SPLIT.SRC-TGT.SRC, or SPLIT.TGT-SRC.SRC as fairseq finds it)."""
    from fairseq.data import data_utils, indexed_dataset

    for pair in (f"{src}-{tgt}", f"{tgt}-{src}"):
        prefix = os.path.join(data, f"{split}.{pair}.{src}")
        if indexed_dataset.dataset_exists(prefix, impl=dataset_impl or "mmap") or \
                indexed_dataset.dataset_exists(prefix, impl="cached"):
            dataset = data_utils.load_indexed_dataset(prefix, dictionary, dataset_impl)
            if dataset is not None:
                return dataset
    raise FileNotFoundError(f"no source side of split '{split}' in {data} ({split}.{src}-{tgt}.{src}.bin/.idx)")


def _sentences(dataset):
    from trime_fairseq.data.bm25_segments import _flat_tokens

    offsets = np.zeros(len(dataset) + 1, dtype=np.int64)
    np.cumsum(np.asarray(dataset.sizes, dtype=np.int64), out=offsets[1:])
    return _flat_tokens(dataset), offsets


def main(args) -> dict:
    from fairseq.data import Dictionary

    from trime_fairseq.checksums import dictionary_checksum
    from trime_fairseq.data.retrieved_pairs import RetrievedPairs, retrieve, tokens_checksum

    if args.m < 1 or args.workers < 1:
        raise SystemExit("--m and --workers must be >= 1")
    t0 = time.time()
    src, tgt = args.source_lang, args.target_lang
    dicts = {}
    for lang in (src, tgt):
        path = os.path.join(args.data, f"dict.{lang}.txt")
        if not os.path.isfile(path):
            raise SystemExit(f"no dictionary at {path}")
        dicts[lang] = Dictionary.load(path)
    d = dicts[src]
    train_tokens, train_offsets = _sentences(source_side(args.data, args.train_split, src, tgt, d, args.dataset_impl))
    same = args.split == args.train_split
    if same:
        query_tokens, query_offsets = train_tokens, train_offsets
    else:
        query_tokens, query_offsets = _sentences(source_side(args.data, args.split, src, tgt, d, args.dataset_impl))
    ignore = {d.pad(), d.eos(), d.bos(), d.unk()}
    if args.ignore_stopwords:
        ignore |= {i for i, s in enumerate(d.symbols) if s.lower() in LUCENE_STOP_WORDS}
    params = bm25_params(args.variant, args.k1, args.b)
    n, n_train = len(query_offsets) - 1, len(train_offsets) - 1
    logger.info(f"{n} sentences of '{args.split}' against {n_train} training sources "
                f"({'each excluding itself' if same else 'another split'}), m = {args.m}")
    ids, scores = retrieve(query_tokens, query_offsets, train_tokens, train_offsets, len(d), args.m, params,
                           ignore=sorted(ignore), same=same, workers=args.workers,
                           progress=not args.no_progress_bar)
    short = int((ids < 0).any(axis=1).sum())
    meta = dict(
        data=os.path.abspath(args.data), source_lang=src, target_lang=tgt, split=args.split, num_sentences=n,
        train_split=args.train_split, num_train=n_train, m=args.m, excludes_self=same,
        split_source_sha256=tokens_checksum(query_tokens, query_offsets),
        train_source_sha256=tokens_checksum(train_tokens, train_offsets),
        source_dictionary_sha256=dictionary_checksum(d), target_dictionary_sha256=dictionary_checksum(dicts[tgt]),
        bm25=params.to_dict(), ignore_stopwords=bool(args.ignore_stopwords),
        sentences_with_fewer_than_m=short, seconds=round(time.time() - t0, 2),
    )
    RetrievedPairs(ids, scores, meta).write(args.output)
    logger.info(f"wrote {args.output}: {n} x {args.m} pair ids ({short} sentences with fewer than m matches) "
                f"in {time.time() - t0:.1f}s")
    return meta


def cli_main(argv=None):
    setup_logging(stdout=True)
    main(get_parser().parse_args(argv))


if __name__ == "__main__":
    cli_main()
