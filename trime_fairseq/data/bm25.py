"""BM25 similarity between training segments and greedy chaining (TRIME §4.3).

TRIME packs lexically similar segments into one batch: starting from a random
segment it repeatedly appends the best-scoring unused BM25 neighbour among the
top hits, and jumps to a random unused segment when none is left. The chain is
then cut into batches (:mod:`trime_fairseq.data.bm25_batching`).

Every segment is both a query and a document. With ``C`` the (N, V) term-count
matrix of the N segments (queries count repeated terms, as Anserini's
bag-of-words query does with term boosts) and ``W`` the (N, V) BM25 document
weights, all scores are ``S = C · Wᵀ`` (N, N), computed in row blocks and reduced
to the top-k per row at once, never materialised whole.

BM25 variants (``tf`` = term count in the document, ``dl`` its length, ``df``
the number of segments holding the term)::

    lucene (default; Lucene >= 8 / Pyserini, k1=0.9, b=0.4):
        idf = log(1 + (N - df + 0.5) / (df + 0.5))
        w   = idf · tf / (tf + k1 · (1 - b + b · dl / avgdl))
    okapi  (rank_bm25.BM25Okapi, k1=1.5, b=0.75, ε=0.25):
        idf = log(N - df + 0.5) - log(df + 0.5), negative idf -> ε · mean(idf)
        w   = idf · tf · (k1 + 1) / (tf + k1 · (1 - b + b · dl / avgdl))

Differences to TRIME's Pyserini run, by design: terms are token ids of the
fairseq dictionary (no lower-casing or stemming), document lengths are exact
(Lucene stores them lossily in one byte), and stop words are terms unless
``ignore`` removes them before counting (``trime-bm25-batches --ignore-stopwords``:
Lucene's English stop set, as Anserini indexes by default).

Speed. Exact all-pairs scoring costs sum_t df(t)^2 sparse operations. Terms held by
many segments (``df >= dense_ratio · N``) go through a dense BLAS product instead,
the rest through ``scipy.sparse`` in column blocks of documents (the accumulator
stays in cache). This is exact and fast for long segments (WikiText-103, L=3072).
For very many short segments (L=150: 690k segments) the optional pruning makes
candidate generation cheap -- each query uses only its terms with
``df <= max_df · N`` and of those its ``query_terms`` best by qtf·idf -- and then
re-scores the top ``candidates`` exactly with all terms. Returned scores are then
exact BM25; only the candidate set is approximate (its top-k overlap with exact
search is measured in docs/results_datastore.md).
"""

import json
import multiprocessing as mp
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from typing import Iterable, Optional, Sequence, Tuple

import numpy as np
import scipy.sparse as sp
from tqdm import tqdm

VARIANTS = ("lucene", "okapi")
_DEFAULTS = {"lucene": dict(k1=0.9, b=0.4), "okapi": dict(k1=1.5, b=0.75)}

# Lucene's EnglishAnalyzer stop set (matched case-insensitively, as Lucene lower-cases first)
LUCENE_STOP_WORDS = frozenset(
    "a an and are as at be but by for if in into is it no not of on or such that the their "
    "then there these they this to was will with".split()
)


@dataclass(frozen=True)
class BM25Params:
    variant: str = "lucene"
    k1: float = 0.9
    b: float = 0.4
    epsilon: float = 0.25  # okapi only: floor of negative idf, as a fraction of the mean idf

    def __post_init__(self):
        if self.variant not in VARIANTS:
            raise ValueError(f"unknown BM25 variant '{self.variant}', choose one of {VARIANTS}")
        if self.k1 < 0:
            raise ValueError(f"BM25 k1 must be >= 0, got {self.k1}")
        if not 0.0 <= self.b <= 1.0:
            raise ValueError(f"BM25 b must lie in [0, 1], got {self.b}")

    def to_dict(self):
        return asdict(self)


