"""What Transformer-XL and LaMemo share: config, embeddings, output layer, masks, memory plumbing.

A :class:`RecurrentLMDecoder` runs one segment (B, T) at a time with a memory of
up to ``mem_len`` earlier positions per row. Subclasses implement
:meth:`RecurrentLMDecoder.run_layers` (the layer stack and what goes into the
memory); this class owns everything around it:

* token embedding (plain or adaptive input, scaled by √d) and the output layer
  (full softmax, tied or not, or fairseq's adaptive softmax);
* the memory: :class:`~trime_fairseq.models.recurrent_memory.RecurrentMemory`
  between batches of a stream, fairseq's ``incremental_state`` for generation;
* visibility masks (causal, ``same_length``, padded / invalid memory, documents);
* the TRIME keys: ``extra["trime_key"]`` (input of the last feed-forward block,
  after its layer norm in pre-norm models) and ``extra["trime_feature"]`` (what
  the output layer receives), both (B, T, d).
"""

import math
from dataclasses import MISSING, dataclass, field, fields
from typing import Optional, Tuple

import torch
from fairseq.models import FairseqLanguageModel
from fairseq.utils import safe_getattr
from omegaconf import II
from torch import Tensor, nn

from trime_fairseq.memory.keys import TRIME_FEATURE, TRIME_KEY
from trime_fairseq.models.dropout import Dropout
from trime_fairseq.models.recurrent_memory import MemoryState, RecurrentMemory, empty_state_like
from trime_fairseq.models.relative_attention import causal_distances, sinusoid_embedding
from trime_fairseq.models.token_io import (
    TokenIOConfig,
    TokenLMDecoder,
    build_output_layer,
    build_token_embedding,
    check_token_io,
)

@dataclass
class RecurrentLMConfig(TokenIOConfig):
    decoder_layers: int = field(default=16, metadata={"help": "number of layers"})
    decoder_embed_dim: int = field(default=410, metadata={"help": "model dimension d"})
    decoder_attention_heads: int = field(default=10, metadata={"help": "attention heads H"})
    decoder_head_dim: Optional[int] = field(
        default=None, metadata={"help": "dimension per head (default d / H, which must then divide)"}
    )
    decoder_ffn_embed_dim: int = field(default=2100, metadata={"help": "inner dimension of the feed-forward block"})
    decoder_normalize_before: bool = field(
        default=False, metadata={"help": "pre-norm layers (default: post-norm, as Transformer-XL / LaMemo)"}
    )
    dropout: float = field(default=0.1, metadata={"help": "dropout (embeddings, positions, residuals, FFN, output)"})
    attention_dropout: float = field(default=0.0, metadata={"help": "dropout on attention probabilities"})
    mem_len: int = field(default=150, metadata={"help": "recurrence memory length M (positions per layer)"})
    clamp_len: int = field(default=-1, metadata={"help": "clamp relative distances at this value (-1: off)"})
    same_length: bool = field(
        default=False, metadata={"help": "every query attends to the same number (mem_len) of most recent keys"}
    )
    doc_separator: Optional[str] = field(
        default=None,
        metadata={"help": "dictionary symbol (e.g. '</s>') whose input position starts a new document; "
        "attention and memory never cross into an earlier document (default: no documents)"},
    )
    max_target_positions: Optional[int] = II("task.max_target_positions")


def fill_defaults(args, config_cls, **overrides) -> None:
    """Architecture helper: set every field of ``config_cls`` that ``args`` lacks (``overrides`` first)."""
    for f in fields(config_cls):
        if f.name in overrides:
            default = overrides[f.name]
        elif f.default is not MISSING:
            default = f.default
        elif f.default_factory is not MISSING:  # type: ignore[misc]
            default = f.default_factory()  # type: ignore[misc]
        else:
            continue
        if isinstance(default, str) and default.startswith("${"):
            continue  # interpolation (max_target_positions): resolved by fairseq
        setattr(args, f.name, safe_getattr(args, f.name, default))


def tied_adaptive(cutoff: str, factor: float = 1) -> dict:
    """Architecture fields of an adaptive input and adaptive softmax with the same cutoffs, tied weights and
    projections (what the word-level architectures use)."""
    return dict(adaptive_input=True, adaptive_input_factor=factor, adaptive_input_cutoff=cutoff,
                adaptive_softmax_cutoff=cutoff, adaptive_softmax_factor=factor, adaptive_softmax_dropout=0.0,
                tie_adaptive_weights=True, tie_adaptive_proj=True)


def head_dim_of(cfg) -> int:
    dim, heads = cfg.decoder_embed_dim, cfg.decoder_attention_heads
    head_dim = safe_getattr(cfg, "decoder_head_dim", None)
    if heads <= 0:
        raise ValueError(f"decoder_attention_heads must be > 0, got {heads}")
    if head_dim is None:
        if dim % heads != 0:
            raise ValueError(
                f"decoder_embed_dim {dim} is not divisible by {heads} attention heads; "
                "set decoder_head_dim explicitly"
            )
        return dim // heads
    if head_dim <= 0:
        raise ValueError(f"decoder_head_dim must be > 0, got {head_dim}")
    return head_dim


