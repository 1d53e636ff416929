"""``spalm``: SPALM (Yogatama et al. 2021), Transformer-XL with a gated long-term memory of precomputed neighbours.

The decoder is ``trime_transformer_xl`` (relative attention, recurrence memory of
``mem_len`` positions) up to its last hidden state h_t (B, T, d). For every position
the batch carries the tokens y_1..y_K stored with the K datastore entries nearest to
the context before t (``trime-neighbours``: keys from a separate, frozen, vanilla LM;
``net_input["neighbour_tokens"]`` (B, T, K)). The first k of them (``spalm_k``) are
embedded with the model's own input embeddings y_k -- tied with the output layer --
and fused with h_t by a context-dependent gate (paper §2.3):

    m_t = Σ_k softmax_k(y_k·h_t) y_k      (softmax over the position's neighbours only)
    g_t = σ(w_g·h_t)                      (a scalar per position)
    z_t = (1 − g_t)·m_t + g_t·h_t         (z_t = h_t where a position has no neighbour)
    p(x_{t+1} | x_≤t) = softmax(W z_t)    (W: the tied embeddings; fairseq's adaptive softmax)

w_g (d,) is the only new parameter (zero at the start: g = 1/2). The paper writes
the gate with a parameter *vector* w_g, so g_t is a scalar, as here (its Fig. 6 shows
per-dimension gate heat maps, which a scalar gate does not have). The neighbours'
keys never enter the model: gradients reach w_g, the embeddings (through y_k) and the
Transformer-XL, nothing else. The fusion does not feed back into the layers or the
recurrence memory, so with g_t = 1 (or no neighbours) the model *is* Transformer-XL.

``extra`` of the output adds ``neighbour_tokens`` / ``neighbour_scores`` (the k used,
(B, T, k)), ``spalm_gate`` g (B, T), ``spalm_hidden`` h and ``spalm_memory`` m (B, T, d);
``trime_feature`` is z_t (what the output layer receives), ``trime_key`` the Transformer-XL's.

| architecture           | layers | d   | heads × dim | ffn  | mem train (tgt) | k | dropout | softmax | params |
|------------------------|--------|-----|-------------|------|-----------------|---|---------|---------|--------|
| spalm_wt103            | 18     | 512 | 8 × 64      | 5376 | 512 (512)       | 4 | 0.25    | adaptive 20k,40k,200k (factor 4), tied | 142M (WikiText-103 vocabulary) |
| spalm_enwik8           | 24     | 512 | 8 × 64      | 2944 | 1536 (768)      | 2 | 0.25    | full, tied | 104M (204 symbols) |
| spalm_wikitext2_small  | 4      | 128 | 4 × 32      | 512  | 64 (64)         | 4 | 0.2     | adaptive 2k,10k, tied | = trime_transformer_xl_wikitext2_small + 128 |

The paper gives layers, d, sequence and memory lengths, k, dropout and parameter counts, not
the heads or the feed-forward size: ours use 8 heads of 64 and the feed-forward size that gives
its count (WikiText-103: the paper's 33k subword table of 512 is ≈ 17M; ours, 267k words with
adaptive input factor 4, ≈ 18.5M).

Train with ``--task trime_lm --batching stream --neighbours DIR`` (``DIR/train`` and
``DIR/valid`` written by ``trime-neighbours``); evaluate with ``fairseq-eval-lm
--neighbours DIR`` in stream order (``--batching stream``) or with ``--context-window``.
"""

from dataclasses import dataclass, field
from typing import Optional, Tuple

import torch
from fairseq.models import register_model, register_model_architecture
from torch import Tensor, nn

from trime_fairseq.memory.keys import NEIGHBOUR_SCORES, NEIGHBOUR_TOKENS, TRIME_FEATURE
from trime_fairseq.models.recurrent_decoder import RecurrentLanguageModel, fill_defaults, tied_adaptive
from trime_fairseq.models.relative_attention import masked_softmax
from trime_fairseq.models.transformer_xl import TransformerXLConfig, TransformerXLDecoder, wikitext2_small

