"""``alibi_lm``: a decoder-only transformer with ALiBi attention biases (Press et al. 2022).

LongMem's backbone LLM (its "GPT-2*", LongMem Table 7): pre-norm layers, no position
embeddings; query i and key j of head h get the bias −m_h·(i − j), m_h the geometric
slopes of :func:`alibi_slopes`. Train it with ``fairseq-train --arch alibi_lm_*`` and any
criterion of this project (cross_entropy / adaptive_loss / trime_loss).

The hook LongMem builds on is :meth:`AlibiLMDecoder.encode`: one pass over a segment that
returns every layer's hidden state H^0 (embedding output) … H^L' and every layer's
attention keys / values of the segment (:class:`BackboneStates`).

| architecture                | layers | d    | heads × dim | ffn  | softmax                     | tied |
|-----------------------------|--------|------|-------------|------|-----------------------------|------|
| alibi_lm_gpt2_medium        | 24     | 1024 | 16 × 64     | 4096 | full                        | no   |
| alibi_lm_wikitext2_small    | 8      | 128  | 4 × 32      | 512  | adaptive 2k,10k (factor 1)  | no   |

The dictionary the model was trained with is fingerprinted in the state dict
(``decoder.dictionary_checksum``): loading the weights under another dictionary is an error.
"""

import math
from dataclasses import dataclass, field
from typing import Dict, List, NamedTuple, Optional, Tuple

import torch
from fairseq import utils
from fairseq.dataclass import ChoiceEnum
from fairseq.models import FairseqLanguageModel, register_model, register_model_architecture
from omegaconf import II
from torch import Tensor, nn

from trime_fairseq.checksums import dictionary_checksum
from trime_fairseq.memory.keys import TRIME_FEATURE, TRIME_KEY
from trime_fairseq.memory.mixing import fp32
from trime_fairseq.models.recurrent_decoder import FeedForwardBlock, fill_defaults
from trime_fairseq.models.recurrent_memory import MemoryState
from trime_fairseq.models.relative_attention import masked_softmax
from trime_fairseq.models.token_io import (
    TokenIOConfig,
    TokenLMDecoder,
    build_output_layer,
    build_token_embedding,
    check_token_io,
)

KeyValue = Tuple[Tensor, Tensor]  # keys, values: (B, T, H, D) each


# -- ALiBi attention core ------------------------------------------------------------------------


def alibi_slopes(num_heads: int, device=None) -> Tensor:
    """m_h (H,) float32: 2^(−8h/n) for h = 1 … n when n is a power of two; otherwise the n' = 2^⌊log2 n⌋
    slopes followed by every other slope of 2n' (Press et al. 2022, their reference code)."""
    if num_heads < 1:
        raise ValueError(f"ALiBi needs at least one head, got {num_heads}")

    def power_of_two(n: int) -> List[float]:
        return [2.0 ** (-8.0 * (h + 1) / n) for h in range(n)]

    closest = 2 ** int(math.floor(math.log2(num_heads)))
    slopes = power_of_two(closest) + power_of_two(2 * closest)[0::2][: num_heads - closest]
    return torch.tensor(slopes, dtype=torch.float32, device=device)


def alibi_scores(q: Tensor, k: Tensor, slopes: Tensor) -> Tensor:
    """Scaled dot products plus ALiBi biases: (B, Q, H, D) × (B, K, H, D) -> (B, H, Q, K).

    The Q queries are the last Q of the K key positions (keys = [cache ; segment]); the
    bias of query i and key j is −m_h·(i − j) (future keys get 0: they are masked anyway).
    float32 for half-precision inputs (float64 stays float64).
    """
    qlen, klen = q.size(1), k.size(1)
    scores = torch.einsum("bqhd,bkhd->bhqk", fp32(q), fp32(k)) / math.sqrt(q.size(-1))
    q_pos = torch.arange(klen - qlen, klen, device=q.device).unsqueeze(1)
    distance = (q_pos - torch.arange(klen, device=q.device).unsqueeze(0)).clamp(min=0)  # (Q, K)
    return scores - slopes.to(scores.dtype).view(-1, 1, 1) * distance.to(scores.dtype)