def check_config(cfg) -> None:
    """Clear errors for settings that cannot work."""
    if cfg.decoder_layers < 1:
        raise ValueError(f"decoder_layers must be >= 1, got {cfg.decoder_layers}")
    if cfg.decoder_embed_dim <= 0 or cfg.decoder_embed_dim % 2 != 0:
        raise ValueError(f"decoder_embed_dim must be positive and even (sinusoids), got {cfg.decoder_embed_dim}")
    head_dim_of(cfg)
    if cfg.mem_len < 0:
        raise ValueError(f"mem_len must be >= 0, got {cfg.mem_len}")
    if cfg.clamp_len == 0 or cfg.clamp_len < -1:
        raise ValueError(f"clamp_len must be -1 (off) or > 0, got {cfg.clamp_len}")
    if cfg.same_length and cfg.mem_len == 0:
        raise ValueError("same_length needs mem_len > 0 (every query attends to the last mem_len keys)")
    for name in ("dropout", "attention_dropout", "adaptive_softmax_dropout"):
        value = safe_getattr(cfg, name, 0.0)
        if not 0.0 <= value < 1.0:
            raise ValueError(f"{name} must lie in [0, 1), got {value}")
    check_token_io(cfg)


class FeedForwardBlock(nn.Module):
    """Position-wise FFN with residual and layer norm; returns (output, TRIME key = FFN input after its norm)."""

    def __init__(self, dim: int, inner_dim: int, dropout: float, normalize_before: bool, activation=torch.relu):
        super().__init__()
        self.fc1 = nn.Linear(dim, inner_dim)
        self.fc2 = nn.Linear(inner_dim, dim)
        self.ffn_norm = nn.LayerNorm(dim)
        self.dropout = Dropout(dropout)
        self.normalize_before = normalize_before
        self.activation = activation

    def forward(self, h: Tensor) -> Tuple[Tensor, Tensor]:
        key = self.ffn_norm(h) if self.normalize_before else h
        y = self.fc2(self.dropout(self.activation(self.fc1(key))))
        y = h + self.dropout(y)
        if not self.normalize_before:
            y = self.ffn_norm(y)
        return y, key


