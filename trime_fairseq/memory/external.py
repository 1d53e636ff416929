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
"""

import copy
import types
from typing import Optional

import torch
from torch import Tensor

from trime_fairseq.checksums import loaded_model_checksum
from trime_fairseq.memory.datastore import Datastore, DatastoreError
from trime_fairseq.memory.sources import MemoryBatch


class ExternalMemory:
    """A datastore searched by the queries of one evaluation."""

    def __init__(self, path: str, k: int, nprobe: Optional[int] = None, rescore: bool = False,
                 use_gpu: bool = False, dictionary=None):
        if k < 1:
            raise ValueError(f"--knn-k must be >= 1, got {k}")
        self.store = Datastore.load(path, expect_dictionary=dictionary, nprobe=nprobe, rescore=rescore,
                                    use_gpu=use_gpu)
        self.k = self._fitting(k)
        self.model = None  # the model whose keys query the datastore (see bind)
        self.model_sha256: Optional[str] = None  # of the checkpoint state loaded into it
        self._checked = False

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
        self._checked = True

    def search(self, queries: Tensor) -> MemoryBatch:
        """The K nearest entries of each query (Q, d): raw scores (Q, K) float32, values, mask."""
        self.check(queries)
        if queries.numel() == 0:
            empty = torch.empty(0, self.k, device=queries.device)
            return MemoryBatch(empty, empty.long(), empty.bool())
        return self.store.search(queries.detach(), self.k)
