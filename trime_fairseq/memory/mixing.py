"""How memory scores are turned into next-token probabilities.

Pure functions on tensors; every reduction runs in float32 log space.

Shapes: ``Q`` query positions, ``M`` memory entries per query, ``V`` vocabulary.
A memory batch for ``Q`` queries is three tensors of shape (Q, M):

* ``scores``  -- similarity of the query to each entry (already scaled / tempered),
* ``values``  -- the next-token id stored with each entry,
* ``mask``    -- bool, True where the entry is visible to that query.

Rows with no visible entry are legal everywhere: their memory terms are ``-inf``
and every function falls back to the token distribution, with finite gradients.
"""

import math
from typing import NamedTuple, Tuple, Union

import torch
from torch import Tensor

_FLOAT32_MIN = torch.finfo(torch.float32).min



class LogWeight(NamedTuple):
    """Per-row interpolation weights given by their logs, (log(1 − λ), log λ), each (Q,): exact at both ends
    where λ itself would round to 0 or 1 (a network's softmax over choices, adaptive kNN-MT), with finite
    gradients where a log is very negative."""

    keep: Tensor  # (Q,) log(1 − λ)
    lam: Tensor  # (Q,) log λ


#: an interpolation weight λ: one number for every row, a (Q,) tensor, one per query row
#: (adaptive modes: a distance rule or a network computes it from each row's memory), or its logs per row
Weight = Union[float, Tensor, LogWeight]