class RecurrentLMDecoder(TokenLMDecoder):
    """Base decoder: everything but the layer stack (see module docstring)."""

    provides_trime_keys = True
    STATE_KEY = "recurrent_memory"

    def __init__(self, cfg, dictionary):
        super().__init__(dictionary)
        check_config(cfg)
        self.cfg = cfg
        self.embed_dim = cfg.decoder_embed_dim
        self.num_heads = cfg.decoder_attention_heads
        self.head_dim = head_dim_of(cfg)
        self.mem_len = cfg.mem_len
        self.clamp_len = cfg.clamp_len
        self.same_length = cfg.same_length
        self.padding_idx = dictionary.pad()
        self.doc_separator_idx = self._separator_index(dictionary, safe_getattr(cfg, "doc_separator", None))
        self.max_target_positions = safe_getattr(cfg, "max_target_positions", None)

        vocab = len(dictionary)
        self.embed_tokens = self._build_embedding(cfg, vocab)
        self.embed_scale = 1.0 if cfg.no_scale_embedding else math.sqrt(self.embed_dim)
        self.dropout_module = Dropout(cfg.dropout)
        # u and v of Eq. 6: global (shared across layers) content and position biases
        self.content_bias = nn.Parameter(torch.empty(self.num_heads, self.head_dim).normal_(0.0, 0.02))
        self.position_bias = nn.Parameter(torch.empty(self.num_heads, self.head_dim).normal_(0.0, 0.02))
        self.layers = nn.ModuleList([self.build_layer(cfg, i) for i in range(cfg.decoder_layers)])
        self.final_norm = nn.LayerNorm(self.embed_dim) if cfg.decoder_normalize_before else None
        self._build_output(cfg, vocab)
        self.recurrent_memory = RecurrentMemory()

    # -- construction -------------------------------------------------------------
    @staticmethod
    def _separator_index(dictionary, symbol: Optional[str]) -> Optional[int]:
        if symbol is None:
            return None
        index = dictionary.index(symbol)
        if index == dictionary.unk() and symbol != dictionary.unk_word:
            raise ValueError(f"doc_separator '{symbol}' is not in the dictionary")
        return index

    def _build_embedding(self, cfg, vocab: int) -> nn.Module:
        return build_token_embedding(cfg, vocab, self.embed_dim, self.padding_idx)

    def _build_output(self, cfg, vocab: int) -> None:
        self.adaptive_softmax, self.output_projection = build_output_layer(cfg, vocab, self.embed_dim, self.embed_tokens)

    def build_layer(self, cfg, index: int) -> nn.Module:
        raise NotImplementedError

    # -- the part subclasses implement ------------------------------------------------
    def run_layers(
        self, x: Tensor, valid: Tensor, doc: Optional[Tensor], state: Optional[MemoryState]
    ) -> Tuple[Tensor, Tensor, Optional[MemoryState]]:
        """x: (B, T, d) embedded segment; valid: (B, T) non-pad; doc: (B, T) document ids or None;
        state: the memory (None: empty). Returns (features, TRIME key, new memory state)."""
        raise NotImplementedError

    # -- positions and masks ------------------------------------------------------------
    def position_embeddings(self, distances: Tensor, like: Tensor) -> Tensor:
        """Sinusoids of ``distances`` (L,) with dropout: (L, d) in ``like``'s dtype."""
        return self.dropout_module(sinusoid_embedding(distances, self.embed_dim).to(like.dtype))

    def causal_positions(self, klen: int, like: Tensor) -> Tensor:
        return self.position_embeddings(causal_distances(klen, self.clamp_len, like.device), like)

    def causal_visibility(
        self, mem_valid: Tensor, valid: Tensor, mem_doc: Optional[Tensor], doc: Optional[Tensor]
    ) -> Tensor:
        """Which keys [memory ; segment] each segment position sees: bool (B, 1, T, M + T)."""
        mlen, qlen = mem_valid.size(1), valid.size(1)
        device = valid.device
        q_pos = torch.arange(qlen, device=device).unsqueeze(1) + mlen  # (T, 1) absolute in the block
        k_pos = torch.arange(mlen + qlen, device=device).unsqueeze(0)  # (1, K)
        visible = k_pos <= q_pos
        if self.same_length:
            visible = visible & (k_pos > q_pos - self.mem_len)
        key_valid = torch.cat([mem_valid, valid], dim=1)  # (B, K)
        visible = visible.unsqueeze(0) & key_valid.unsqueeze(1)  # (B, T, K)
        if doc is not None:
            key_doc = torch.cat([mem_doc, doc], dim=1)
            visible = visible & (key_doc.unsqueeze(1) == doc.unsqueeze(2))
        return visible.unsqueeze(1)

    def document_ids(self, tokens: Tensor, state: Optional[MemoryState]) -> Optional[Tensor]:
        """(B, T) document index of every position (continuing the memory's), or None without documents."""
        if self.doc_separator_idx is None:
            return None
        starts = tokens.eq(self.doc_separator_idx).long().cumsum(dim=1)
        if state is not None and "doc" in state and state["doc"].size(1) > 0:
            starts = starts + state["doc"][:, -1:]
        return starts

    def trim(self, memory: Tensor, new: Tensor) -> Tensor:
        """Last mem_len positions of [memory ; new] along dim 1."""
        cat = torch.cat([memory, new], dim=1) if memory.size(1) > 0 else new
        return cat[:, max(0, cat.size(1) - self.mem_len) :]

    def memory_bookkeeping(self, state: MemoryState, valid: Tensor, doc: Optional[Tensor]) -> MemoryState:
        """``valid`` / ``doc`` entries of the next memory."""
        out = {"valid": self.trim(state["valid"], valid)}
        if doc is not None:
            out["doc"] = self.trim(state["doc"], doc)
        return out

    # -- fairseq interface ------------------------------------------------------------------
    def extract_features(self, prev_output_tokens: Tensor, encoder_out=None, incremental_state=None, **kwargs):
        tokens = prev_output_tokens
        bsz = tokens.size(0)
        if incremental_state is not None:
            state = self.get_incremental_state(incremental_state, self.STATE_KEY)
            if state is not None:  # generation: only the tokens not seen yet
                tokens = tokens[:, int(state["steps"][0]) :]
        else:
            state = self.recurrent_memory.read(bsz, self.training)
        if tokens.size(1) == 0:
            raise ValueError("no new tokens to process (incremental state already covers the input)")

        valid = tokens.ne(self.padding_idx)
        doc = self.document_ids(tokens, state)
        x = self.dropout_module(self.embed_scale * self.embed_tokens(tokens))
        if state is None:
            state = empty_state_like(tokens)
        features, key, new_state = self.run_layers(x, valid, doc, state)
        if self.final_norm is not None:
            features = self.final_norm(features)
        features = self.dropout_module(features)

        if incremental_state is not None:
            steps = state.get("steps", torch.zeros(bsz, dtype=torch.long, device=tokens.device))
            new_state = dict(new_state or {})
            new_state["steps"] = steps + tokens.size(1)
            self.set_incremental_state(incremental_state, self.STATE_KEY, {k: v.detach() for k, v in new_state.items()})
        else:
            self.recurrent_memory.write(new_state if self.mem_len > 0 else None, bsz, self.training)
        extra = {"attn": None, "inner_states": None, TRIME_KEY: key, TRIME_FEATURE: features}
        return features, extra


class RecurrentLanguageModel(FairseqLanguageModel):
    """A fairseq language model around a :class:`RecurrentLMDecoder` subclass."""

    decoder_class = RecurrentLMDecoder

    @classmethod
    def build_model(cls, cfg, task):
        return cls(cls.decoder_class(cfg, task.target_dictionary))

    @property
    def recurrent_memory(self) -> RecurrentMemory:
        return self.decoder.recurrent_memory
