"""The owner of a recurrent decoder's memory across forward calls.

A memory state is a dict of batch-first tensors (B, …): whatever the model needs
from the previous segment (Transformer-XL: the layer inputs of the last mem_len
positions; LaMemo: embeddings, attention contexts and log-denominators), plus
``valid`` (B, M) bool and ``doc`` (B, M) long. The same dict is used for
fairseq's incremental decoding (stored in ``incremental_state``), so beam
reordering is one ``index_select`` per tensor.

:class:`RecurrentMemory` keeps the state between batches of a stream (``--batching
stream``) and decides, deterministically, when it is dropped:

* ``reset()`` -- explicit (the task calls it at every new epoch and validation pass);
* switching between training and evaluation mode;
* a different batch size (rows no longer continue the same streams);
* disabled (the default): every forward starts with an empty memory, which is
  the right thing for shuffled batches.

Document boundaries are not a reset: they are attention masks built from ``doc``
(see the ``doc_separator`` model option).
"""

import logging
from typing import Dict, Optional

import torch
from torch import Tensor

logger = logging.getLogger(__name__)

MemoryState = Dict[str, Tensor]


def reorder_state(state: Optional[MemoryState], new_order: Tensor) -> Optional[MemoryState]:
    """Select / permute batch rows of every tensor of a state."""
    if state is None:
        return None
    return {name: value.index_select(0, new_order) for name, value in state.items()}


def detach_state(state: MemoryState) -> MemoryState:
    return {name: value.detach() for name, value in state.items()}


class RecurrentMemory:
    """Memory carried from one batch of a stream to the next (one per decoder)."""

    def __init__(self):
        self.enabled = False
        self._state: Optional[MemoryState] = None
        self._training: Optional[bool] = None
        self._batch_size: Optional[int] = None
        self.resets = 0  # number of times a non-empty memory was dropped (diagnostics, tests)

    def enable(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.reset()

    def reset(self) -> None:
        if self._state is not None:
            self.resets += 1
        self._state = None
        self._training = None
        self._batch_size = None

    @property
    def state(self) -> Optional[MemoryState]:
        return self._state

    def read(self, batch_size: int, training: bool) -> Optional[MemoryState]:
        """The memory for a batch of ``batch_size`` rows, or None (empty memory)."""
        if not self.enabled:
            return None
        if self._state is not None and (training != self._training or batch_size != self._batch_size):
            why = "train/eval switch" if training != self._training else "batch size change"
            logger.debug("recurrent memory reset (%s)", why)
            self.reset()
        return self._state

    def write(self, state: Optional[MemoryState], batch_size: int, training: bool) -> None:
        if not self.enabled:
            return
        self._state = None if state is None else detach_state(state)
        self._training, self._batch_size = training, batch_size

    def reorder(self, new_order: Tensor) -> None:
        self._state = reorder_state(self._state, new_order)
        if self._state is not None:
            self._batch_size = int(new_order.numel())


def empty_state_like(reference: Tensor) -> MemoryState:
    """An empty memory (M = 0) for a batch shaped like ``reference`` (B, T, …)."""
    bsz = reference.size(0)
    return {
        "valid": torch.zeros(bsz, 0, dtype=torch.bool, device=reference.device),
        "doc": torch.zeros(bsz, 0, dtype=torch.long, device=reference.device),
    }
