"""SK-MT's retrieval file: for every sentence of a split, the ids of its m most BM25-similar training pairs.

Retrieval is by the **source side only** (the query sentence's source tokens against the training
sources, :class:`~trime_fairseq.data.bm25.TopKScorer`); on the training split itself a sentence never
retrieves itself. Nothing of any target side is read, so a sentence's memory can never hold its own
reference.

The file (``.npz``, written atomically by ``trime-retrieve-pairs``) holds ``ids`` (N, m) int32 (best
first, ties by lower id, -1 where fewer than m training sources share a term with the query), ``scores``
(N, m) float32 and ``meta``, a JSON header recording what it was built from: the data folder, the
language pair, the query and training splits with their sizes and the sha256 of their source tokens,
both dictionaries' checksums, m and the BM25 parameters. :func:`check_split` / :func:`check_training`
refuse a file used on another split, another dictionary or data that changed since.
"""

import hashlib
import json
import os
from dataclasses import dataclass
import numpy as np

FORMAT = "trime-retrieved-pairs v1"


class RetrievedPairsError(ValueError):
    """A retrieval file that does not belong to the data it is used with (or is no retrieval file)."""


def tokens_checksum(tokens: np.ndarray, offsets: np.ndarray) -> str:
    """sha256 of a split side's sentences: (T,) token ids and (N+1,) offsets, as int64."""
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(offsets, dtype=np.int64).tobytes())
    h.update(np.ascontiguousarray(tokens, dtype=np.int64).tobytes())
    return h.hexdigest()


def dataset_checksum(dataset) -> str:
    """:func:`tokens_checksum` of an indexed dataset's items (a fairseq split side)."""
    from trime_fairseq.data.bm25_segments import _flat_tokens

    offsets = np.zeros(len(dataset) + 1, dtype=np.int64)
    np.cumsum(np.asarray(dataset.sizes, dtype=np.int64), out=offsets[1:])
    return tokens_checksum(_flat_tokens(dataset), offsets)


@dataclass
class RetrievedPairs:
    ids: np.ndarray  # (N, m) int32 training pair ids, best first, -1: none
    scores: np.ndarray  # (N, m) float32 BM25 scores (0 where none)
    meta: dict

    @property
    def m(self) -> int:
        return self.ids.shape[1]

    def write(self, path) -> None:
        """Write atomically (``path`` ends in .npz)."""
        from trime_fairseq.atomic import atomic_path

        self._check_shape(path)
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, ids=self.ids.astype(np.int32), scores=self.scores.astype(np.float32),
                         meta=np.array(json.dumps(dict(self.meta, format=FORMAT), sort_keys=True)))

    @classmethod
    def read(cls, path) -> "RetrievedPairs":
        if not os.path.isfile(path):
            raise FileNotFoundError(f"retrieval file not found: {path} (write it with trime-retrieve-pairs)")
        try:
            with np.load(path, allow_pickle=False) as f:
                ids, scores, meta = f["ids"], f["scores"], json.loads(str(f["meta"]))
        except (KeyError, ValueError, OSError) as e:
            raise RetrievedPairsError(f"{path} is not a trime-retrieve-pairs file ({e})") from None
        if meta.get("format") != FORMAT:
            raise RetrievedPairsError(f"{path}: format {meta.get('format')!r}, expected {FORMAT!r}")
        out = cls(ids, scores, meta)
        out._check_shape(path)
        return out

    def _check_shape(self, path) -> None:
        n, m = self.meta.get("num_sentences"), self.meta.get("m")
        if self.ids.ndim != 2 or self.ids.shape != self.scores.shape or self.ids.shape != (n, m):
            raise RetrievedPairsError(f"{path}: ids {self.ids.shape} / scores {self.scores.shape} do not match its "
                                      f"header's {n} sentences x m = {m} (truncated?)")
        train = self.meta.get("num_train")
        if self.ids.size and (self.ids.min() < -1 or self.ids.max() >= train):
            raise RetrievedPairsError(f"{path}: training pair ids outside [-1, {train})")

    # -- checks against the data it is used with ---------------------------------------------------------
    def check_dictionaries(self, src_dict, tgt_dict, path="the retrieval file") -> None:
        from trime_fairseq.checksums import dictionary_checksum

        for side, d in (("source", src_dict), ("target", tgt_dict)):
            if self.meta[f"{side}_dictionary_sha256"] != dictionary_checksum(d):
                raise RetrievedPairsError(f"{path} was built with another {side} dictionary than this task's "
                                          "(rebuild it with trime-retrieve-pairs on this data)")

    def check_split(self, split: str, source_dataset, path="the retrieval file") -> None:
        """The evaluated split: its name, its number of sentences and its source tokens must be the file's."""
        if split != self.meta["split"]:
            raise RetrievedPairsError(
                f"{path} holds the retrieved pairs of split '{self.meta['split']}', not of '{split}': write one "
                f"for '{split}' with trime-retrieve-pairs --split {split}")
        if len(source_dataset) != self.meta["num_sentences"]:
            raise RetrievedPairsError(f"split '{split}' has {len(source_dataset)} sentences, {path} was built for "
                                      f"{self.meta['num_sentences']}: rebuild it")
        if dataset_checksum(source_dataset) != self.meta["split_source_sha256"]:
            raise RetrievedPairsError(f"the source sentences of '{split}' changed since {path} was built: rebuild it")

    def check_training(self, source_dataset, path="the retrieval file") -> None:
        """The training split the ids point into: its size and source tokens must be the file's."""
        if len(source_dataset) != self.meta["num_train"]:
            raise RetrievedPairsError(f"training split '{self.meta['train_split']}' has {len(source_dataset)} "
                                      f"pairs, {path} was built over {self.meta['num_train']}: rebuild it")
        if dataset_checksum(source_dataset) != self.meta["train_source_sha256"]:
            raise RetrievedPairsError(f"the training sources changed since {path} was built: rebuild it")


def retrieve(query_tokens: np.ndarray, query_offsets: np.ndarray, train_tokens: np.ndarray,
             train_offsets: np.ndarray, vocab_size: int, m: int, params, ignore=(), same: bool = False,
             workers: int = 1, progress: bool = True, block_rows: int = 256):
    """(ids (Nq, m) int32, scores (Nq, m) float32): the m best training sentences of every query sentence by
    BM25 (idf and lengths from the training sentences); ``same``: the queries are the training sentences, each
    excluding itself."""
    from trime_fairseq.data.bm25 import TopKScorer, bm25_topk, bm25_weights, term_counts

    if m < 1:
        raise ValueError(f"m must be >= 1, got {m}")
    counts = term_counts(train_tokens, train_offsets, vocab_size, ignore=ignore)
    weights, idf = bm25_weights(counts, params)
    queries = None if same else term_counts(query_tokens, query_offsets, vocab_size, ignore=ignore)
    scorer = TopKScorer(counts, weights, idf=idf, queries=queries)
    return bm25_topk(scorer, m, block_rows=block_rows, workers=workers, progress=progress)

