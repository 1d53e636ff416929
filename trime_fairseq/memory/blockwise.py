"""Target-only memory summaries: in-batch memory in query blocks; memory parts.

A long stream (TRIMELM_long on WikiText-103 with L=150, m=240: S = 36,000
positions per run) makes the dense (S × S) scores of
:func:`~trime_fairseq.memory.sources.causal_memory` too large. Target-only
scoring (the training loss, Eq. 5) needs, per query, only two sums over its
visible entries:

    match = log Σ_{j visible, value_j = target} exp(score_j)
    other = log Σ_{j visible, value_j != target} exp(score_j)

:func:`blockwise_target_memory` computes them block by block of queries for any
visibility rule (a function of the block) and returns them as a two-entry
:class:`MemoryBatch` -- entry 0 holds the target's sum (value = target), entry 1
the rest (value = -1, never a target) -- so that
:func:`~trime_fairseq.memory.mixing.joint_target_log_prob` gives exactly what it
gives on the dense memory. While gradients are recorded each block is
checkpointed (scores and mask recomputed in the backward pass), so peak memory
is one block's (..., block, M) scores, forward and backward. It answers
target-only questions only: the full-vocabulary functions need the dense memory.
:func:`causal_target_memory` is the rule of
:func:`~trime_fairseq.memory.sources.causal_memory` (block [a, b) reads keys
[0, b) only); :mod:`trime_fairseq.memory.gathered` gives its entry-table rule
(memory across workers, TRIMELM_ext).

:func:`target_summary` gives the same two-entry summary of several memory
batches of the same queries (in-row memory, ring buffer, earlier rows) without
concatenating them (no (Q, ΣM) copies of scores and values): evaluation at the
target only (tuning, sweeps).
"""

from typing import Callable, Iterable, Optional

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from trime_fairseq.memory.mixing import masked_logsumexp
from trime_fairseq.memory.sources import MemoryBatch, scaled_dot


def _block_sums(queries: Tensor, keys: Tensor, values: Tensor, visible: Tensor, target: Tensor, scale: float):
    """Queries (..., q, d) against keys (..., m, d) with values (..., m) and visibility (..., q, m):
    (match, other) log-sums, each (..., q)."""
    scores = scaled_dot(queries, keys, scale)  # (..., q, m)
    match = visible & (values.unsqueeze(-2) == target.unsqueeze(-1))
    return masked_logsumexp(scores, match), masked_logsumexp(scores, visible & ~match)


def summary_batch(match: Tensor, other: Tensor, target: Tensor) -> MemoryBatch:
    """Two-entry memory (..., Q, 2) from the log-sums over matching / other entries."""
    scores = torch.stack([match, other], -1)
    mask = ~scores.isneginf()
    values = torch.stack([target, torch.full_like(target, -1)], -1)
    return MemoryBatch(scores.masked_fill(~mask, 0.0), values, mask)


def target_sums(parts: Iterable[MemoryBatch], target: Tensor, scale: float = 1.0):
    """(match, other) log-sums (Q,) over the union of flattened memory batches (Q, M_i) of
    the same queries, their scores multiplied by ``scale``; target (Q,)."""
    match = other = None
    for part in parts:
        hit = part.mask & (part.values == target.unsqueeze(-1))  # values may be (1, M): broadcast
        scores = part.scores * scale if scale != 1.0 else part.scores
        m, o = masked_logsumexp(scores, hit), masked_logsumexp(scores, part.mask & ~hit)
        match = m if match is None else torch.logaddexp(match, m)
        other = o if other is None else torch.logaddexp(other, o)
    if match is None:
        empty = torch.full(target.shape, float("-inf"), device=target.device)
        return empty, empty.clone()
    return match, other


def target_summary(parts: Iterable[MemoryBatch], target: Tensor) -> MemoryBatch:
    """The two-entry summary of the union of flattened memory batches (Q, M_i) of the
    same queries, target (Q,): what concatenating them would give at the target."""
    return summary_batch(*target_sums(parts, target), target)


def blockwise_target_memory(
    queries: Tensor,
    keys: Tensor,
    values: Tensor,
    target: Tensor,
    scale: float,
    block_size: int,
    visible_block: Callable[[int, int], Tensor],
    keys_for_block: Optional[Callable[[int], int]] = None,
) -> MemoryBatch:
    """The target-only summary of the dense memory (scores ``scale·q·k``, mask from ``visible_block``).

    Args:
        queries: (..., Q, d); keys: (..., M, d); values: (..., M) next token of every entry;
        target: (..., Q) the target of every query; block_size: queries per block.
        visible_block: ``(a, b) -> (..., b - a, m)`` bool, which of the first m keys the queries
            a..b see (called inside the checkpoint: recomputed in the backward pass, never stored).
        keys_for_block: ``b -> m``, how many leading keys block [a, b) may see (default all M).
    Returns:
        MemoryBatch with scores/values/mask (..., Q, 2).
    """
    if block_size < 1:
        raise ValueError(f"memory block size must be >= 1, got {block_size}")
    q_count, m_all = queries.size(-2), keys.size(-2)
    grad = torch.is_grad_enabled() and (queries.requires_grad or keys.requires_grad)
    matches, others = [], []
    for a in range(0, q_count, block_size):
        b = min(a + block_size, q_count)
        m = m_all if keys_for_block is None else keys_for_block(b)

        def block(q: Tensor, k: Tensor, a=a, b=b, m=m):
            return _block_sums(q, k, values[..., :m], visible_block(a, b), target[..., a:b], scale)

        q_block, k_block = queries[..., a:b, :], keys[..., :m, :]
        match, other = checkpoint(block, q_block, k_block, use_reentrant=False) if grad else block(q_block, k_block)
        matches.append(match)
        others.append(other)
    return summary_batch(torch.cat(matches, -1), torch.cat(others, -1), target)  # (..., Q, 2)


def causal_target_memory(
    queries: Tensor, keys: Tensor, values: Tensor, valid: Tensor, target: Tensor, scale: float, block_size: int
) -> MemoryBatch:
    """The target-only summary of ``causal_memory(queries, keys, values, valid, scale)``.

    Args:
        queries, keys: (R, S, d); values, valid: (R, S) as for causal_memory;
        target: (R, S) the target of every query; block_size: queries per block.
    Returns:
        MemoryBatch with scores/values/mask (R, S, 2).
    """

    def visible(a: int, b: int) -> Tensor:  # stream position i sees j < i; block [a, b) reads keys [0, b)
        i = torch.arange(a, b, device=queries.device).view(-1, 1)
        j = torch.arange(b, device=queries.device).view(1, -1)
        return (j < i).unsqueeze(0) & valid[:, :b].unsqueeze(1)  # (R, b - a, b)

    return blockwise_target_memory(queries, keys, values, target, scale, block_size, visible, keys_for_block=lambda b: b)
