"""Relative-position attention shared by Transformer-XL and LaMemo.

The score of query i and key j (Transformer-XL, Dai et al. 2019; LaMemo Eq. 6) is

    A[i, j] = (q_i + u)·k_j  +  (q_i + v)·W_R R[dist(i, j)]

with u, v global content / position biases and R the sinusoid encoding of the
relative distance. LaMemo's disentangled encoding (Eq. 12) uses the same form
with R[|i − j|] and a direction-specific position bias v₊ (j ≤ i) / v₋ (j > i).

Position terms are computed once per *distance column* and moved into (query, key)
layout by :func:`rel_shift` (Transformer-XL Appendix B): column ``c`` of the
(…, Q, L) input lands at ``out[i, j]`` with ``c = j + Q − 1 − i``. For a causal
block of ``klen`` keys whose last ``Q`` are the queries, column ``c`` must hold
distance ``klen − 1 − c`` (see :func:`causal_distances`).

Masks are bool with True = visible; softmax statistics are float32 and rows
with no visible key produce zero attention and log-denominator −inf, never NaN.
"""

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trime_fairseq.models.dropout import Dropout


def sinusoid_embedding(distances: Tensor, dim: int) -> Tensor:
    """R[d] for every entry of ``distances`` (L,): (L, dim) float64 = [sin(ω d), cos(ω d)], ω_k = 10000^(−2k/dim)."""
    if dim % 2 != 0:
        raise ValueError(f"sinusoid position embeddings need an even dimension, got {dim}")
    # float64 (cheap: L × dim/2) so double-precision models get exact positions; callers cast
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, dim, 2, device=distances.device, dtype=torch.float64) / dim))
    angles = distances.double().unsqueeze(-1) * inv_freq  # (L, dim/2)
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


def causal_distances(klen: int, clamp_len: int = -1, device=None) -> Tensor:
    """Distances klen−1, …, 0 (one per column of the causal position term), clamped at ``clamp_len`` (> 0)."""
    dist = torch.arange(klen - 1, -1, -1, device=device)
    return dist.clamp(max=clamp_len) if clamp_len > 0 else dist


def rel_shift(x: Tensor, klen: int, offset: int = 0) -> Tensor:
    """Skew position scores (…, Q, L) into (…, Q, klen): ``out[…, i, j] = x[…, i, j + Q − 1 − i − offset]``.

    ``offset`` implicit zero columns come first (scores never computed). Entries
    whose source column lies outside x are 0 (for the causal layout these are
    future keys, which are masked anyway). Implemented with one pad and a
    reshape (no gather): padding each row to width W and re-reading the flat
    buffer with row width W − 1 shifts row i left by i.
    """
    *batch, qlen, width = x.shape
    width += offset
    pad = max(1, klen + qlen - width)
    row = width + pad
    flat = F.pad(x, (offset, pad)).reshape(*batch, qlen * row)
    skewed = flat[..., : qlen * (row - 1)].reshape(*batch, qlen, row - 1)
    return skewed[..., qlen - 1 : qlen - 1 + klen]