def bm25_params(variant: str = "lucene", k1: Optional[float] = None, b: Optional[float] = None,
                epsilon: float = 0.25) -> BM25Params:
    """Parameters of ``variant`` with its defaults for unset k1 / b."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown BM25 variant '{variant}', choose one of {VARIANTS}")
    d = _DEFAULTS[variant]
    return BM25Params(variant, d["k1"] if k1 is None else k1, d["b"] if b is None else b, epsilon)


# -- corpus statistics ------------------------------------------------------------------------

def offsets_of(segments: Sequence[np.ndarray]) -> Tuple[np.ndarray, np.ndarray]:
    """List of 1-D token arrays -> (tokens (T,), offsets (N+1,)); segment i = tokens[o[i]:o[i+1]]."""
    lengths = np.array([len(s) for s in segments], dtype=np.int64)
    offsets = np.zeros(len(segments) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    tokens = np.concatenate([np.asarray(s, dtype=np.int64) for s in segments]) if segments else np.zeros(0, np.int64)
    return tokens, offsets


def term_counts(tokens: np.ndarray, offsets: np.ndarray, vocab_size: int,
                ignore: Iterable[int] = (), chunk_tokens: int = 1 << 22) -> sp.csr_matrix:
    """(N, V) float32 CSR term counts of the segments ``tokens[offsets[i]:offsets[i+1]]``.

    Tokens in ``ignore`` (e.g. pad / eos / bos) are not terms and do not count in
    the segment length.
    """
    tokens = np.asarray(tokens)
    offsets = np.asarray(offsets, dtype=np.int64)
    n = len(offsets) - 1
    if n < 1:
        raise ValueError("BM25 needs at least one segment")
    if offsets[0] != 0 or offsets[-1] != len(tokens) or np.any(np.diff(offsets) < 0):
        raise ValueError("segment offsets must start at 0, be non-decreasing and end at len(tokens)")
    if len(tokens) and (tokens.min() < 0 or tokens.max() >= vocab_size):
        raise ValueError(f"token ids must lie in [0, {vocab_size}), got [{tokens.min()}, {tokens.max()}]")
    ignore = np.fromiter(ignore, dtype=np.int64)
    parts, start = [], 0
    while start < n:  # chunks of whole segments, ~chunk_tokens tokens each
        stop = int(np.searchsorted(offsets, offsets[start] + chunk_tokens, side="right"))
        stop = min(max(stop - 1, start + 1), n)
        chunk = tokens[offsets[start]:offsets[stop]].astype(np.int64)
        rows = np.repeat(np.arange(stop - start), np.diff(offsets[start:stop + 1]))
        if len(ignore):
            keep = ~np.isin(chunk, ignore)
            chunk, rows = chunk[keep], rows[keep]
        m = sp.csr_matrix((np.ones(len(chunk), np.float32), (rows, chunk)), shape=(stop - start, vocab_size))
        m.sum_duplicates()
        parts.append(m)
        start = stop
    return sp.vstack(parts, format="csr") if len(parts) > 1 else parts[0]


def document_frequency(counts: sp.csr_matrix) -> np.ndarray:
    """(V,) number of segments holding each term."""
    return np.bincount(counts.indices, minlength=counts.shape[1])


def idf_of(df: np.ndarray, n_docs: int, params: BM25Params) -> np.ndarray:
    """(V,) float64 idf; terms absent from the corpus get 0."""
    df = df.astype(np.float64)
    present = df > 0
    idf = np.zeros_like(df)
    if params.variant == "lucene":
        idf[present] = np.log1p((n_docs - df[present] + 0.5) / (df[present] + 0.5))
    else:  # rank_bm25.BM25Okapi
        idf[present] = np.log(n_docs - df[present] + 0.5) - np.log(df[present] + 0.5)
        mean = idf[present].mean() if present.any() else 0.0
        idf[present & (idf < 0)] = params.epsilon * mean
    return idf


def bm25_weights(counts: sp.csr_matrix, params: BM25Params) -> Tuple[sp.csr_matrix, np.ndarray]:
    """Document weights W (N, V) float64 CSR and idf (V,): score(q, d) = Σ_t C[q,t] · W[d,t]."""
    counts = counts.tocsr()
    n = counts.shape[0]
    dl = np.asarray(counts.sum(axis=1), dtype=np.float64).ravel()  # (N,)
    avgdl = dl.mean()
    if avgdl <= 0:
        raise ValueError("every segment is empty after removing ignored tokens: nothing to score")
    idf = idf_of(document_frequency(counts), n, params)
    norm = params.k1 * (1.0 - params.b + params.b * dl / avgdl)  # (N,)
    rows = np.repeat(np.arange(n), np.diff(counts.indptr))
    tf = counts.data.astype(np.float64)
    gain = params.k1 + 1.0 if params.variant == "okapi" else 1.0
    data = idf[counts.indices] * tf * gain / (tf + norm[rows])
    weights = sp.csr_matrix((data, counts.indices.copy(), counts.indptr.copy()), shape=counts.shape)
    return weights, idf


def kept_terms(df: np.ndarray, n_docs: int, max_df: Optional[float] = None) -> np.ndarray:
    """(V,) bool: terms that may generate candidates, those held by at most ``max_df · N``
    segments (0 < max_df <= 1; None: every present term)."""
    keep = df > 0
    if max_df is not None:
        if not 0.0 < max_df <= 1.0:
            raise ValueError(f"max_df is a fraction of the segments in (0, 1], got {max_df}")
        keep &= df <= max_df * n_docs
    return keep


def score_matrix(counts: sp.csr_matrix, weights: sp.csr_matrix) -> np.ndarray:
    """All scores S = C · Wᵀ (N, N) float64, dense: the naive reference for small corpora."""
    return np.asarray((counts.astype(np.float64) @ weights.T.astype(np.float64)).todense())


# -- blockwise top-k ---------------------------------------------------------------------------

class TopKScorer:
    """Top-k BM25 neighbours of every segment, in row blocks.

    Exact (default): terms with ``df >= dense_ratio · N`` are scored with a dense
    product (B, H) x (H, N), the others with a sparse product (B, Vs) x (Vs, N).

    Pruned (``keep`` drops terms and/or ``query_terms = T``): candidates come from a
    cheaper product that uses, per query, only its kept terms (and of those the T
    with the highest qtf·idf); the top ``candidates = M`` of them are re-scored
    exactly with all terms, and the best k returned. Scores are then exact BM25,
    the candidate set approximate.
    """

    def __init__(self, counts: sp.csr_matrix, weights: sp.csr_matrix, keep: Optional[np.ndarray] = None,
                 query_terms: Optional[int] = None, candidates: int = 100, dense_ratio: float = 0.1,
                 idf: Optional[np.ndarray] = None, col_block: int = 1 << 16, dtype=np.float32,
                 queries: Optional[sp.csr_matrix] = None):
        """``counts`` / ``weights`` (N, V): the documents' term counts and BM25 weights; ``queries``
        (Nq, V): other queries' term counts (SK-MT: the sentences of another split against the training
        sentences), default the documents themselves, each then excluding itself."""
        n, v = counts.shape
        if weights.shape != (n, v):
            raise ValueError(f"counts {counts.shape} and weights {weights.shape} differ in shape")
        if queries is not None and queries.shape[1] != v:
            raise ValueError(f"queries {queries.shape} and documents {counts.shape} have other vocabularies")
        self.exclude_own = queries is None
        queries = counts if queries is None else queries
        self.num_queries = queries.shape[0]
        if not dense_ratio > 0:
            raise ValueError(f"dense_ratio must be > 0, got {dense_ratio}")
        if candidates < 1:
            raise ValueError(f"candidates must be >= 1, got {candidates}")
        if query_terms is not None and query_terms < 1:
            raise ValueError(f"query_terms must be >= 1, got {query_terms}")
        df = document_frequency(counts)
        present = df > 0
        keep = present if keep is None else (np.asarray(keep, bool) & present)
        self.n, self.v, self.dtype = n, v, dtype
        self.pruned = bool((present & ~keep).any()) or query_terms is not None
        self.candidates = candidates
        q = queries.tocsr().astype(dtype)
        if self.pruned:
            if idf is None:
                raise ValueError("pruned scoring needs the idf (from bm25_weights) to rank query terms")
            q = _prune_queries(q, keep, idf, query_terms)  # (Nq, V) candidate-generation queries
            self.q_full = queries.tocsr().astype(dtype)  # (Nq, V) for exact re-scoring
            self.w_full = weights.tocsr().astype(dtype)  # (N, V)
        qdf = document_frequency(q)
        used = np.flatnonzero(qdf > 0)
        # pruned queries hold few frequent terms: a dense product over all N would cost more
        dense_min_df = np.inf if self.pruned else dense_ratio * n
        dense = used[df[used] >= dense_min_df]
        sparse_terms = used[df[used] < dense_min_df]
        qc, w = q.tocsc(), weights.tocsc()
        self.num_dense, self.num_sparse = len(dense), len(sparse_terms)
        self.num_dropped = int(present.sum()) - len(used)
        self.q_dense = qc[:, dense].tocsr()  # (N, H)
        self.w_dense_t = np.ascontiguousarray(w[:, dense].T.toarray(), dtype=dtype)  # (H, N)
        self.q_sparse = qc[:, sparse_terms].tocsr()  # (N, Vs)
        w_sparse_t = w[:, sparse_terms].T.tocsc().astype(dtype)  # (Vs, N)
        # documents in column blocks: the sparse product's accumulator then stays in cache
        self.col_blocks = [(c, min(c + col_block, n)) for c in range(0, n, col_block)]
        self.w_sparse_t = [w_sparse_t[:, c0:c1].tocsr() for c0, c1 in self.col_blocks]  # (Vs, Nc) each
        # sparse work: sum over queries of the posting-list lengths of their sparse terms
        self.sparse_work = float(qdf[sparse_terms].astype(np.float64) @ df[sparse_terms].astype(np.float64))

    def block_rows(self, wanted: int) -> int:
        """Rows per block so that a dense (B, N) block stays near 2^25 scores (128 MiB)."""
        if not self.num_dense:
            return wanted
        return max(1, min(wanted, (1 << 25) // max(self.n, 1)))

    def block(self, start: int, stop: int, k: int) -> Tuple[np.ndarray, np.ndarray]:
        """Neighbours of query rows start..stop: ids (B, k) int32 (-1: none), scores (B, k) float32,
        best first (ties: lower id), self excluded (queries = documents), only positive scores."""
        b = stop - start
        own = start + np.arange(b) if self.exclude_own else None
        first_k = max(k, self.candidates) if self.pruned else k
        q_sparse = self.q_sparse[start:stop]  # (B, Vs)
        if self.num_dense:  # dense (B, N) scores
            scores = self.q_dense[start:stop].toarray() @ self.w_dense_t  # (B, N)
            for (c0, c1), w_block in zip(self.col_blocks, self.w_sparse_t):
                scores[:, c0:c1] += (q_sparse @ w_block).toarray()
            ids, top = _top_k(scores, None, own, first_k)
        else:  # top-k of every column block, then of their union
            found = [_sparse_top_k(q_sparse @ w_block, c0, own, first_k)
                     for (c0, _), w_block in zip(self.col_blocks, self.w_sparse_t)]
            if len(found) == 1:
                ids, top = found[0]
            else:
                ids = np.concatenate([f[0] for f in found], axis=1).astype(np.int64)
                top = np.concatenate([f[1] for f in found], axis=1)
                ids, top = _top_k(top, ids, None, first_k)
        if not self.pruned:
            return ids, top
        return self._rescore(start, ids, k)

    def _rescore(self, start: int, ids: np.ndarray, k: int):
        """Exact scores of the (B, M) candidates ``ids`` (-1: none); keep the top-k."""
        b, m = ids.shape
        table = np.full((b, m), -np.inf, dtype=self.dtype)
        sub = max(1, (1 << 22) // self.v)  # query rows per dense (sub, V) lookup table
        for r0 in range(0, b, sub):
            r1 = min(r0 + sub, b)
            valid = ids[r0:r1] >= 0  # (s, M)
            pair_query = np.repeat(np.arange(r1 - r0), m)[valid.ravel()]  # (P,)
            gathered = self.w_full[ids[r0:r1][valid]]  # (P, V) the candidates' weights
            entry_pair = np.repeat(np.arange(gathered.shape[0]), np.diff(gathered.indptr))
            q = self.q_full[start + r0:start + r1].toarray()  # (s, V) query term counts
            qtf = q[pair_query[entry_pair], gathered.indices]
            exact = np.bincount(entry_pair, weights=gathered.data * qtf, minlength=gathered.shape[0])
            table[r0:r1][valid] = exact
        return _top_k(table, ids.astype(np.int64), None, k)


def _prune_queries(q: sp.csr_matrix, keep: np.ndarray, idf: np.ndarray, query_terms: Optional[int]):
    """(N, V) queries for candidate generation: drop terms not in ``keep`` from every row and
    keep at most ``query_terms`` per row (the highest qtf·idf, ties by lower term id)."""
    q = q.tocsr().copy()
    q.sort_indices()
    q.data = np.where(keep[q.indices], q.data, 0).astype(q.dtype)
    q.eliminate_zeros()
    if query_terms is None:
        return q
    rows = np.repeat(np.arange(q.shape[0]), np.diff(q.indptr))
    weight = q.data * idf[q.indices]
    order = np.lexsort((q.indices, -weight, rows))  # by row, then best weight first
    rank = np.empty(len(order), np.int64)
    rank[order] = np.arange(len(order)) - q.indptr[rows[order]]
    q.data = np.where(rank < query_terms, q.data, 0).astype(q.dtype)
    q.eliminate_zeros()
    return q


def _sparse_top_k(partial: sp.csr_matrix, col_offset: int, own: np.ndarray, k: int):
    """Top-k of the rows of a (B, Nc) sparse score block whose column j is segment col_offset + j."""
    partial = partial.tocsr()
    b = partial.shape[0]
    lengths = np.diff(partial.indptr)
    m = max(int(lengths.max(initial=0)), 1)
    rows = np.repeat(np.arange(b), lengths)
    pos = np.arange(partial.nnz) - partial.indptr[rows]
    scores = np.zeros((b, m), dtype=partial.dtype)  # padded (B, m) candidate table
    cand_ids = np.full((b, m), -1, dtype=np.int64)
    scores[rows, pos] = partial.data
    cand_ids[rows, pos] = partial.indices + col_offset
    return _top_k(scores, cand_ids, own, k)


def _top_k(scores: np.ndarray, cand_ids: Optional[np.ndarray], own: Optional[np.ndarray], k: int):
    """Row-wise top-k of (B, M) scores whose column j is segment ``cand_ids[:, j]``
    (or j itself when ``cand_ids`` is None); excludes each row's own segment ``own`` (B,)."""
    b, m = scores.shape
    if own is not None and cand_ids is None:
        scores[np.arange(b), own] = -np.inf
    elif own is not None:
        scores[cand_ids == own[:, None]] = -np.inf
    kk = min(k, m)
    if kk < m:
        part = np.argpartition(-scores, kk - 1, axis=1)[:, :kk]  # (B, kk) unordered; -scores: fast with many 0
    else:
        part = np.broadcast_to(np.arange(m), (b, m)).copy()
    top = np.take_along_axis(scores, part, axis=1)
    ids = part if cand_ids is None else np.take_along_axis(cand_ids, part, axis=1)
    order = np.lexsort((ids, -top), axis=1)  # best score first, ties by lower id
    top = np.take_along_axis(top, order, axis=1)
    ids = np.take_along_axis(ids, order, axis=1)
    found = (top > 0) & (ids >= 0)
    out_ids = np.full((b, k), -1, dtype=np.int32)
    out_scores = np.zeros((b, k), dtype=np.float32)
    out_ids[:, :kk] = np.where(found, ids, -1)
    out_scores[:, :kk] = np.where(found, top, 0.0)
    return out_ids, out_scores