def causal_visibility(key_valid: Tensor, qlen: int) -> Tensor:
    """(B, K) bool non-padding keys -> (B, 1, Q, K): the last Q positions see themselves and earlier valid keys."""
    klen = key_valid.size(1)
    q_pos = torch.arange(klen - qlen, klen, device=key_valid.device).unsqueeze(1)
    causal = torch.arange(klen, device=key_valid.device).unsqueeze(0) <= q_pos  # (Q, K)
    return (causal.unsqueeze(0) & key_valid.unsqueeze(1)).unsqueeze(1)


class AlibiAttention(nn.Module):
    """W_q, W_k, W_v, W_o with biases (GPT-2). Projects only; the layer does the attention."""

    def __init__(self, embed_dim: int, num_heads: int):
        super().__init__()
        if embed_dim % num_heads != 0:
            raise ValueError(f"decoder_embed_dim {embed_dim} is not divisible by {num_heads} attention heads")
        self.num_heads, self.head_dim = num_heads, embed_dim // num_heads
        self.q_proj = nn.Linear(embed_dim, embed_dim)
        self.k_proj = nn.Linear(embed_dim, embed_dim)
        self.v_proj = nn.Linear(embed_dim, embed_dim)
        self.out_proj = nn.Linear(embed_dim, embed_dim)
        for proj in (self.q_proj, self.k_proj, self.v_proj, self.out_proj):
            nn.init.xavier_uniform_(proj.weight)
            nn.init.zeros_(proj.bias)

    def _heads(self, x: Tensor) -> Tensor:
        return x.view(*x.shape[:-1], self.num_heads, self.head_dim)

    def project(self, h: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """(B, T, d) -> q, k, v (B, T, H, D)."""
        return self._heads(self.q_proj(h)), self._heads(self.k_proj(h)), self._heads(self.v_proj(h))

    def out(self, context: Tensor) -> Tensor:
        """(B, T, H, D) -> (B, T, d)."""
        return self.out_proj(context.reshape(*context.shape[:-2], -1))


class AlibiLayer(nn.Module):
    """Pre-norm block: x + Attn(LN(x)), then x + FFN(LN(x)). Subclasses change :meth:`attend`."""

    def __init__(self, cfg):
        super().__init__()
        dim = cfg.decoder_embed_dim
        self.attn_norm = nn.LayerNorm(dim)
        self.self_attn = AlibiAttention(dim, cfg.decoder_attention_heads)
        self.attn_dropout = nn.Dropout(cfg.attention_dropout)
        self.dropout = nn.Dropout(cfg.dropout)
        activation = utils.get_activation_fn(str(cfg.activation_fn))
        self.ffn = FeedForwardBlock(dim, cfg.decoder_ffn_embed_dim, cfg.dropout, True, activation)
        self.register_buffer("slopes", alibi_slopes(cfg.decoder_attention_heads), persistent=False)

    def local_attention(self, q: Tensor, k: Tensor, v: Tensor, visible: Tensor) -> Tensor:
        """softmax(q·k/√D − ALiBi) v over the visible keys: (B, Q, H, D) in v's dtype."""
        probs, _ = masked_softmax(alibi_scores(q, k, self.slopes), visible)  # (B, H, Q, K)
        return torch.einsum("bhqk,bkhd->bqhd", self.attn_dropout(probs).to(v.dtype), v)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, visible: Tensor, memory) -> Tensor:
        if memory is not None:
            raise ValueError(f"{type(self).__name__} has no memory")
        return self.local_attention(q, k, v, visible)

    def forward(
        self, x: Tensor, visible: Tensor, past: Optional[KeyValue] = None, memory=None
    ) -> Tuple[Tensor, Tensor, KeyValue]:
        """x (B, T, d); visible (B, 1, T, S + T) over [past ; segment]; past: keys / values (B, S, H, D).

        Returns (output (B, T, d), TRIME key = FFN input after its norm (B, T, d), this segment's k, v)."""
        q, k, v = self.self_attn.project(self.attn_norm(x))
        k_all, v_all = (k, v) if past is None else (torch.cat([past[0], k], 1), torch.cat([past[1], v], 1))
        context = self.attend(q, k_all, v_all, visible, memory)
        x = x + self.dropout(self.self_attn.out(context))
        x, key = self.ffn(x)
        return x, key, (k, v)


