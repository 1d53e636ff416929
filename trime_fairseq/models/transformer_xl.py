"""``trime_transformer_xl``: Transformer-XL (Dai et al. 2019) as a native fairseq language model.

Each layer attends from the T positions of the current segment to
[memory ; segment], where the memory holds the layer's *inputs* at the last
``mem_len`` positions of the previous segments (stop-gradient, LaMemo Eq. 5),
with relative positions and global biases u, v (Eq. 6). ``clamp_len`` caps the
distance, ``same_length`` makes every query see the last ``mem_len`` keys.

| architecture                           | layers | d   | heads × dim | ffn  | mem (tgt = --tokens-per-sample) | softmax |
|----------------------------------------|--------|-----|-------------|------|---------------------------------|---------|
| trime_transformer_xl_wt103_base        | 16     | 410 | 10 × 41     | 2100 | 150 (tgt 150)                   | adaptive 20k,40k,200k |
| trime_transformer_xl_enwik8            | 12     | 512 | 8 × 64      | 2048 | 512 (tgt 512)                   | full, tied |
| trime_transformer_xl_wikitext2_small   | 4      | 128 | 4 × 32      | 512  | 64 (tgt 64)                     | adaptive 2k,10k |

The memory carries across batches only with ``--task trime_lm --batching stream``
(otherwise every batch starts with an empty memory). Evaluation may use a longer
memory: ``--model-overrides "{'mem_len': 640, 'clamp_len': 400, 'same_length': True}"``.
"""

from dataclasses import dataclass
from typing import Optional, Tuple

import torch
from fairseq.models import register_model, register_model_architecture
from torch import Tensor, nn

from trime_fairseq.models.recurrent_decoder import (
    FeedForwardBlock,
    RecurrentLanguageModel,
    RecurrentLMConfig,
    RecurrentLMDecoder,
    fill_defaults,
    head_dim_of,
    tied_adaptive,
)
from trime_fairseq.models.dropout import Dropout
from trime_fairseq.models.recurrent_memory import MemoryState
from trime_fairseq.models.relative_attention import RelativeMultiheadAttention, relative_attention


@dataclass
class TransformerXLConfig(RecurrentLMConfig):
    pass


class TransformerXLLayer(nn.Module):
    """Relative self-attention over [memory ; segment] + feed-forward, post-norm (or pre-norm)."""

    def __init__(self, cfg):
        super().__init__()
        dim = cfg.decoder_embed_dim
        self.self_attn = RelativeMultiheadAttention(
            dim, cfg.decoder_attention_heads, head_dim_of(cfg), cfg.attention_dropout
        )
        self.attn_norm = nn.LayerNorm(dim)
        self.ffn = FeedForwardBlock(dim, cfg.decoder_ffn_embed_dim, cfg.dropout, cfg.decoder_normalize_before)
        self.dropout = Dropout(cfg.dropout)
        self.normalize_before = cfg.decoder_normalize_before

    def attention_input(self, mem: Optional[Tensor], x: Tensor) -> Tensor:
        """[memory ; segment] (B, M + T, d), layer-normed in pre-norm layers."""
        h = x if mem is None or mem.size(1) == 0 else torch.cat([mem.to(x.dtype), x], dim=1)
        return self.attn_norm(h) if self.normalize_before else h

    def residual(self, x: Tensor, context: Tensor) -> Tensor:
        """Residual around the attention output projection; context (B, T, H, D) -> (B, T, d)."""
        out = x + self.dropout(self.self_attn.out(context))
        return out if self.normalize_before else self.attn_norm(out)

    def forward(
        self,
        x: Tensor,
        mem: Optional[Tensor],
        r: Tensor,
        content_bias: Tensor,
        position_bias: Tensor,
        visible: Tensor,
    ) -> Tuple[Tensor, Tensor]:
        """x: (B, T, d); mem: (B, M, d) or None; r: (M + T, d) sinusoids of distances M+T−1 … 0;
        visible: (B, 1, T, M + T). Returns (output (B, T, d), FFN input = TRIME key (B, T, d))."""
        h_in = self.attention_input(mem, x)
        k, v = self.self_attn.key_value(h_in)
        q = self.self_attn.query(h_in[:, h_in.size(1) - x.size(1) :])
        context, _ = relative_attention(
            q, k, v, self.self_attn.positions(r), content_bias, position_bias, visible, self.self_attn.attn_dropout
        )
        return self.ffn(self.residual(x, context))


