"""Target-only memory summaries: causal in-batch memory in query blocks; memory parts.

A long stream (TRIMELM_long on WikiText-103 with L=150, m=240: S = 36,000
positions per run) makes the dense (S × S) scores of
:func:`~trime_fairseq.memory.sources.causal_memory` too large. Target-only
scoring (the training loss, Eq. 5) needs, per query, only two sums over its
visible entries:

    match = log Σ_{j visible, value_j = target} exp(score_j)
    other = log Σ_{j visible, value_j != target} exp(score_j)

:func:`causal_target_memory` computes them block by block of queries (block
[a, b) needs keys [0, b) only) and returns them as a two-entry
:class:`MemoryBatch` -- entry 0 holds the target's sum (value = target), entry 1
the rest (value = -1, never a target) -- so that
:func:`~trime_fairseq.memory.mixing.joint_target_log_prob` gives exactly what it
gives on the dense memory. While gradients are recorded each block is
checkpointed (recomputed in the backward pass), so peak memory is one block's
(R, block, S) scores, forward and backward. It answers target-only questions
only: the full-vocabulary functions need the dense memory.

:func:`target_summary` gives the same two-entry summary of several memory
batches of the same queries (in-row memory, ring buffer, earlier rows) without
concatenating them (no (Q, ΣM) copies of scores and values): evaluation at the
target only (tuning, sweeps).
"""

import torch
from typing import Iterable

from torch import Tensor
from torch.utils.checkpoint import checkpoint

from trime_fairseq.memory.mixing import masked_logsumexp
from trime_fairseq.memory.sources import MemoryBatch, scaled_dot


def _block_sums(queries: Tensor, keys: Tensor, values: Tensor, valid: Tensor, target: Tensor,
                offset: Tensor, scale: float):
    """Queries (R, q, d) at stream positions offset..offset+q against keys (R, b, d):
    (match, other) log-sums, each (R, q)."""
    q, b = queries.size(1), keys.size(1)
    scores = scaled_dot(queries, keys, scale)  # (R, q, b)
    i = offset + torch.arange(q, device=queries.device).view(q, 1)
    j = torch.arange(b, device=queries.device).view(1, b)
    visible = (j < i).unsqueeze(0) & valid.unsqueeze(1)  # (R, q, b)
    match = visible & (values.unsqueeze(1) == target.unsqueeze(-1))
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
    if block_size < 1:
        raise ValueError(f"memory block size must be >= 1, got {block_size}")
    s = queries.size(1)
    matches, others = [], []
    for a in range(0, s, block_size):
        b = min(a + block_size, s)
        args = (queries[:, a:b], keys[:, :b], values[:, :b], valid[:, :b], target[:, a:b],
                torch.tensor(a, device=queries.device), scale)
        if torch.is_grad_enabled() and (queries.requires_grad or keys.requires_grad):
            match, other = checkpoint(_block_sums, *args, use_reentrant=False)
        else:
            match, other = _block_sums(*args)
        matches.append(match)
        others.append(other)
    return summary_batch(torch.cat(matches, 1), torch.cat(others, 1), target)  # (R, S, 2)