# -- the language model --------------------------------------------------------------------------


@dataclass
class AlibiLMConfig(TokenIOConfig):
    decoder_layers: int = field(default=24, metadata={"help": "number of layers L'"})
    decoder_embed_dim: int = field(default=1024, metadata={"help": "model dimension d"})
    decoder_attention_heads: int = field(default=16, metadata={"help": "attention heads H (d / H per head)"})
    decoder_ffn_embed_dim: int = field(default=4096, metadata={"help": "inner dimension of the feed-forward block"})
    activation_fn: ChoiceEnum(["relu", "gelu"]) = field(default="gelu", metadata={"help": "FFN activation"})
    dropout: float = field(default=0.1, metadata={"help": "dropout on embeddings, residual branches and FFN"})
    attention_dropout: float = field(default=0.0, metadata={"help": "dropout on attention probabilities"})
    max_target_positions: Optional[int] = II("task.max_target_positions")


def check_alibi_config(cfg) -> None:
    if cfg.decoder_layers < 1:
        raise ValueError(f"decoder_layers must be >= 1, got {cfg.decoder_layers}")
    if cfg.decoder_attention_heads < 1 or cfg.decoder_embed_dim % cfg.decoder_attention_heads != 0:
        raise ValueError(
            f"decoder_embed_dim {cfg.decoder_embed_dim} is not divisible by {cfg.decoder_attention_heads} attention heads"
        )
    for name in ("dropout", "attention_dropout"):
        if not 0.0 <= getattr(cfg, name) < 1.0:
            raise ValueError(f"{name} must lie in [0, 1), got {getattr(cfg, name)}")
    check_token_io(cfg)


class BackboneStates(NamedTuple):
    hidden: List[Tensor]  # L' + 1 tensors (B, T, d): H^0 = embedding output, H^l = output of layer l
    key_values: List[KeyValue]  # per layer: the segment's attention keys / values (B, T, H, D)
    key: Tensor  # (B, T, d) TRIME key: input of the last FFN after its norm
    features: Tensor  # (B, T, d) final layer norm of H^L' (what the output layer reads)


def _checksum_tensor(dictionary) -> Tensor:
    return torch.tensor(list(bytes.fromhex(dictionary_checksum(dictionary))), dtype=torch.uint8)