SPALM_GATE = "spalm_gate"  # extra: g (B, T)
SPALM_HIDDEN = "spalm_hidden"  # extra: h (B, T, d), the Transformer-XL's output
SPALM_MEMORY = "spalm_memory"  # extra: m (B, T, d), the attended neighbour embeddings (0 without neighbours)


@dataclass
class SpalmConfig(TransformerXLConfig):
    spalm_k: int = field(
        default=4,
        metadata={"help": "neighbours per position the gate attends to: the first k (best first) of the "
        "--neighbours file, which must hold at least k (paper: 4 for words, 2 for characters)"},
    )
    spalm_scale_values: bool = field(
        default=False,
        metadata={"help": "embed the neighbours' tokens as the model embeds its input tokens, i.e. times √d "
        "(default: the bare embedding rows, as the paper writes y_k; see docs/results_spalm.md)"},
    )
    spalm_detach_values: bool = field(
        default=False,
        metadata={"help": "stop the gradient through the neighbours' value embeddings y_k (the memory still "
        "trains the gate and h; the tied embeddings learn only as input and output layer): the control of "
        "docs/results_spalm.md for the memory's gradient weakening the body"},
    )


class SpalmDecoder(TransformerXLDecoder):
    """Transformer-XL whose output features are fused with the neighbours' embeddings by a gate."""

    def __init__(self, cfg, dictionary):
        super().__init__(cfg, dictionary)
        if cfg.spalm_k < 1:
            raise ValueError(f"spalm_k must be >= 1, got {cfg.spalm_k}")
        if not (cfg.tie_adaptive_weights or cfg.share_decoder_input_output_embed):
            raise ValueError(
                "SPALM embeds neighbour tokens with the word embeddings shared by input and output: set "
                "tie_adaptive_weights (adaptive input/softmax) or share_decoder_input_output_embed"
            )
        self.spalm_k = cfg.spalm_k
        self.value_scale = self.embed_scale if cfg.spalm_scale_values else 1.0
        self.detach_values = cfg.spalm_detach_values
        self.gate_weight = nn.Parameter(torch.zeros(self.embed_dim))  # w_g (d,)

    def output_features(self, h: Tensor, extra: dict, tokens: Tensor, incremental_state=None,
                        neighbour_tokens: Optional[Tensor] = None, neighbour_scores: Optional[Tensor] = None,
                        **inputs) -> Tensor:
        """z (B, T, d) from the Transformer-XL's h and the batch's neighbours; ``extra`` gets the k
        neighbours used, the gate and z as ``trime_feature``."""
        if incremental_state is not None:
            raise ValueError("SPALM reads precomputed neighbours of every position; incremental decoding "
                             "(generation) is not supported")
        nb_tokens, nb_scores = self.select_neighbours(tokens, neighbour_tokens, neighbour_scores)
        z, gate, m = self.fuse(h, nb_tokens)
        extra.update({TRIME_FEATURE: z, NEIGHBOUR_TOKENS: nb_tokens, NEIGHBOUR_SCORES: nb_scores, SPALM_GATE: gate,
                      SPALM_HIDDEN: h, SPALM_MEMORY: m})
        return z

    def select_neighbours(
        self, src_tokens: Tensor, tokens: Optional[Tensor], scores: Optional[Tensor]
    ) -> Tuple[Tensor, Optional[Tensor]]:
        """The first ``spalm_k`` neighbours of every position: tokens (B, T, k), scores (B, T, k) or None."""
        if tokens is None:
            raise ValueError(
                "spalm needs the precomputed neighbours of every position in the batch "
                f"(net_input['{NEIGHBOUR_TOKENS}']): train and evaluate with --task trime_lm --neighbours DIR "
                "(written by trime-neighbours)"
            )
        if tokens.dim() != 3 or tokens.shape[:2] != src_tokens.shape:
            raise ValueError(f"neighbours {tuple(tokens.shape)} do not match the batch {tuple(src_tokens.shape)}: "
                             "expected (B, T, K)")
        if tokens.size(-1) < self.spalm_k:
            raise ValueError(f"the batch carries {tokens.size(-1)} neighbours per position but the model uses "
                             f"spalm_k = {self.spalm_k}: write the neighbour files with trime-neighbours --k "
                             f"{self.spalm_k} (or more)")
        if scores is not None and scores.shape != tokens.shape:
            raise ValueError(f"neighbour scores {tuple(scores.shape)} do not match their tokens {tuple(tokens.shape)}")
        k = self.spalm_k
        return tokens[..., :k], (scores[..., :k] if scores is not None else None)

    def gate(self, h: Tensor) -> Tensor:
        """g_t = σ(w_g·h_t): (B, T, d) -> (B, T)."""
        return torch.sigmoid(h @ self.gate_weight.to(h.dtype))

    def fuse(self, h: Tensor, neighbour_tokens: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """z (B, T, d), the gate (B, T) and m (B, T, d) from h (B, T, d) and neighbour tokens (B, T, k)
        (padding: none)."""
        visible = neighbour_tokens.ne(self.padding_idx)  # (B, T, k)
        distinct, index = torch.unique(neighbour_tokens, return_inverse=True)  # each token embedded once
        rows = self.embed_tokens(distinct)  # (U, d)
        if self.detach_values:
            rows = rows.detach()
        y = (self.value_scale * rows).to(h.dtype)[index]  # (B, T, k, d), tied with W
        attention, _ = masked_softmax(torch.einsum("btkd,btd->btk", y, h), visible)  # float32, 0 where none
        m = torch.einsum("btk,btkd->btd", attention.to(h.dtype), y)  # (B, T, d)
        g = self.gate(h)  # (B, T)
        gated = (1.0 - g).unsqueeze(-1) * m + g.unsqueeze(-1) * h
        z = torch.where(visible.any(-1, keepdim=True), gated, h)
        return z, g, m


@register_model("spalm", dataclass=SpalmConfig)
class SpalmModel(RecurrentLanguageModel):
    decoder_class = SpalmDecoder
    reads_neighbours = True  # the task feeds --neighbours to models that say so


# -- architectures --------------------------------------------------------------------------------


@register_model_architecture("spalm", "spalm_wt103")
def spalm_wt103(args):
    """WikiText-103, paper §4.2: 18 layers, d 512, sequence and memory 512, k 4, dropout 0.25, adaptive softmax
    (the paper's 142M use a 33k subword vocabulary; with WikiText-103's 267k words, adaptive input factor 4)."""
    fill_defaults(
        args,
        SpalmConfig,
        decoder_layers=18,
        decoder_embed_dim=512,
        decoder_attention_heads=8,
        decoder_head_dim=64,
        decoder_ffn_embed_dim=5376,  # not in the paper: the size that gives its 142M
        dropout=0.25,
        attention_dropout=0.0,
        mem_len=512,
        spalm_k=4,
        **tied_adaptive("20000,40000,200000", factor=4),
    )


@register_model_architecture("spalm", "spalm_enwik8")
def spalm_enwik8(args):
    """enwik8, paper §4.4: 24 layers, d 512, sequence 768, memory 1536 (4096 at evaluation), k 2, full tied softmax."""
    fill_defaults(
        args,
        SpalmConfig,
        decoder_layers=24,
        decoder_embed_dim=512,
        decoder_attention_heads=8,
        decoder_head_dim=64,
        decoder_ffn_embed_dim=2944,  # not in the paper: the size that gives its 104M (Table 4)
        dropout=0.25,
        attention_dropout=0.0,
        mem_len=1536,
        spalm_k=2,
        share_decoder_input_output_embed=True,
    )


@register_model_architecture("spalm", "spalm_wikitext2_small")
def spalm_wikitext2_small(args):
    """CPU setting for WikiText-2: trime_transformer_xl_wikitext2_small (4 × 128, mem 64) with k 4."""
    wikitext2_small(args, SpalmConfig)  # spalm_k: the config's default, 4