def fp32(x: Tensor) -> Tensor:
    """Promote half precision to float32 for reductions (float64 stays float64)."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def masked_logsumexp(scores: Tensor, mask: Tensor, dim: int = -1) -> Tensor:
    """log sum_{mask} exp(scores) along ``dim``; ``-inf`` where nothing is visible.

    Gradients are finite (zero) for rows where nothing is visible.
    """
    filled = fp32(scores).masked_fill(~mask, _FLOAT32_MIN)
    lse = torch.logsumexp(filled, dim=dim)
    return lse.masked_fill(~mask.any(dim=dim), float("-inf"))


def joint_target_log_prob(
    token_target: Tensor,
    token_lse: Tensor,
    scores: Tensor,
    values: Tensor,
    mask: Tensor,
    target: Tensor,
) -> Tensor:
    """Eq. 5 / Eq. 6 of TRIME, evaluated at the target only.

    P(w) ∝ exp(token score of w) + sum_{j visible, values_j = w} exp(scores_j)

    Args:
        token_target: (Q,) unnormalised log-score of the target token (E_w·f).
        token_lse: (Q,) log sum_w exp(token score of w).
        scores, values, mask: (Q, M) memory batch.
        target: (Q,) target ids.
    Returns:
        (Q,) float32 log P(target).
    """
    match = mask & (values == target.unsqueeze(-1))
    numerator = torch.logaddexp(fp32(token_target), masked_logsumexp(scores, match))
    normaliser = torch.logaddexp(fp32(token_lse), masked_logsumexp(scores, mask))
    return numerator - normaliser


def grouped_logsumexp(scores: Tensor, values: Tensor, mask: Tensor) -> Tensor:
    """(Q, M) -> (Q, M): for entry j, log sum exp(scores) over the visible entries
    of its row that share its value (``-inf`` if none is visible).

    Entries with equal values get identical results, so scattering them into a
    (Q, V) tensor is deterministic. Works in (Q, M) space (sort + segment sum):
    no (Q, V) buffer.
    """
    scores = fp32(scores).masked_fill(~mask, _FLOAT32_MIN)
    row_max = scores.max(dim=-1, keepdim=True).values.clamp(min=-1e30)  # (Q, 1)
    weights = (scores - row_max).exp() * mask  # (Q, M), exactly 0 where hidden
    sorted_values, order = values.sort(dim=-1)
    starts = torch.ones_like(sorted_values, dtype=torch.bool)
    starts[:, 1:] = sorted_values[:, 1:] != sorted_values[:, :-1]
    group = starts.long().cumsum(-1) - 1  # (Q, M) group id of each sorted entry
    totals = torch.zeros_like(weights).scatter_add_(1, group, weights.gather(1, order))
    per_entry = torch.empty_like(weights).scatter_(1, order, totals.gather(1, group))
    return per_entry.log() + row_max


def logaddexp_at(base: Tensor, values: Tensor, addend: Tensor) -> Tensor:
    """In place: base[q, values[q, j]] <- logaddexp(base[q, values[q, j]], addend[q, j]).

    ``base`` is (Q, V), ``values``/``addend`` (Q, M); ``addend`` must be equal for
    equal values of a row (see :func:`grouped_logsumexp`). Only the memory
    columns are touched. Returns ``base``.
    """
    index = values.long().clamp(min=0)
    return base.scatter_(1, index, torch.logaddexp(base.gather(1, index), addend))


def joint_log_probs(
    token_scores: Tensor, token_lse: Tensor, scores: Tensor, values: Tensor, mask: Tensor
) -> Tensor:
    """Eq. 6 over the whole vocabulary: (Q, V) float32 log-probabilities.

    ``token_lse`` is passed explicitly because ``token_scores`` may be exact only
    at the entries a caller needs (fairseq's adaptive softmax fills only the
    target's tail cluster when given a target).
    """
    return joint_log_probs_(fp32(token_scores) - fp32(token_lse).unsqueeze(-1), token_lse, scores, values, mask)


def joint_log_probs_(token_log_probs: Tensor, token_lse: Tensor, scores: Tensor, values: Tensor,
                     mask: Tensor) -> Tensor:
    """:func:`joint_log_probs` in place, from the token distribution: ``token_log_probs`` (Q, V)
    float32 (the tokens' own log-softmax, a view is fine) is overwritten with Eq. 6 and returned.

    Columns without memory only shift by log Z_tokens − log Z_joint; memory columns are
    recomputed: one pass over (Q, V), the rest in (Q, M).
    """
    normaliser = torch.logaddexp(fp32(token_lse), masked_logsumexp(scores, mask)).unsqueeze(-1)  # (Q, 1)
    by_value = grouped_logsumexp(scores, values, mask)
    token_log_probs.add_(fp32(token_lse).unsqueeze(-1) - normaliser)
    return logaddexp_at(token_log_probs, values, by_value - normaliser)


def interpolate_memory(log_p: Tensor, scores: Tensor, values: Tensor, mask: Tensor, lam: Weight) -> Tensor:
    """log((1 - λ) p + λ q) with q the memory distribution of (scores, values, mask): (Q, V).

    The memory-only form of :func:`interpolate` (continuous cache, kNN-LM):
    q is non-zero only at memory values, so only those columns are recomputed.
    Rows without a visible entry keep ``log_p``. ``lam``: a number or (Q,) per row.
    """
    return interpolate_memory_(fp32(log_p).clone(), scores, values, mask, lam)


def interpolate_memory_(log_p: Tensor, scores: Tensor, values: Tensor, mask: Tensor, lam: Weight) -> Tensor:
    """:func:`interpolate_memory` in place: ``log_p`` (Q, V) float32 (a view is fine) is overwritten."""
    log_keep, log_lam = _lambda_logs(lam, scores.size(0), log_p)  # numbers or (Q, 1)
    has_memory = mask.any(-1, keepdim=True)  # (Q, 1)
    log_q = grouped_logsumexp(scores, values, mask) - _memory_normaliser(scores, mask).unsqueeze(-1)
    log_p.add_(torch.where(has_memory, log_keep, 0.0))
    addend = torch.where(has_memory, log_q + log_lam, float("-inf"))
    return logaddexp_at(log_p, values, addend)


def memory_log_probs(scores: Tensor, values: Tensor, mask: Tensor, num_classes: int) -> Tensor:
    """Distribution over the memory alone (Eq. 7, kNN-LM, continuous cache): (Q, V).

    Rows with no visible entry are all ``-inf``; :func:`interpolate` handles them.
    """
    log_q = grouped_logsumexp(scores, values, mask) - _memory_normaliser(scores, mask).unsqueeze(-1)
    base = log_q.new_full((scores.size(0), num_classes), float("-inf"))
    return logaddexp_at(base, values, log_q)


def memory_target_log_prob(scores: Tensor, values: Tensor, mask: Tensor, target: Tensor) -> Tensor:
    """:func:`memory_log_probs` at the target only: (Q,)."""
    match = mask & (values == target.unsqueeze(-1))
    return masked_logsumexp(scores, match) - _memory_normaliser(scores, mask)


def interpolate(log_p: Tensor, log_q: Tensor, lam: Weight, has_memory: Tensor) -> Tensor:
    """log((1 - λ) p + λ q) in log space (Eq. 8, kNN-LM, cache).

    ``log_p``/``log_q`` are (Q, ...) log-probabilities; ``has_memory`` (Q,) bool; ``lam`` a number
    or (Q,) per row. Rows without memory keep ``log_p`` unchanged (q is undefined there).
    """
    log_p = fp32(log_p)
    extra = (1,) * (log_p.dim() - 1)
    log_keep, log_lam = _lambda_logs(lam, log_p.size(0), log_p)
    if not isinstance(log_keep, Tensor):
        if lam == 0.0:
            return log_p
    else:
        log_keep, log_lam = log_keep.view(-1, *extra), log_lam.view(-1, *extra)
    mixed = torch.logaddexp(log_p + log_keep, fp32(log_q) + log_lam)
    keep = has_memory.view(has_memory.shape + (1,) * (log_p.dim() - has_memory.dim()))
    return torch.where(keep, mixed, log_p)


def _lambda_logs(lam: Weight, rows: int, like: Tensor) -> Tuple[Union[float, Tensor], Union[float, Tensor]]:
    """(log(1 − λ), log λ): numbers for a number, (Q, 1) float32 tensors for a (Q,) tensor of per-row λ
    or a :class:`LogWeight`."""
    if isinstance(lam, LogWeight):
        if lam.keep.shape != (rows,) or lam.lam.shape != (rows,):
            raise ValueError(f"per-row interpolation weights must be ({rows},), got {tuple(lam.keep.shape)}")
        return fp32(lam.keep).to(like.device).unsqueeze(-1), fp32(lam.lam).to(like.device).unsqueeze(-1)
    if not isinstance(lam, Tensor):
        if not 0.0 <= lam <= 1.0:
            raise ValueError(f"interpolation weight λ must lie in [0, 1], got {lam}")
        return (math.log1p(-lam) if lam < 1.0 else float("-inf")), (math.log(lam) if lam > 0 else float("-inf"))
    if lam.shape != (rows,):
        raise ValueError(f"per-row interpolation weights must be ({rows},), got {tuple(lam.shape)}")
    lam = fp32(lam).to(like.device)
    if not torch.isfinite(lam).all() or bool(((lam < 0) | (lam > 1)).any()):
        raise ValueError("per-row interpolation weights λ must lie in [0, 1]")
    return torch.log1p(-lam).unsqueeze(-1), lam.log().unsqueeze(-1)


def _memory_normaliser(scores: Tensor, mask: Tensor) -> Tensor:
    """log Σ_visible exp(scores), 0 (not -inf) for rows without memory so that the
    memory distribution of such rows is -inf everywhere instead of NaN."""
    lse = masked_logsumexp(scores, mask)
    return lse.masked_fill(lse.isneginf(), 0.0)