class AlibiLMDecoder(TokenLMDecoder):
    provides_trime_keys = True
    STATE_KEY = "alibi_cache"

    def __init__(self, cfg, dictionary):
        super().__init__(dictionary)
        check_alibi_config(cfg)
        self.cfg = cfg
        self.embed_dim = cfg.decoder_embed_dim
        self.num_heads = cfg.decoder_attention_heads
        self.head_dim = self.embed_dim // self.num_heads
        self.padding_idx = dictionary.pad()
        self.max_target_positions = getattr(cfg, "max_target_positions", None)
        vocab = len(dictionary)
        self.embed_tokens = build_token_embedding(cfg, vocab, self.embed_dim, self.padding_idx)
        self.embed_scale = 1.0 if cfg.no_scale_embedding else math.sqrt(self.embed_dim)
        self.dropout_module = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList([AlibiLayer(cfg) for _ in range(cfg.decoder_layers)])
        self.final_norm = nn.LayerNorm(self.embed_dim)
        self.adaptive_softmax, self.output_projection = build_output_layer(
            cfg, vocab, self.embed_dim, self.embed_tokens
        )
        self.register_buffer("dictionary_checksum", _checksum_tensor(dictionary))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        stored = state_dict.get(prefix + "dictionary_checksum")
        if stored is not None and not torch.equal(stored.cpu(), self.dictionary_checksum.cpu()):
            raise ValueError(
                "these alibi_lm weights were trained with another dictionary than the task's "
                f"({len(self.dictionary)} symbols): token ids would not mean the same words"
            )
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # -- the hook ------------------------------------------------------------------------------
    def embed(self, tokens: Tensor) -> Tensor:
        """H^0 (B, T, d): scaled token embeddings after dropout (no position embeddings)."""
        return self.dropout_module(self.embed_scale * self.embed_tokens(tokens))

    def encode(self, tokens: Tensor, cache: Optional[MemoryState] = None) -> BackboneStates:
        """One pass over ``tokens`` (B, T), attending to ``cache`` (``k.{i}``/``v.{i}`` (B, S, H, D),
        ``valid`` (B, S)) first when given (generation)."""
        valid = tokens.ne(self.padding_idx)
        key_valid = valid if cache is None else torch.cat([cache["valid"], valid], dim=1)
        visible = causal_visibility(key_valid, tokens.size(1))  # (B, 1, T, S + T)
        x = self.embed(tokens)
        hidden, key_values, key = [x], [], x
        for i, layer in enumerate(self.layers):
            past = None if cache is None else (cache[f"k.{i}"], cache[f"v.{i}"])
            x, key, kv = layer(x, visible, past)
            hidden.append(x)
            key_values.append(kv)
        return BackboneStates(hidden, key_values, key, self.final_norm(x))

    # -- fairseq interface ---------------------------------------------------------------------
    def extract_features(self, prev_output_tokens: Tensor, encoder_out=None, incremental_state=None, **kwargs):
        cache = None
        tokens = prev_output_tokens
        if incremental_state is not None:
            cache = self.get_incremental_state(incremental_state, self.STATE_KEY)
            if cache is not None:
                tokens = tokens[:, cache["valid"].size(1) :]
        states = self.encode(tokens, cache)
        if incremental_state is not None:
            self.set_incremental_state(incremental_state, self.STATE_KEY, extend_cache(cache, tokens, states, self.padding_idx))
        extra = {"attn": None, "inner_states": None, TRIME_KEY: states.key, TRIME_FEATURE: states.features}
        return states.features, extra


def extend_cache(cache: Optional[MemoryState], tokens: Tensor, states: BackboneStates, pad: int) -> MemoryState:
    """The generation cache after ``tokens``: every layer's keys / values and the validity of the positions."""
    new: Dict[str, Tensor] = {"valid": tokens.ne(pad)}
    for i, (k, v) in enumerate(states.key_values):
        new[f"k.{i}"], new[f"v.{i}"] = k.detach(), v.detach()
    if cache is None:
        return new
    return {name: torch.cat([cache[name], value], dim=1) for name, value in new.items()}


@register_model("alibi_lm", dataclass=AlibiLMConfig)
class AlibiLanguageModel(FairseqLanguageModel):
    @classmethod
    def build_model(cls, cfg, task):
        return cls(AlibiLMDecoder(cfg, task.target_dictionary))


@register_model_architecture("alibi_lm", "alibi_lm_gpt2_medium")
def alibi_lm_gpt2_medium(args):
    """LongMem's backbone (Table 7): 24 layers, 1024, 16 heads × 64, ffn 4096, untied full softmax."""
    fill_defaults(args, AlibiLMConfig, decoder_layers=24, decoder_embed_dim=1024, decoder_attention_heads=16,
                  decoder_ffn_embed_dim=4096, dropout=0.1, attention_dropout=0.0)


@register_model_architecture("alibi_lm", "alibi_lm_wikitext2_small")
def alibi_lm_wikitext2_small(args):
    """CPU setting for WikiText-2 (docs/results_longmem.md): 8 layers, 128, 4 heads, ffn 512, adaptive 2k/10k."""
    fill_defaults(args, AlibiLMConfig, decoder_layers=8, decoder_embed_dim=128, decoder_attention_heads=4,
                  decoder_ffn_embed_dim=512, dropout=0.1, attention_dropout=0.0,
                  adaptive_softmax_cutoff="2000,10000", adaptive_softmax_factor=1, adaptive_softmax_dropout=0.0)
