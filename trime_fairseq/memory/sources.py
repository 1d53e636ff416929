"""Where memory entries come from: (key, value) pairs searched by a query.

Every source answers with a :class:`MemoryBatch` -- scores, values and a bool
visibility mask, all broadcastable to (..., Q, M) -- which
:mod:`trime_fairseq.memory.mixing` turns into probabilities.

* :func:`causal_memory` -- in-batch / in-window memory: each position of a
  stream sees the earlier positions of the same stream. With streams = segments
  it is TRIME's local memory; with streams = runs of consecutive segments it is
  local + long-term memory; with queries = f and a window it is the
  continuous cache.
"""

import math
from typing import Iterable, NamedTuple, Optional

import torch
from torch import Tensor

from trime_fairseq.memory.mixing import fp32


class MemoryBatch(NamedTuple):
    scores: Tensor  # (..., Q, M) float32, similarity already scaled / tempered
    values: Tensor  # (..., Q or 1, M) long, next-token id of each entry; attention memories
    #                 (LongMem's bank, memory/bank.py): (..., Q, M, D) value vectors
    mask: Tensor  # (..., Q, M) bool, entry visible to the query

    def rows(self, index: Tensor) -> "MemoryBatch":
        """Select query rows of a flattened (Q, M) batch."""
        values = self.values.expand_as(self.mask)
        return MemoryBatch(self.scores[index], values[index], self.mask[index])

    def span(self, start: int, stop: int) -> "MemoryBatch":
        """Query rows start..stop of a flattened (Q, M) batch, as views."""
        values = self.values if self.values.size(0) == 1 else self.values[start:stop]
        return MemoryBatch(self.scores[start:stop], values, self.mask[start:stop])

    def first(self, k: int) -> "MemoryBatch":
        """The first ``k`` entries of every query (a search's best-first hits), as views."""
        if k >= self.mask.size(-1):
            return self
        values = self.values[..., :k] if self.values.size(-1) == self.mask.size(-1) else self.values
        return MemoryBatch(self.scores[..., :k], values, self.mask[..., :k])

    def scaled(self, factor: float) -> "MemoryBatch":
        """The same entries with scores multiplied by ``factor`` (another temperature)."""
        return MemoryBatch(self.scores * factor, self.values, self.mask)

    def flatten(self) -> "MemoryBatch":
        """(..., Q, M) -> (prod(...)*Q, M)."""
        m = self.mask.size(-1)
        values = self.values.expand_as(self.mask)
        return MemoryBatch(self.scores.reshape(-1, m), values.reshape(-1, m), self.mask.reshape(-1, m))


def concat_memory(parts: Iterable[MemoryBatch]) -> MemoryBatch:
    """Concatenate flattened memory batches (Q, M_i) of the same queries along the entries: (Q, ΣM_i)."""
    parts = list(parts)
    if len(parts) == 1:
        return parts[0]
    return MemoryBatch(
        torch.cat([p.scores for p in parts], -1),
        torch.cat([p.values.expand_as(p.mask) for p in parts], -1),
        torch.cat([p.mask for p in parts], -1),
    )


def top_entries(memory: MemoryBatch, k: int) -> MemoryBatch:
    """The ``k`` highest-scoring visible entries of every query of a dense (..., Q, M) batch.

    Returns a (..., Q, min(k, M)) batch (values gathered per query); a query with fewer than
    ``k`` visible entries keeps them all and the rest of its slots stay invisible. Scores are
    gathered, so gradients reach exactly the kept entries (TRIME-MT's released training memory:
    the top-K of the in-batch entries, ``--train-memory-topk``).
    """
    if k < 1:
        raise ValueError(f"top-k memory needs k >= 1, got {k}")
    m = memory.mask.size(-1)
    if k >= m:
        return memory
    ranked = memory.scores.detach().masked_fill(~memory.mask, float("-inf"))  # (..., Q, M)
    index = ranked.topk(k, dim=-1).indices  # (..., Q, k)
    values = memory.values.expand_as(memory.mask)
    return MemoryBatch(memory.scores.gather(-1, index), values.gather(-1, index), memory.mask.gather(-1, index))


def scaled_dot(queries: Tensor, keys: Tensor, scale: float) -> Tensor:
    """(..., Q, d) x (..., M, d) -> (..., Q, M) float32 scores ``scale * q·k``."""
    if queries.size(-1) != keys.size(-1):
        raise ValueError(
            f"memory keys have dimension {keys.size(-1)} but queries have {queries.size(-1)}"
        )
    return torch.einsum("...qd,...md->...qm", fp32(queries), fp32(keys)) * scale


def dot_scale(dim: int, temperature: float = 1.0) -> float:
    """TRIME's sim(q, k) = q·k / √d, divided by the temperature τ (Eq. 6)."""
    if temperature <= 0:
        raise ValueError(f"memory temperature must be > 0, got {temperature}")
    return 1.0 / (math.sqrt(dim) * temperature)


def causal_memory(
    queries: Tensor,
    keys: Tensor,
    values: Tensor,
    valid: Tensor,
    scale: float,
    window: Optional[int] = None,
) -> MemoryBatch:
    """Each stream position i sees entries j < i of its own stream (j >= i - window).

    Args:
        queries: (R, S, d) query vectors of R streams of length S.
        keys: (R, S, d) key vectors of the same positions.
        values: (R, S) next token of every position (the memory value).
        valid: (R, S) bool, position may serve as a memory entry (real value).
        scale: multiplier of the dot product.
        window: keep only the ``window`` most recent entries (None: all).
    Returns:
        MemoryBatch with scores/mask (R, S, S) and values (R, 1, S).
    """
    s = queries.size(1)
    scores = scaled_dot(queries, keys, scale)  # (R, S, S)
    pos = torch.arange(s, device=queries.device)
    offset = pos.view(s, 1) - pos.view(1, s)  # i - j
    visible = offset > 0
    if window is not None:
        visible = visible & (offset <= window)
    mask = visible.unsqueeze(0) & valid.unsqueeze(1)  # (R, S, S)
    return MemoryBatch(scores, values.unsqueeze(1), mask)
