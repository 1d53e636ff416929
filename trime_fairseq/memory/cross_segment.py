"""In-batch memory across the segments (or sentences) of a batch: every valid position of the
*other* rows, plus, where asked, the earlier positions of the query's own row.

The batch (B, T) is read as one stream of N = B·T positions; the query at flat position
i of row s sees

* every valid position j of another row (no causality between different rows: they are
  different texts), and
* the valid positions j < i of its own row, if ``keep_local[s]``.

TRIMELM_ext (``trime_ext_loss``, §4.3) keeps the local part with probability 1 − p per
segment; TRIME for translation (``trime_mt_loss``, §5.4 / Appendix B) never keeps it
(no entry of the sentence itself). Dense: (1, N, N) scores and mask; beyond
``block_size`` positions, checkpointed query blocks give the target-only summary
(:func:`~trime_fairseq.memory.blockwise.summary_batch`), peak (block, N) forward and backward.
"""

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from trime_fairseq.memory.blockwise import summary_batch
from trime_fairseq.memory.mixing import masked_logsumexp
from trime_fairseq.memory.sources import MemoryBatch, scaled_dot

MAX_DENSE_POSITIONS = 32768  # 2^30 scores = 4 GiB in float32: score larger batches in blocks


def cross_segment_mask(query_index: Tensor, seq_len: int, keep_local: Tensor, valid: Tensor) -> Tensor:
    """Visibility (Q, N) of the N = B·T flat batch positions for the queries at flat positions
    ``query_index`` (Q,): every valid position of another row, plus the earlier valid positions
    of the query's own row when ``keep_local`` (B,) of that row is True."""
    key_index = torch.arange(valid.numel(), device=valid.device)
    seg_q, seg_k = query_index // seq_len, key_index // seq_len
    same = seg_q.unsqueeze(1) == seg_k.unsqueeze(0)  # (Q, N)
    local = same & (key_index.unsqueeze(0) < query_index.unsqueeze(1)) & keep_local[seg_q].unsqueeze(1)
    return valid.unsqueeze(0) & (~same | local)


def _block_sums(queries, keys, values, valid, target, query_index, keep_local, seq_len: int, scale: float):
    """(match, other) log-sums (Q,) of the queries (Q, d) over their memory among keys (N, d)."""
    scores = scaled_dot(queries, keys, scale)  # (Q, N)
    visible = cross_segment_mask(query_index, seq_len, keep_local, valid)
    match = visible & (values.unsqueeze(0) == target.unsqueeze(1))
    return masked_logsumexp(scores, match), masked_logsumexp(scores, visible & ~match)


def cross_segment_memory(keys: Tensor, values: Tensor, valid: Tensor, keep_local: Tensor, scale: float,
                         block_size: int = 0) -> MemoryBatch:
    """The memory of every position of a batch, as one stream of N = B·T positions.

    Args:
        keys: (B, T, d) key (= query) of every position (g).
        values: (B, T) next token of every position (= its target).
        valid: (B, T) bool, real (non-pad) positions.
        keep_local: (B,) bool, rows whose own earlier positions are memory too.
        scale: multiplier of the dot products (1/(√d·τ)).
        block_size: 0 or N <= block_size: dense MemoryBatch (1, N, N) (full vocabulary
            or target-only use); else the target-only summary (1, N, 2) in query blocks.
    """
    bsz, tsz, dim = keys.shape
    n = bsz * tsz
    keep_local = keep_local.to(keys.device)
    flat_keys, flat_values, flat_valid = keys.reshape(n, dim), values.reshape(n), valid.reshape(n)
    if block_size == 0 or n <= block_size:
        if n > MAX_DENSE_POSITIONS:
            raise ValueError(
                f"a batch of {bsz} x {tsz} = {n} positions needs a dense {n} x {n} memory; "
                f"set --memory-block-size (e.g. 4096) to score it in blocks"
            )
        index = torch.arange(n, device=keys.device)
        mask = cross_segment_mask(index, tsz, keep_local, flat_valid)
        scores = scaled_dot(flat_keys, flat_keys, scale)
        return MemoryBatch(scores.unsqueeze(0), flat_values.view(1, 1, n), mask.unsqueeze(0))
    matches, others = [], []
    for a in range(0, n, block_size):
        b = min(a + block_size, n)
        args = (flat_keys[a:b], flat_keys, flat_values, flat_valid, flat_values[a:b],
                torch.arange(a, b, device=keys.device), keep_local, tsz, scale)
        if torch.is_grad_enabled() and keys.requires_grad:
            match, other = checkpoint(_block_sums, *args, use_reentrant=False)
        else:
            match, other = _block_sums(*args)
        matches.append(match)
        others.append(other)
    return summary_batch(torch.cat(matches).unsqueeze(0), torch.cat(others).unsqueeze(0), flat_values.unsqueeze(0))
