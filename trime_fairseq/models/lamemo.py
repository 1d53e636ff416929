"""``lamemo``: Look-Ahead Memory (Ji et al., NAACL 2022) as a native fairseq language model.

Transformer-XL whose memory is refreshed at every segment (paper §3):

* **look-ahead attention** (Eq. 7-9): in layer l the M memory positions attend
  to the newest W = min(T, M) positions on their right -- the last W − 1 memory
  positions and the *first* token of the current segment, never beyond it, so
  nothing leaks: memory refreshed with token τ+1 only reaches the current
  segment through layer l+1, where every query is at or after τ+1;
* **memory interpolation** (Eq. 10-11): the new context is mixed with the
  memory's accumulated context, C↔ = α·sg(C→) + (1 − α)·C←, with
  α = sg(s→) / (sg(s→) + s←) from the two softmax denominators; computed in
  log space, α = sigmoid(log s→ − log s←), float32 (ε of Eq. 11 is not needed);
  the stored log s→ becomes logaddexp(log s→, log s←), so the memory keeps
  the running bidirectional attention of Appendix A;
* **disentangled relative positions** (Eq. 12): R[|i − j|] with the content bias
  u shared and direction-specific position biases v₊ (j ≤ i) / v₋ (j > i).

The refreshed memory (output of layer l's attention and FFN for the M memory
positions) is the memory of layer l+1. So the state is the layer-0 memory
(``embed``, the embedded tokens) plus per layer the attention context and its
log-denominator of every memory position (``context.{l}`` (B, M, H, D),
``lse.{l}`` (B, M, H), float32); the last layer's memory is never read, so it
is not refreshed.

Architectures: ``lamemo_wt103_base``, ``lamemo_enwik8``, ``lamemo_wikitext2_small``
(the sizes of the Transformer-XL ones).
"""

from dataclasses import dataclass, field
from typing import NamedTuple, Optional, Tuple

import torch
from fairseq.models import register_model, register_model_architecture
from torch import Tensor, nn

from trime_fairseq.models.recurrent_decoder import RecurrentLanguageModel, RecurrentLMDecoder
from trime_fairseq.models.recurrent_memory import MemoryState
from trime_fairseq.models.relative_attention import relative_attention, stats_dtype
from trime_fairseq.models.transformer_xl import (
    TransformerXLConfig,
    TransformerXLLayer,
    enwik8_base,
    wikitext2_small,
    wt103_base,
)


@dataclass
class LaMemoConfig(TransformerXLConfig):
    memory_interpolation: bool = field(
        default=True,
        metadata={"help": "interpolate the look-ahead context with the memory's past context (Eq. 10); "
        "False is the paper's 'w/o mem interp' ablation (α = 0)"},
    )


def interpolation_weight(lse_old: Tensor, lse_new: Tensor) -> Tensor:
    """α = s_old / (s_old + s_new) from log-denominators, float32, no NaN.

    A side with nothing visible (−inf) gets weight 0 (both empty: α = 1, keep the old context).
    """
    dtype = stats_dtype(lse_new.dtype)
    lse_old, lse_new = lse_old.to(dtype), lse_new.to(dtype)
    old_empty, new_empty = torch.isneginf(lse_old), torch.isneginf(lse_new)
    diff = lse_old.masked_fill(old_empty, 0.0) - lse_new.masked_fill(new_empty, 0.0)
    return torch.sigmoid(diff).masked_fill(old_empty, 0.0).masked_fill(new_empty, 1.0)


def interpolate_contexts(
    ctx_old: Tensor, lse_old: Tensor, ctx_new: Tensor, lse_new: Tensor, enabled: bool = True
) -> Tuple[Tensor, Tensor]:
    """Memory interpolation (Eq. 10-11).

    ctx_old: (B, M, H, D) accumulated context (stop-gradient); lse_old: (B, M, H) its
    log-denominator (stop-gradient); ctx_new: (B, M, H, D) look-ahead context; lse_new:
    (B, M, H). Returns (C↔ (B, M, H, D), updated log-denominator (B, M, H), detached).
    """
    ctx_old, lse_old = ctx_old.detach(), lse_old.detach()
    if enabled:
        alpha = interpolation_weight(lse_old, lse_new).unsqueeze(-1).to(ctx_new.dtype)  # (B, M, H, 1)
        ctx = alpha * ctx_old.to(ctx_new.dtype) + (1.0 - alpha) * ctx_new
    else:
        ctx = ctx_new
    with torch.no_grad():
        dtype = stats_dtype(lse_new.dtype)
        lse = torch.logaddexp(lse_old.to(dtype), lse_new.detach().to(dtype))
    return ctx, lse