def stats_dtype(dtype: torch.dtype) -> torch.dtype:
    """Precision of softmax statistics: float32, or float64 for float64 models."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def masked_softmax(scores: Tensor, visible: Tensor) -> Tuple[Tensor, Tensor]:
    """Softmax over the last dim restricted to ``visible`` (bool, broadcastable).

    Returns (probabilities (…, K), log-denominator (…)), float32 (float64 for
    float64 scores), from one exponential pass. A row with nothing visible gets
    all-zero probabilities and log-denominator −inf; its gradients are zero, not NaN.
    """
    scores = scores.to(stats_dtype(scores.dtype))
    filled = torch.where(visible, scores, float("-inf"))
    peak = filled.amax(dim=-1, keepdim=True).detach()  # the lse does not depend on it
    empty = torch.isneginf(peak)
    peak = peak.masked_fill(empty, 0.0)
    weights = (filled - peak).exp()  # hidden keys: exp(-inf) = 0
    total = weights.sum(dim=-1, keepdim=True).masked_fill(empty, 1.0)
    lse = (peak + total.log()).masked_fill(empty, float("-inf")).squeeze(-1)
    return weights / total, lse


def relative_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    r: Tensor,
    content_bias: Tensor,
    position_bias: Tensor,
    visible: Tensor,
    dropout: Optional[nn.Module] = None,
    column_offset: int = 0,
) -> Tuple[Tensor, Tensor]:
    """Multi-head relative attention.

    q: (B, Q, H, D) queries; k, v: (B, K, H, D); r: (L, H, D) projected position
    embeddings, one per distance column (see :func:`rel_shift`); ``column_offset``
    leading columns are implicitly zero (not computed). content_bias u,
    position_bias v: (H, D). visible: bool (B | 1, 1 | H, Q, K).

    Scores are computed in float32 for half-precision inputs.
    Returns (context (B, Q, H, D) in v's dtype, log-denominator (B, H, Q) float32):
    the log of the softmax denominator Σ_j exp(A[i, j]/√D) over visible keys.
    """
    scale = 1.0 / math.sqrt(q.size(-1))
    klen = k.size(1)
    if q.dtype in (torch.float16, torch.bfloat16):  # scores in float32: q·k overflows half precision
        q, k, r = q.float(), k.float(), r.float()
        content_bias, position_bias = content_bias.float(), position_bias.float()
    content = torch.einsum("bqhd,bkhd->bhqk", q + content_bias, k)  # (B, H, Q, K)
    position = torch.einsum("bqhd,lhd->bhql", q + position_bias, r)  # (B, H, Q, L)
    scores = (content + rel_shift(position, klen, column_offset)) * scale
    probs, lse = masked_softmax(scores, visible)
    if dropout is not None:
        probs = dropout(probs)
    context = torch.einsum("bhqk,bkhd->bqhd", probs.to(v.dtype), v)
    return context, lse


class RelativeMultiheadAttention(nn.Module):
    """Projections of one relative-attention block: W_q, W_k^E, W_v, W_k^R and W_o (no biases, as Transformer-XL).

    The module only projects; :func:`relative_attention` does the math, so
    callers can attend from different query sets (current tokens, memory
    positions) with shared weights and combine contexts before :meth:`out`.
    """

    def __init__(self, embed_dim: int, num_heads: int, head_dim: int, attention_dropout: float = 0.0):
        super().__init__()
        if num_heads <= 0 or head_dim <= 0:
            raise ValueError(f"attention needs heads > 0 and head dim > 0, got {num_heads} × {head_dim}")
        self.num_heads, self.head_dim = num_heads, head_dim
        inner = num_heads * head_dim
        self.q_proj = nn.Linear(embed_dim, inner, bias=False)
        self.kv_proj = nn.Linear(embed_dim, 2 * inner, bias=False)
        self.r_proj = nn.Linear(embed_dim, inner, bias=False)
        self.out_proj = nn.Linear(inner, embed_dim, bias=False)
        self.attn_dropout = Dropout(attention_dropout)
        for proj in (self.q_proj, self.kv_proj, self.r_proj, self.out_proj):
            nn.init.xavier_uniform_(proj.weight)

    def _heads(self, x: Tensor) -> Tensor:
        return x.view(*x.shape[:-1], self.num_heads, self.head_dim)

    def query(self, x: Tensor) -> Tensor:
        """(B, T, d) -> (B, T, H, D)."""
        return self._heads(self.q_proj(x))

    def key_value(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        """(B, K, d) -> two (B, K, H, D)."""
        k, v = self.kv_proj(x).chunk(2, dim=-1)
        return self._heads(k), self._heads(v)

    def positions(self, r: Tensor) -> Tensor:
        """(L, d) sinusoids -> (L, H, D)."""
        return self._heads(self.r_proj(r))

    def out(self, context: Tensor) -> Tensor:
        """(B, T, H, D) -> (B, T, d)."""
        return self.out_proj(context.reshape(*context.shape[:-2], -1))
