"""Naive references for the relative-attention models (loops over positions; float64; eval mode).

Independent of trime_fairseq.models.relative_attention: sinusoids from the
formula, scores pair by pair, no relative shift, no masks.
"""

import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F


def sinusoid(distance: float, dim: int) -> torch.Tensor:
    """R[d] = [sin(ω_0 d) … sin(ω_{dim/2-1} d), cos(ω_0 d) … cos(ω_{dim/2-1} d)], ω_k = 10000^(-2k/dim)."""
    half = dim // 2
    out = torch.zeros(dim, dtype=torch.float64)
    for k in range(half):
        w = 10000.0 ** (-2.0 * k / dim)
        out[k] = math.sin(w * distance)
        out[half + k] = math.cos(w * distance)
    return out


def heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    return x.view(*x.shape[:-1], num_heads, -1)


def pair_score(layer, hn, i: int, j: int, distance: float, u, v, num_heads: int) -> torch.Tensor:
    """(q_i + u)·k_j + (q_i + v)·W_R R[distance], scaled by 1/√D: (B, H)."""
    attn = layer.self_attn
    q = heads(hn[:, i] @ attn.q_proj.weight.T, num_heads)  # (B, H, D)
    k = heads(hn[:, j] @ attn.kv_proj.weight.T, 2 * num_heads)[:, :num_heads]
    r = heads(sinusoid(distance, hn.size(-1)).to(hn) @ attn.r_proj.weight.T, num_heads)  # (H, D)
    score = ((q + u) * k).sum(-1) + ((q + v) * r).sum(-1)
    return score / math.sqrt(q.size(-1))


def values(layer, hn, j: int, num_heads: int) -> torch.Tensor:
    return heads(hn[:, j] @ layer.self_attn.kv_proj.weight.T, 2 * num_heads)[:, num_heads:]  # (B, H, D)


def attend(layer, hn, i: int, keys, distance_fn: Callable, bias_fn: Callable, u, num_heads: int):
    """Softmax attention of query i over ``keys``: (context (B, H, D), log-denominator (B, H))."""
    scores = torch.stack([pair_score(layer, hn, i, j, distance_fn(i, j), u, bias_fn(i, j), num_heads) for j in keys], -1)
    probs = scores.softmax(-1)  # (B, H, K)
    vals = torch.stack([values(layer, hn, j, num_heads) for j in keys], 2)  # (B, H, K, D)
    return (probs.unsqueeze(-1) * vals).sum(2), torch.logsumexp(scores, -1)


def layer_tail(layer, x, context, pre_norm: bool):
    """Attention output projection, residual, norm and FFN, from the layer's weights."""
    out = x + context.reshape(*context.shape[:-2], -1) @ layer.self_attn.out_proj.weight.T
    norm = layer.attn_norm
    h = out if pre_norm else F.layer_norm(out, out.shape[-1:], norm.weight, norm.bias, norm.eps)
    ffn = layer.ffn
    fnorm = ffn.ffn_norm
    z = F.layer_norm(h, h.shape[-1:], fnorm.weight, fnorm.bias, fnorm.eps) if pre_norm else h
    y = h + F.relu(z @ ffn.fc1.weight.T + ffn.fc1.bias) @ ffn.fc2.weight.T + ffn.fc2.bias
    return (y if pre_norm else F.layer_norm(y, y.shape[-1:], fnorm.weight, fnorm.bias, fnorm.eps)), z


def naive_causal_transformer(decoder, tokens, window: Optional[int] = None, clamp_len: int = -1):
    """One pass of a causal relative-position transformer with the decoder's weights.

    Query i sees keys j <= i (and j > i - window if given), distance i - j (clamped).
    Returns (features before the output layer (B, T, d), TRIME key of the last layer).
    """
    num_heads = decoder.num_heads
    pre_norm = decoder.cfg.decoder_normalize_before
    x = decoder.embed_scale * decoder.embed_tokens(tokens)
    u, v = decoder.content_bias, decoder.position_bias

    def distance(i, j):
        return min(i - j, clamp_len) if clamp_len > 0 else i - j

    key = None
    for layer in decoder.layers:
        norm = layer.attn_norm
        hn = F.layer_norm(x, x.shape[-1:], norm.weight, norm.bias, norm.eps) if pre_norm else x
        contexts = []
        for i in range(x.size(1)):
            first = 0 if window is None else max(0, i - window + 1)
            ctx, _ = attend(layer, hn, i, range(first, i + 1), distance, lambda i, j: v, u, num_heads)
            contexts.append(ctx)
        x, key = layer_tail(layer, x, torch.stack(contexts, 1), pre_norm)
    if decoder.final_norm is not None:
        x = decoder.final_norm(x)
    return x, key
