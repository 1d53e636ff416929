"""External memory at evaluation time: the K nearest datastore entries of each scored position.

:class:`ExternalMemory` is the evaluation's handle on a datastore
(:mod:`trime_fairseq.memory.datastore`). It opens the datastore when the task
builds the model (missing files, another dictionary: an error before any
forward pass), records the checksum of the checkpoint state fairseq loads into
the model, and on the first search refuses a datastore whose keys come from
another model or have another dimension.

:meth:`ExternalMemory.search` answers with raw scores (``q·k`` for ``ip``,
``-|q - k|²`` for ``l2``) in a :class:`~trime_fairseq.memory.sources.MemoryBatch`
(Q, K); :class:`~trime_fairseq.memory.eval_memory.EvalMemory` scales them
(1/T for kNN-LM, 1/(√d·τ) for TRIMELM_ext) and mixes them with
:mod:`trime_fairseq.memory.mixing`, like every other memory.

With a skip predictor (:mod:`trime_fairseq.memory.skip`, ``--knn-skip-predictor``) every search
takes the positions' features too and searches only the positions the predictor sends; the
others get no hits (mask False). ``searched`` / ``skipped`` count the positions of each kind.
"""

import copy
import types
from typing import Optional

import torch
from torch import Tensor

from trime_fairseq.checksums import loaded_model_checksum
from trime_fairseq.memory.datastore import Datastore, DatastoreError
from trime_fairseq.memory.skip import SkipPredictor
from trime_fairseq.memory.sources import MemoryBatch


class ExternalMemory:
    """A datastore searched by the queries of one evaluation."""

    def __init__(self, path: str, k: int, nprobe: Optional[int] = None, rescore: bool = False,
                 use_gpu: bool = False, dictionary=None, skip: Optional[SkipPredictor] = None,
                 skip_threshold: Optional[float] = None):
        """``skip``: a predictor of whether retrieval helps (checked against ``dictionary`` now, the model
        on the first search); positions below ``skip_threshold`` (default: the predictor's) are not searched."""
        if k < 1:
            raise ValueError(f"--knn-k must be >= 1, got {k}")
        self.store = Datastore.load(path, expect_dictionary=dictionary, nprobe=nprobe, rescore=rescore,
                                    use_gpu=use_gpu)
        self.k = self._fitting(k)
        self.model = None  # the model whose keys query the datastore (see bind)
        self.model_sha256: Optional[str] = None  # of the checkpoint state loaded into it
        self._checked = False
        self.skip = skip
        if skip is not None:
            skip.check(dictionary=dictionary)
        self.skip_threshold = skip_threshold if skip_threshold is not None or skip is None else skip.threshold
        self.searched = self.skipped = 0  # positions searched / skipped by the predictor

    def _fitting(self, k: int) -> int:
        """``k`` if the datastore holds that many entries (k >= 1 is checked before it is opened)."""
        if k > self.store.size:
            raise DatastoreError(f"--knn-k {k} asks for more neighbours than the datastore holds "
                                 f"({self.store.size} entries)")
        return k

    def with_k(self, k: int) -> "ExternalMemory":
        """This datastore, bound to the same (already loaded) model, searched for ``k`` entries per
        query (a tuner's grid over K, whose values MemoryOptions has checked to be >= 1)."""
        other = copy.copy(self)
        other.k = self._fitting(k)
        return other

    @property
    def key_type(self) -> str:
        """Which representation the datastore's keys are: trime_key (g) or trime_feature (f)."""
        return self.store.meta["key_type"]

    @property
    def metric(self) -> str:
        return self.store.metric

    @property
    def dim(self) -> int:
        return self.store.dim

    def bind(self, model) -> None:
        """Check searches against ``model``: remember :func:`loaded_model_checksum` right after
        fairseq loads a checkpoint into it (``fairseq-eval-lm`` loads it after the task builds the
        model, and may convert it to fp16 later) -- the moment the datastore builder hashes it too;
        without a load, the model's own state dict is checked."""
        self.model = model
        load = model.load_state_dict

        def load_state_dict(module, state_dict, *args, **kwargs):
            result = load(state_dict, *args, **kwargs)
            self.model_sha256 = loaded_model_checksum(module)
            self._checked = False
            return result

        model.load_state_dict = types.MethodType(load_state_dict, model)

    def check(self, queries: Tensor) -> None:
        """Once per loaded model: the datastore fits these queries and this model."""
        if self._checked:
            return
        self.store.check(dim=queries.size(-1), model=self.model_sha256 or self.model)
        if self.skip is not None:
            self.skip.check(model=self.model_sha256 or self.model)
        self._checked = True

    @property
    def skips(self) -> bool:
        """Whether searches need the positions' skip features (:func:`~trime_fairseq.memory.skip.skip_features`)."""
        return self.skip is not None

    def search(self, queries: Tensor, features: Optional[Tensor] = None) -> MemoryBatch:
        """The K nearest entries of each query (Q, d): raw scores (Q, K) float32, values, mask. With a skip
        predictor, ``features`` (Q, 3) are required and the positions it skips have no hits."""
        self.check(queries)
        if queries.numel() == 0:
            empty = torch.empty(0, self.k, device=queries.device)
            return MemoryBatch(empty, empty.long(), empty.bool())
        if self.skip is None:
            if features is not None:
                raise ValueError("skip features given to a search without a skip predictor")
            return self.store.search(queries.detach(), self.k)
        if features is None or features.shape[0] != queries.shape[0]:
            raise ValueError("a search with a skip predictor needs the features (Q, 3) of its Q positions")
        search = self.skip.retrieve(features, self.skip_threshold)  # (Q,) bool
        rows = search.nonzero().squeeze(1)  # (q,)
        self.searched += rows.numel()
        self.skipped += queries.shape[0] - rows.numel()
        scores = torch.full((queries.shape[0], self.k), float("-inf"), device=queries.device)  # (Q, K)
        out = MemoryBatch(scores, scores.new_zeros(scores.shape, dtype=torch.long), scores.isfinite())
        if rows.numel():
            found = self.store.search(queries.detach()[rows], self.k)  # (q, K)
            out.scores[rows], out.values[rows], out.mask[rows] = found.scores, found.values, found.mask
        return out