_WORKER_SCORER: Optional[TopKScorer] = None


def _init_worker():
    try:  # one BLAS thread per worker process
        from threadpoolctl import threadpool_limits

        threadpool_limits(1)
    except ImportError:  # pragma: no cover - threadpoolctl ships with scipy's usual installs
        pass


def _run_block(args):
    start, stop, k = args
    return start, _WORKER_SCORER.block(start, stop, k)


def bm25_topk(scorer: TopKScorer, k: int, block_rows: int = 256, workers: int = 1,
              rows: Optional[Tuple[int, int]] = None, progress: bool = True) -> Tuple[np.ndarray, np.ndarray]:
    """Top-k neighbours of rows ``rows`` (default all): ids (R, k) int32, scores (R, k) float32.

    ``workers > 1`` scores row blocks in forked worker processes sharing the scorer.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if block_rows < 1 or workers < 1:
        raise ValueError("block_rows and workers must be >= 1")
    first, last = rows if rows is not None else (0, scorer.num_queries)
    if not 0 <= first < last <= scorer.num_queries:
        raise ValueError(f"row range {rows} outside [0, {scorer.num_queries}]")
    ids = np.empty((last - first, k), dtype=np.int32)
    scores = np.empty((last - first, k), dtype=np.float32)
    step = scorer.block_rows(block_rows)
    tasks = [(s, min(s + step, last), k) for s in range(first, last, step)]
    bar = tqdm(total=last - first, desc="bm25 top-k", unit="seg", disable=not progress, mininterval=2.0)
    global _WORKER_SCORER
    _WORKER_SCORER = scorer
    try:
        if workers == 1:
            results = map(_run_block, tasks)
            _collect(results, ids, scores, first, bar)
        else:
            if "fork" not in mp.get_all_start_methods():
                raise RuntimeError("workers > 1 needs the 'fork' start method (Linux / macOS)")
            with ProcessPoolExecutor(workers, mp_context=mp.get_context("fork"), initializer=_init_worker) as ex:
                _collect(ex.map(_run_block, tasks, chunksize=1), ids, scores, first, bar)
    finally:
        _WORKER_SCORER = None
        bar.close()
    return ids, scores


def _collect(results, ids, scores, first, bar):
    for start, (block_ids, block_scores) in results:
        ids[start - first:start - first + len(block_ids)] = block_ids
        scores[start - first:start - first + len(block_ids)] = block_scores
        bar.update(len(block_ids))


# -- chaining -----------------------------------------------------------------------------------

def greedy_chain(neighbours: np.ndarray, seed: int) -> Tuple[np.ndarray, int]:
    """TRIME's greedy chain over all N segments: (order (N,) int64 permutation, number of random jumps).

    ``neighbours`` (N, k): each row's neighbours, best first, -1 for none. Start at
    a random segment; next is the first unused neighbour of the current segment;
    if all are used, jump to the next unused segment of a seeded random permutation.
    """
    neighbours = np.asarray(neighbours)
    if neighbours.ndim != 2:
        raise ValueError(f"neighbours must be (N, k), got shape {neighbours.shape}")
    n = neighbours.shape[0]
    if n == 0:
        return np.zeros(0, np.int64), 0
    if neighbours.max(initial=-1) >= n or neighbours.min(initial=-1) < -1:
        raise ValueError(f"neighbour ids must lie in [-1, {n})")
    jumps_order = np.random.default_rng(seed).permutation(n).tolist()
    lists = neighbours.tolist()
    used = bytearray(n)
    order = [0] * n
    p, jumps = 0, 0
    x = jumps_order[0]
    for i in range(n):
        if i > 0:
            x = -1
            for y in lists[prev]:
                if y >= 0 and not used[y]:
                    x = y
                    break
            if x < 0:
                while used[jumps_order[p]]:
                    p += 1
                x = jumps_order[p]
                jumps += 1
        used[x] = 1
        order[i] = x
        prev = x
    return np.asarray(order, dtype=np.int64), jumps


# -- order file ---------------------------------------------------------------------------------

ORDER_MAGIC = "# trime-bm25-order v1 "


def write_order_file(path, order: np.ndarray, meta: dict) -> None:
    """Atomically write the chain: a JSON header line, then one segment id per line."""
    from trime_fairseq.atomic import atomic_path

    order = np.asarray(order, dtype=np.int64)
    _check_permutation(order, len(order), path)
    meta = dict(meta, num_segments=int(len(order)))
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(ORDER_MAGIC + json.dumps(meta, sort_keys=True) + "\n")
            np.savetxt(f, order, fmt="%d")


def read_order_file(path) -> Tuple[np.ndarray, dict]:
    """(order (N,) int64, header dict); refuses files that are not a complete permutation."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"BM25 order file not found: {path} (create it with trime-bm25-batches)")
    with open(path, encoding="utf-8") as f:
        header = f.readline()
        if not header.startswith(ORDER_MAGIC):
            raise ValueError(f"{path} is not a trime-bm25-batches order file (bad header)")
        try:
            meta = json.loads(header[len(ORDER_MAGIC):])
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: unreadable header ({e})") from None
        body = f.read()
    try:
        order = np.array(body.split(), dtype=np.int64)
    except ValueError:
        raise ValueError(f"{path}: segment ids must be integers") from None
    _check_permutation(order, int(meta.get("num_segments", -1)), path)
    return order, meta


def _check_permutation(order: np.ndarray, n: int, path) -> None:
    if len(order) != n:
        raise ValueError(f"{path}: holds {len(order)} segment ids but its header says {n} (truncated?)")
    if n and (order.min() < 0 or order.max() >= n or np.bincount(order, minlength=n).max() != 1):
        raise ValueError(f"{path}: segment ids are not a permutation of 0..{n - 1}")


def cost_summary(scorer: TopKScorer) -> str:
    return (f"{scorer.n} segments, {scorer.num_dense} dense terms, {scorer.num_sparse} sparse terms, "
            f"sparse work (posting entries visited) {scorer.sparse_work:.3g}")


__all__ = [
    "BM25Params", "bm25_params", "VARIANTS", "LUCENE_STOP_WORDS", "offsets_of", "term_counts",
    "document_frequency", "idf_of", "bm25_weights", "kept_terms", "score_matrix", "TopKScorer",
    "bm25_topk", "greedy_chain", "write_order_file", "read_order_file", "cost_summary",
]
