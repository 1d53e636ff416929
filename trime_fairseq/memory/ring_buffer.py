"""A fixed-size FIFO of (key, value) memory entries tagged with stream positions.

The evaluation stream memory (TRIME's long-term memory, the continuous cache
extended to the long-term memory) keeps the most recent ``capacity`` entries of
the stream: preallocated keys (N, d), values (N,) and the stream position of
every slot (N,), written in place (no growth, no N×N work). :meth:`search`
scores queries against all slots and shows each query the slots whose stream
positions lie in its own window [lo, hi).
"""

from typing import Optional

import torch
from torch import Tensor

from trime_fairseq.memory.mixing import fp32
from trime_fairseq.memory.sources import MemoryBatch, scaled_dot


class RingBuffer:
    """The last ``capacity`` appended entries. Storage is allocated on the first
    :meth:`append` (the key dimension, dtype and device are those of the keys)."""

    def __init__(self, capacity: int):
        if capacity < 1:
            raise ValueError(f"ring buffer capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self.keys: Optional[Tensor] = None  # (N, d)
        self.values: Optional[Tensor] = None  # (N,) long
        self.positions: Optional[Tensor] = None  # (N,) long, -1 = empty slot
        self._next = 0  # slot written next
        self.size = 0  # filled slots

    def reset(self) -> None:
        """Forget every entry (storage is kept)."""
        self._next = 0
        self.size = 0
        if self.positions is not None:
            self.positions.fill_(-1)

    def _allocate(self, keys: Tensor) -> None:
        n, d = self.capacity, keys.size(-1)
        try:
            self.keys = keys.new_zeros(n, d)
        except (RuntimeError, MemoryError) as e:
            gib = n * d * keys.element_size() / 2**30
            raise MemoryError(f"a long-term memory of {n} entries of dimension {d} needs {gib:.1f} GiB of keys, "
                              f"which could not be allocated; use a smaller --long-memory-size") from e
        self.values = torch.zeros(n, dtype=torch.long, device=keys.device)
        self.positions = torch.full((n,), -1, dtype=torch.long, device=keys.device)

    def append(self, keys: Tensor, values: Tensor, positions: Tensor) -> None:
        """Add entries in stream order: keys (n, d), values (n,), positions (n,)."""
        if keys.dim() != 2 or values.shape != keys.shape[:1] or positions.shape != keys.shape[:1]:
            raise ValueError(
                f"append expects keys (n, d), values (n,), positions (n,); got {tuple(keys.shape)}, "
                f"{tuple(values.shape)}, {tuple(positions.shape)}"
            )
        if keys.size(0) == 0:
            return
        if self.keys is None:
            self._allocate(keys)
        elif keys.size(-1) != self.keys.size(-1):
            raise ValueError(f"memory keys have dimension {keys.size(-1)}, the buffer holds {self.keys.size(-1)}")
        keys, values, positions = keys[-self.capacity :], values[-self.capacity :], positions[-self.capacity :]
        slots = (self._next + torch.arange(keys.size(0), device=self.keys.device)) % self.capacity
        self.keys[slots] = keys.detach().to(self.keys.dtype)
        self.values[slots] = values.to(self.values.device)
        self.positions[slots] = positions.to(self.positions.device)
        self._next = int((self._next + keys.size(0)) % self.capacity)
        self.size = min(self.capacity, self.size + keys.size(0))

    def search(self, queries: Tensor, scale: float, lo: Tensor, hi: Tensor) -> MemoryBatch:
        """All slots for queries (Q, d): scores/mask (Q, N), values (1, N).

        Query q sees the slots with stream position in [lo[q], hi[q]); an empty
        buffer answers with M = 0 entries.
        """
        scores = self.scores(queries, scale)  # (Q, N)
        return MemoryBatch(scores, self.slot_values(queries.device), self.window(lo, hi))

    def scores(self, queries: Tensor, scale: float = 1.0) -> Tensor:
        """(Q, N) float32 ``scale``·q·k against every slot ((Q, 0) while empty)."""
        if self.keys is None:
            return fp32(queries).new_zeros(queries.size(0), 0)
        return scaled_dot(queries, self.keys, scale)

    def slot_values(self, device=None) -> Tensor:
        """(1, N) next-token value of every slot."""
        if self.values is None:
            return torch.zeros(1, 0, dtype=torch.long, device=device)
        return self.values.unsqueeze(0)

    def window(self, lo: Tensor, hi: Tensor) -> Tensor:
        """(Q, N) bool: filled slots whose stream position lies in [lo[q], hi[q])."""
        if self.positions is None:
            return torch.zeros(lo.size(0), 0, dtype=torch.bool, device=lo.device)
        pos = self.positions.unsqueeze(0)  # (1, N)
        return (pos >= 0) & (pos >= lo.unsqueeze(1)) & (pos < hi.unsqueeze(1))
