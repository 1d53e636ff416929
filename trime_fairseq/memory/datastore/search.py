"""Searching a datastore: :class:`Datastore` (a complete, verified datastore) and :class:`Exclusion`.

:meth:`Datastore.search` answers with the project's
:class:`~trime_fairseq.memory.sources.MemoryBatch`: scores are the inner product
(``metric=ip``) or the negative squared L2 distance (``metric=l2``), not yet scaled, so
callers apply temperatures and interpolation with :mod:`trime_fairseq.memory.mixing`
(``memory_log_probs``, ``interpolate_memory``, ``joint_log_probs``). With an
:class:`Exclusion` a query does not retrieve its own entry and / or its document's
(SPALM's neighbours of the datastore's own split).
"""

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from trime_fairseq.memory import faiss_index as fi
from trime_fairseq.memory.datastore.format import META, as_numpy
from trime_fairseq.memory.datastore.reading import ModelRef, check_expectations, open_entries, read_metadata
from trime_fairseq.memory.sources import MemoryBatch


@dataclass(frozen=True)
class Exclusion:
    """Entries a search must not return, per query: its own entry and / or every entry with its label.

    * ``own_ids`` (Q,): entry q of the datastore is query q's own (SPALM's training
      split: entry ids are stream positions); -1: none;
    * ``query_labels`` (Q,) and ``entry_labels`` (N,): entry i is hidden from query q
      iff ``entry_labels[i] == query_labels[q]`` (the query's document); a query
      label of -1 hides nothing.

    ``max_hidden`` (at most this many entries are hidden per query: 1 for own-entry
    exclusion alone) sizes the first over-fetch; None: unknown.
    """

    own_ids: Optional[np.ndarray] = None  # (Q,) int64
    query_labels: Optional[np.ndarray] = None  # (Q,) int64
    entry_labels: Optional[np.ndarray] = None  # (N,)

    def __post_init__(self):
        if (self.query_labels is None) != (self.entry_labels is None):
            raise ValueError("label exclusion needs both the queries' and the entries' labels")
        if self.own_ids is None and self.query_labels is None:
            raise ValueError("an exclusion needs own entry ids or labels")

    @classmethod
    def own_entry(cls, entry_ids, query_labels=None, entry_labels=None) -> "Exclusion":
        """Each query's own entry (``entry_ids``), and with labels every entry sharing its label."""
        return cls(np.asarray(entry_ids, dtype=np.int64),
                   None if query_labels is None else np.asarray(query_labels, dtype=np.int64),
                   None if entry_labels is None else np.asarray(entry_labels))

    @classmethod
    def same_label(cls, query_labels, entry_labels) -> "Exclusion":
        return cls(None, np.asarray(query_labels, dtype=np.int64), np.asarray(entry_labels))

    @property
    def max_hidden(self) -> Optional[int]:
        return 1 if self.query_labels is None else None

    def check(self, num_queries: int, num_entries: int) -> None:
        for name in ("own_ids", "query_labels"):
            value = getattr(self, name)
            if value is not None and value.shape != (num_queries,):
                raise ValueError(f"exclusion {name} {value.shape} do not match {num_queries} queries")
        if self.entry_labels is not None and self.entry_labels.shape != (num_entries,):
            raise ValueError(f"exclusion has {self.entry_labels.shape} entry labels for a datastore of {num_entries}")

    def hidden(self, rows: np.ndarray, ids: np.ndarray) -> np.ndarray:
        """(R, F) bool: hit ``ids[r, f]`` of query ``rows[r]`` is excluded (ids -1 never are)."""
        found = ids >= 0
        out = np.zeros(ids.shape, dtype=bool)
        if self.own_ids is not None:
            out |= ids == self.own_ids[rows][:, None]
        if self.query_labels is not None:
            mine = self.query_labels[rows][:, None]  # (R, 1)
            out |= (mine >= 0) & (self.entry_labels[np.where(found, ids, 0)] == mine)
        return found & out