class TransformerXLDecoder(RecurrentLMDecoder):
    """Memory: ``hidden.{l}`` (B, M, d) = input of layer l at the last M positions."""

    def build_layer(self, cfg, index: int) -> nn.Module:
        return TransformerXLLayer(cfg)

    def run_layers(self, x: Tensor, valid: Tensor, doc: Optional[Tensor], state: MemoryState):
        mlen = state["valid"].size(1)
        visible = self.causal_visibility(state["valid"], valid, state.get("doc"), doc)  # (B, 1, T, M+T)
        r = self.causal_positions(mlen + x.size(1), x)  # (M+T, d)
        new_state = self.memory_bookkeeping(state, valid, doc)
        key = x
        for i, layer in enumerate(self.layers):
            mem = state[f"hidden.{i}"] if mlen > 0 else None
            new_state[f"hidden.{i}"] = self.trim(mem if mem is not None else x[:, :0], x)
            x, key = layer(x, mem, r, self.content_bias, self.position_bias, visible)
        return x, key, new_state


@register_model("trime_transformer_xl", dataclass=TransformerXLConfig)
class TrimeTransformerXLModel(RecurrentLanguageModel):
    decoder_class = TransformerXLDecoder


# -- architectures (shared with lamemo.py: same sizes, different model) -------------------------


def wt103_base(args, config_cls):
    """Transformer-XL / LaMemo base on WikiText-103 (LaMemo Appendix C.2)."""
    fill_defaults(
        args,
        config_cls,
        decoder_layers=16,
        decoder_embed_dim=410,
        decoder_attention_heads=10,
        decoder_head_dim=41,
        decoder_ffn_embed_dim=2100,
        dropout=0.1,
        attention_dropout=0.0,
        mem_len=150,
        **tied_adaptive("20000,40000,200000"),
    )


def enwik8_base(args, config_cls):
    """Transformer-XL / LaMemo base on enwik8 / text8 (12 layers, 8 × 64, tgt = mem = 512)."""
    fill_defaults(
        args,
        config_cls,
        decoder_layers=12,
        decoder_embed_dim=512,
        decoder_attention_heads=8,
        decoder_head_dim=64,
        decoder_ffn_embed_dim=2048,
        dropout=0.1,
        attention_dropout=0.0,
        mem_len=512,
        share_decoder_input_output_embed=True,
    )


def wikitext2_small(args, config_cls):
    """CPU setting for WikiText-2 (tests, docs/results_models.md): the shape of
    trime_lm_wikitext2_small (4 × 128, 4 heads, ffn 512, adaptive 2k/10k) with tgt = mem = 64."""
    fill_defaults(
        args,
        config_cls,
        decoder_layers=4,
        decoder_embed_dim=128,
        decoder_attention_heads=4,
        decoder_ffn_embed_dim=512,
        dropout=0.2,
        attention_dropout=0.1,
        mem_len=64,
        **tied_adaptive("2000,10000"),
    )


@register_model_architecture("trime_transformer_xl", "trime_transformer_xl_wt103_base")
def trime_transformer_xl_wt103_base(args):
    wt103_base(args, TransformerXLConfig)


@register_model_architecture("trime_transformer_xl", "trime_transformer_xl_enwik8")
def trime_transformer_xl_enwik8(args):
    enwik8_base(args, TransformerXLConfig)


@register_model_architecture("trime_transformer_xl", "trime_transformer_xl_wikitext2_small")
def trime_transformer_xl_wikitext2_small(args):
    wikitext2_small(args, TransformerXLConfig)