class LayerOutput(NamedTuple):
    x: Tensor  # (B, T, d) segment output
    key: Tensor  # (B, T, d) FFN input of the segment (TRIME key)
    mem: Optional[Tensor]  # (B, M, d) refreshed memory (next layer's memory), None if not refreshed
    context: Tensor  # (B, M' + T, H, D) contexts of [refreshed memory ; segment] (M' = 0 if not refreshed)
    lse: Tensor  # (B, M' + T, H) their log-denominators, float32, detached


class LaMemoLayer(TransformerXLLayer):
    """A Transformer-XL layer that also refreshes its memory (look-ahead + interpolation)."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.memory_interpolation = getattr(cfg, "memory_interpolation", True)

    def forward(
        self,
        x: Tensor,
        mem: Optional[Tensor],
        r: Tensor,
        biases: Tuple[Tensor, Tensor, Tensor],
        visible: Tensor,
        refresh: Optional[dict] = None,
    ) -> LayerOutput:
        """x: (B, T, d); mem: (B, M, d) or None; r: (M + T, d) causal sinusoids; biases: (u, v₊, v₋);
        visible: (B, 1, T, M + T). ``refresh`` (None: do not refresh the memory) holds
        ``context`` (B, M, H, D), ``lse`` (B, M, H): the memory's accumulated attention;
        ``visible``: (B, 1, M, W);
        ``start``: index of the first look-ahead key in [memory ; segment]."""
        u, v_plus, v_minus = biases
        mlen = 0 if mem is None else mem.size(1)
        h_in = self.attention_input(mem, x)  # (B, M + T, d)
        k, v = self.self_attn.key_value(h_in)
        attn_dropout = self.self_attn.attn_dropout

        # causal attention of the segment: Transformer-XL with R[|i - j|] = R[i - j] and v₊
        refreshing = refresh is not None and mlen > 0
        # one query projection for [memory ; segment] when the memory is refreshed too
        q_all = self.self_attn.query(h_in if refreshing else h_in[:, mlen:])
        q = q_all[:, mlen:] if refreshing else q_all
        r_heads = self.self_attn.positions(r)  # (M + T, H, D), distances M+T-1 … 0
        ctx_cur, lse_cur = relative_attention(q, k, v, r_heads, u, v_plus, visible, attn_dropout)
        lse_cur = lse_cur.transpose(1, 2).detach()  # (B, T, H)
        if not refreshing:
            y, key = self.ffn(self.residual(x, ctx_cur))
            return LayerOutput(y, key, None, ctx_cur.detach(), lse_cur)

        # look-ahead attention of the memory (Eq. 9) to keys start … M (the first segment token is M);
        # R[|i - j|] for distances 1 … M are rows of the causal position projection, reversed
        start = refresh["start"]
        width = mlen + 1 - start
        klen = r_heads.size(0)
        r_future = r_heads[klen - 1 - mlen : klen - 1].flip(0)  # (M, H, D), distances 1 … M
        ctx_ahead, lse_ahead = relative_attention(
            q_all[:, :mlen],
            k[:, start : mlen + 1],
            v[:, start : mlen + 1],
            r_future,
            u,
            v_minus,
            refresh["visible"],
            attn_dropout,
            column_offset=width - 1,  # columns of distances <= 0 are never visible
        )
        ctx_mem, lse_mem = interpolate_contexts(
            refresh["context"], refresh["lse"], ctx_ahead, lse_ahead.transpose(1, 2), self.memory_interpolation
        )
        # output projection, residual and FFN of [memory ; segment] at once
        h = self.residual(torch.cat([mem.to(x.dtype), x], dim=1), torch.cat([ctx_mem, ctx_cur], dim=1))
        y, key = self.ffn(h)
        return LayerOutput(
            y[:, mlen:],
            key[:, mlen:],
            y[:, :mlen],
            torch.cat([ctx_mem.detach(), ctx_cur.detach()], dim=1),
            torch.cat([lse_mem, lse_cur], dim=1),
        )


class LaMemoDecoder(RecurrentLMDecoder):
    """Memory: ``embed`` (B, M, d) layer-0 inputs; ``context.{l}``, ``lse.{l}`` for layers 0 … L−2."""

    def __init__(self, cfg, dictionary):
        super().__init__(cfg, dictionary)
        # v₋ of Eq. 12 (v₊ is the base class's position_bias)
        self.future_position_bias = nn.Parameter(torch.empty(self.num_heads, self.head_dim).normal_(0.0, 0.02))

    def build_layer(self, cfg, index: int) -> nn.Module:
        return LaMemoLayer(cfg)

    def lookahead_visibility(
        self, mem_valid: Tensor, valid: Tensor, mem_doc: Optional[Tensor], doc: Optional[Tensor], start: int
    ) -> Tensor:
        """Memory position i sees key j in start … M (M = first segment token) iff j > i: (B, 1, M, W)."""
        mlen = mem_valid.size(1)
        device = valid.device
        keys = torch.arange(start, mlen + 1, device=device).unsqueeze(0)  # (1, W)
        queries = torch.arange(mlen, device=device).unsqueeze(1)  # (M, 1)
        key_valid = torch.cat([mem_valid, valid[:, :1]], dim=1)[:, start:]  # (B, W)
        visible = (keys > queries).unsqueeze(0) & key_valid.unsqueeze(1)  # (B, M, W)
        if doc is not None:
            key_doc = torch.cat([mem_doc, doc[:, :1]], dim=1)[:, start:]
            visible = visible & (key_doc.unsqueeze(1) == mem_doc.unsqueeze(2))
        return visible.unsqueeze(1)

    def run_layers(self, x: Tensor, valid: Tensor, doc: Optional[Tensor], state: MemoryState):
        qlen = x.size(1)
        mlen = state["valid"].size(1)
        mem_valid, mem_doc = state["valid"], state.get("doc")
        visible = self.causal_visibility(mem_valid, valid, mem_doc, doc)  # (B, 1, T, M+T)
        r = self.causal_positions(mlen + qlen, x)  # (M+T, d)
        biases = (self.content_bias, self.position_bias, self.future_position_bias)
        new_state = self.memory_bookkeeping(state, valid, doc)
        new_state["embed"] = self.trim(state["embed"] if mlen > 0 else x[:, :0], x)
        refresh_common = None
        if mlen > 0:
            start = mlen + 1 - min(qlen, mlen)
            refresh_common = {
                "start": start,
                "visible": self.lookahead_visibility(mem_valid, valid, mem_doc, doc, start),
            }

        mem = state["embed"] if mlen > 0 else None
        last = len(self.layers) - 1
        key = x
        for i, layer in enumerate(self.layers):
            refresh = None
            if refresh_common is not None and i < last:
                refresh = dict(refresh_common, context=state[f"context.{i}"], lse=state[f"lse.{i}"])
            out = layer(x, mem, r, biases, visible, refresh)
            if i < last:
                # memory positions that were not refreshed (no memory yet) contribute nothing
                new_state[f"context.{i}"] = self.trim(out.context[:, :0], out.context)
                new_state[f"lse.{i}"] = self.trim(out.lse[:, :0], out.lse)
            x, key, mem = out.x, out.key, out.mem
        return x, key, new_state


@register_model("lamemo", dataclass=LaMemoConfig)
class LaMemoModel(RecurrentLanguageModel):
    decoder_class = LaMemoDecoder


@register_model_architecture("lamemo", "lamemo_wt103_base")
def lamemo_wt103_base(args):
    wt103_base(args, LaMemoConfig)


@register_model_architecture("lamemo", "lamemo_enwik8")
def lamemo_enwik8(args):
    enwik8_base(args, LaMemoConfig)


@register_model_architecture("lamemo", "lamemo_wikitext2_small")
def lamemo_wikitext2_small(args):
    wikitext2_small(args, LaMemoConfig)
