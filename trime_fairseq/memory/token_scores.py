"""The token term of TRIME's distribution: unnormalised log-scores E_w·f.

With a full softmax the scores are the output logits. fairseq's adaptive
softmax has no single set of logits, so the token score of w is
``log p_AS(w) + log Z_head`` (Z_head: partition function of the head
cluster). For head words this is exactly the head logit, for tail words the
cluster logit plus the within-cluster log-probability; the token partition
function is Z_head. The TRIME loss and evaluation both use these definitions.
"""

from typing import Optional, Tuple

import torch
from torch import Tensor

from trime_fairseq.memory.mixing import fp32


def _adaptive_softmax(decoder):
    return getattr(decoder, "adaptive_softmax", None)


def adaptive_target_log_prob(asm, features: Tensor, target: Tensor) -> Tuple[Tensor, Tensor]:
    """log p_AS(target) and log Z_head for flat features (N, d), target (N,).

    Differentiable; applies the adaptive softmax's dropout like its forward.
    Targets outside the vocabulary (padding is inside) are not special-cased:
    mask them out afterwards.
    """
    features = asm.dropout_module(features)
    new_target, target_idxs = asm.adapt_target(target)
    head = fp32(asm.head(features))  # (N, head_size)
    head_lse = torch.logsumexp(head, dim=-1)
    log_prob = head.gather(1, new_target[0].unsqueeze(1)).squeeze(1) - head_lse
    for i, idxs in enumerate(target_idxs):
        if idxs is None:
            continue
        tail = fp32(asm.tail[i](features.index_select(0, idxs)))
        tail_lp = tail.log_softmax(-1).gather(1, new_target[i + 1].unsqueeze(1)).squeeze(1)
        log_prob = log_prob.index_add(0, idxs, tail_lp)
    return log_prob, head_lse


def target_token_scores(decoder, net_output, target: Tensor) -> Tuple[Tensor, Tensor]:
    """(score of the target, log-partition of the token term), both (N,) float32.

    ``net_output[0]`` is (B, T, V) logits or (B, T, d) features (adaptive softmax);
    ``target`` is (B, T). Outputs are flattened in (B, T) order.
    """
    x = net_output[0]
    flat_target = target.reshape(-1)
    asm = _adaptive_softmax(decoder)
    if asm is not None:
        log_prob, head_lse = adaptive_target_log_prob(asm, x.reshape(-1, x.size(-1)), flat_target)
        return log_prob + head_lse, head_lse
    logits = fp32(x.reshape(-1, x.size(-1)))
    score = logits.gather(1, flat_target.unsqueeze(1)).squeeze(1)
    return score, torch.logsumexp(logits, dim=-1)


def fills_every_token(decoder) -> bool:
    """Whether :func:`all_token_log_probs` fills every token even when given a target (a full softmax; an
    adaptive softmax fills only the target's cluster)."""
    return _adaptive_softmax(decoder) is None


def all_token_log_probs(decoder, x: Tensor, target: Optional[Tensor] = None,
                        rows: Optional[Tensor] = None, partition: bool = True) -> Tuple[Tensor, Optional[Tensor]]:
    """(N, V) float32 token log-probabilities (a new tensor) for flat rows of ``x``, and the
    log-partition of the token term for ``rows`` (k,) (default: all rows): the token scores
    of those rows are ``log_probs[rows] + lse``. ``partition=False``: no log-partition (None), for
    compositions that only interpolate the model's distribution (one fused log-softmax, as fairseq's).

    ``x`` is (..., V) logits or (..., d) features. With an adaptive softmax and a
    ``target``, only the target's cluster is filled (as fairseq does); the
    partition is exact regardless. The cost is fairseq's own ``get_normalized_probs``
    plus, with an adaptive softmax, the head's log-partition of ``rows``.
    """
    asm = _adaptive_softmax(decoder)
    flat = x.reshape(-1, x.size(-1))
    if asm is not None:
        tgt = target.reshape(1, -1) if target is not None else None
        log_probs = fp32(asm.get_log_prob(flat.unsqueeze(0), tgt).reshape(-1, asm.vocab_size))
        if not partition:
            return log_probs, None
        head_rows = flat if rows is None else flat[rows]
        if head_rows.size(0) == 0:  # nothing scored (e.g. an ended stream's padding row): the tied head
            return log_probs, log_probs.new_empty(0)  # cannot view an empty batch
        head_lse = torch.logsumexp(fp32(asm.head(head_rows)), dim=-1)
        return log_probs, head_lse
    logits = fp32(flat)
    if not partition:
        return torch.log_softmax(logits, dim=-1), None
    lse = torch.logsumexp(logits, dim=-1)
    return logits - lse.unsqueeze(-1), lse if rows is None else lse[rows]