class Datastore:
    """A complete datastore: memmapped keys/values, FAISS index, metadata."""

    def __init__(self, path: Path, meta: dict, keys: np.ndarray, values: np.ndarray, index, rescore: bool):
        self.path, self.meta, self.keys, self.values, self.index = path, meta, keys, values, index
        self.rescore = rescore
        self.size, self.dim, self.metric = int(meta["size"]), int(meta["dim"]), meta["metric"]
        # sha256 of this build's datastore.json (size, model, dictionary, index, build time):
        # what artefacts derived from the datastore (SPALM's neighbour files) record
        self.fingerprint = hashlib.sha256((path / META).read_bytes()).hexdigest()
        self.on_gpu = False  # the index lives on a GPU (faiss-gpu): torch queries stay there
        self._device_values = {}  # device -> (N,) int32 copy of the values, for torch searches
        # key transforms (PCA / OPQ prefixes) as (A, b) for torch searches, and the index behind them
        self._transforms, self._searched_index = fi.linear_transforms(index)
        self._device_transforms = {}  # device -> [(A (d_out, d_in), b (d_out,) or None)] tensors

    @classmethod
    def load(cls, path, expect_dim: Optional[int] = None, expect_dictionary=None,
             expect_model: Optional[ModelRef] = None, expect_key_type: Optional[str] = None,
             expect_metric: Optional[str] = None, nprobe: Optional[int] = None, rescore: bool = False,
             use_gpu: bool = False, gpu_device: int = 0, check_values: bool = True) -> "Datastore":
        """Open ``path``, refusing incomplete, truncated or mismatched datastores.

        expect_dictionary: a fairseq Dictionary, a dict.txt path or a sha256.
        expect_model: a checkpoint path, a sha256, a state dict or a model (same dtype as saved).
        nprobe: lists probed per query (default: the value stored at build time).
        rescore: re-rank the index's (PQ-approximate) hits with the stored keys.
        """
        path = Path(path)
        meta = read_metadata(path)
        check_expectations(meta, path, expect_dim, expect_dictionary, expect_model, expect_key_type, expect_metric)
        keys, values, index = open_entries(path, meta, check_values)
        if use_gpu:
            index = fi.GpuPlacement(gpu_device).to_gpu(index)
        store = cls(path, meta, keys, values, index, rescore)
        store.on_gpu = bool(use_gpu)
        store.set_nprobe(nprobe if nprobe is not None else meta["index"].get("nprobe"))
        return store

    def set_nprobe(self, nprobe: Optional[int]) -> None:
        fi.set_nprobe(self.index, nprobe)

    def check(self, dim: Optional[int] = None, dictionary=None, model: Optional[ModelRef] = None,
              key_type: Optional[str] = None, metric: Optional[str] = None) -> None:
        """Refuse (DatastoreError) queries that do not fit this datastore; same checks as :meth:`load`."""
        check_expectations(self.meta, self.path, dim, dictionary, model, key_type, metric)

    def search(self, queries, k: int, rescore: Optional[bool] = None,
               exclude: Optional[Exclusion] = None) -> MemoryBatch:
        """Top-k entries of each query: MemoryBatch(scores (Q, k) float32, values (Q, k) long, mask (Q, k) bool).

        ``queries`` (Q, d), numpy or torch (results follow a tensor's device). Scores
        are ``q·k`` (ip) or ``-|q - k|^2`` (l2), best first; missing hits (fewer than k
        found) have mask False, score -inf and value 0. ``exclude``: entries each query
        must not retrieve (see :class:`Exclusion`).
        """
        device = queries.device if isinstance(queries, torch.Tensor) else torch.device("cpu")
        if self.on_gpu and isinstance(queries, torch.Tensor) and queries.is_cuda and exclude is None and not (
                self.rescore if rescore is None else rescore):
            return self.search_torch(queries, k)
        scores, ids = self.search_ids(queries, k, rescore, exclude)
        valid = ids >= 0
        values = np.where(valid, self.values[np.where(valid, ids, 0)], 0)
        return MemoryBatch(
            torch.from_numpy(scores).to(device),
            torch.from_numpy(values.astype(np.int64)).to(device),
            torch.from_numpy(valid).to(device),
        )

    def search_torch(self, queries: torch.Tensor, k: int) -> MemoryBatch:
        """:meth:`search` without leaving torch (``faiss.contrib.torch_utils``): a GPU index answers
        CUDA queries on the GPU, values are gathered from a copy on the queries' device -- no numpy
        round trip per decoding step. (Re-scoring reads the key memmap, so it takes :meth:`search`.)"""
        import faiss.contrib.torch_utils  # noqa: F401  (lets faiss indexes take torch tensors)

        if queries.dim() != 2 or queries.size(1) != self.dim:
            raise ValueError(f"queries must be (Q, {self.dim}), got {tuple(queries.shape)}")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        x = queries.detach().float()  # (Q, d)
        for a, b in self._torch_transforms(queries.device):  # the index's key transforms, on the same device
            x = x @ a.T if b is None else torch.addmm(b, x, a.T)  # (Q, d_out)
        distances, ids = self._searched_index.search(x.contiguous(), k)  # (Q, k) on queries' device
        valid = ids >= 0
        scores = -distances if self.metric == "l2" else distances
        values = self._device_values.get(queries.device)
        if values is None:
            values = self._device_values[queries.device] = torch.from_numpy(np.asarray(self.values)).to(queries.device)
        hit_values = values[ids.clamp(min=0)].long().masked_fill(~valid, 0)
        return MemoryBatch(scores.float().masked_fill(~valid, float("-inf")), hit_values, valid)

    def _torch_transforms(self, device):
        if device not in self._device_transforms:
            self._device_transforms[device] = [
                (torch.from_numpy(a).to(device), None if b is None else torch.from_numpy(b).to(device))
                for a, b in self._transforms]
        return self._device_transforms[device]

    def search_ids(self, queries, k: int, rescore: Optional[bool] = None, exclude: Optional[Exclusion] = None):
        """Like :meth:`search`, with entry ids: scores (Q, k) float32 (-inf: none), ids (Q, k) int64 (-1: none).

        With ``exclude`` the index is asked for more than k entries (over-fetch), the
        excluded ones are dropped and the best k kept; a query left with fewer than k
        asks again for twice as many, until it has k or the index has no further
        candidates for it (all N entries, or every probed inverted list, returned):
        only then does it keep fewer than k (missing ones: id -1).
        """
        q = fi.as_float32(as_numpy(queries))
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise ValueError(f"queries must be (Q, {self.dim}), got {tuple(q.shape)}")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if exclude is None:
            return self._search(q, k, rescore)
        exclude.check(len(q), self.size)
        out_scores = np.full((len(q), k), -np.inf, dtype=np.float32)
        out_ids = np.full((len(q), k), -1, dtype=np.int64)
        rows = np.arange(len(q))
        fetch = min(self.size, k + exclude.max_hidden if exclude.max_hidden is not None else 4 * k)
        while rows.size:
            scores, ids = self._search(q[rows], fetch, rescore)  # (R, fetch) best first
            keep = (ids >= 0) & ~exclude.hidden(rows, ids)
            exhausted = (ids < 0).any(axis=1) | (fetch >= self.size)  # the index has nothing more to give
            done = (keep.sum(axis=1) >= k) | exhausted
            take = np.argsort(~keep, axis=1, kind="stable")[:, :k]  # kept entries first, in rank order
            kept = np.take_along_axis(keep, take, 1)[done]
            cols = take.shape[1]
            out_scores[rows[done], :cols] = np.where(kept, np.take_along_axis(scores, take, 1)[done], -np.inf)
            out_ids[rows[done], :cols] = np.where(kept, np.take_along_axis(ids, take, 1)[done], -1)
            rows = rows[~done]
            fetch = min(self.size, 2 * fetch)
        return out_scores, out_ids

    def _search(self, q: np.ndarray, k: int, rescore: Optional[bool]):
        distances, ids = self.index.search(q, k)  # (Q, k), (Q, k)
        if self.rescore if rescore is None else rescore:
            scores = self.exact_scores(q, ids)
            order = np.argsort(-scores, axis=1, kind="stable")
            scores, ids = np.take_along_axis(scores, order, 1), np.take_along_axis(ids, order, 1)
        else:
            scores = -distances if self.metric == "l2" else distances
        return np.where(ids >= 0, scores, -np.inf).astype(np.float32), ids.astype(np.int64)

    def exact_scores(self, queries: np.ndarray, ids: np.ndarray) -> np.ndarray:
        """Scores of (Q, d) queries against the stored keys ``ids`` (Q, k): (Q, k) float32, -inf for id -1."""
        q_count, k = ids.shape
        out = np.full((q_count, k), -np.inf, dtype=np.float32)
        rows = max(1, (1 << 24) // max(k * self.dim, 1))  # queries per chunk of gathered keys
        for s in range(0, q_count, rows):
            block = ids[s:s + rows]
            valid = block >= 0
            keys = self.keys[np.where(valid, block, 0)].astype(np.float32)  # (q, k, d)
            qb = queries[s:s + rows, None, :]  # (q, 1, d)
            if self.metric == "ip":
                sc = np.einsum("qkd,qkd->qk", keys, np.broadcast_to(qb, keys.shape))
            else:
                sc = -np.square(keys - qb).sum(-1)
            out[s:s + rows] = np.where(valid, sc, -np.inf)
        return out


def target_ranks(values: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Rank of the first hit whose value (next token) is the position's target: (Q,) int64, k where none of
    the (Q, k) ``values`` is (a missing hit's value, -1, never is). Top-K retrieval accuracy is
    ``(ranks < K).mean()`` for every K <= k (TRIME Table 9)."""
    values, targets = np.asarray(values), np.asarray(targets)
    if values.ndim != 2 or targets.shape != (len(values),):
        raise ValueError(f"values must be (Q, k) and targets (Q,), got {values.shape} and {targets.shape}")
    match = values == targets[:, None]  # (Q, k)
    return np.where(match.any(axis=1), match.argmax(axis=1), values.shape[1]).astype(np.int64)
