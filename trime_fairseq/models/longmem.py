"""``longmem``: LongMem (Wang et al. 2023, *Augmenting Language Models with Long-Term Memory*).

A frozen ``alibi_lm`` backbone (``--backbone-path``) encodes every segment; a residual
SideNet reads its hidden states and a cached memory bank of the backbone's layer-m
attention keys / values of the stream's earlier segments. Per segment x (B, T) of a stream:

1. backbone, eval mode, no gradient: H^0 (embedding output) … H^L' and layer m's keys / values;
2. SideNet, L = L'/2 ALiBi layers: H_side^0 = H^0,
   H_side^l = f_l(H_side^{l−1}) + (H^{2l} − H^{2l−2})  (Eq. 1, cross-network residuals);
   layer ``memory_layer`` is memory-augmented: with A = local ALiBi attention and M = attention
   over the K pairs its queries retrieve from the bank (no position bias),
   output = σ(g_h)·A + (1 − σ(g_h))·M per head h (Eq. 2-3); a query with nothing retrieved gets A;
3. next-token logits from the backbone's (frozen, shared) output layer on the SideNet's final norm;
4. after the segment has been scored, layer m's keys / values of its non-padding tokens enter the
   row's bank (:class:`~trime_fairseq.memory.bank.ChunkMemoryBank`, the latest ``memory_size`` tokens).

Initialisation (LongMem §2.2, the public code's mapping): SideNet layer l (1-based) copies backbone
layer 2l, so the paper's memory layer 9 of 12 starts as backbone layer 18 = m, the layer whose keys
fill the bank (its queries and the bank's keys start in the same space); the final norm copies the
backbone's; the gate g starts at 0 (σ(g) = 0.5). Only the SideNet (layers, gate, final norm) trains.

Streams. The bank of row b holds row b's earlier tokens only. It lives in the decoder's
:class:`~trime_fairseq.models.recurrent_memory.RecurrentMemory`, which ``trime_lm --batching stream``
enables (every row continues its stream, LongMem §3.1's batchfying) and resets at every epoch,
validation pass, train/eval switch and batch-size change. Without stream order the bank would silently
stay empty: that is an error (unless ``memory_size`` is 0). ``bank_reset=document`` also empties a row at
a WikiText article start, decided from input tokens only: position s starts an article iff
x_{s−2} = eos, x_{s−1} = "=", x_s ≠ "=" (the first title word of a `` = Title = `` line); from s on the
row's queries see no earlier entry, and the bank restarts with the tokens from s. (Local attention is
not cut: the keys of the tokens from s on may carry context of the previous article's tail in the same
segment, as every model of this project reads its whole input row.)

Generation (``fairseq-generate`` / sampling): ``incremental_state`` carries the backbone's and the
SideNet's keys / values of the current segment and the bank; a segment holds ``tokens_per_sample``
tokens as in training, then enters the bank and the next one starts (same blocks as ``fairseq-eval-lm``).
"""

import logging
import math
import os
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Callable, Dict, List, Optional, Tuple

import torch
from fairseq import checkpoint_utils
from fairseq.dataclass import ChoiceEnum, FairseqDataclass
from fairseq.models import (
    ARCH_MODEL_REGISTRY,
    FairseqLanguageModel,
    register_model,
    register_model_architecture,
)
from omegaconf import II
from torch import Tensor, nn

from trime_fairseq.memory.documents import HEADING, DocumentBoundaries
from trime_fairseq.memory.bank import SEARCHES, BankConfig, ChunkMemoryBank
from trime_fairseq.memory.keys import TRIME_FEATURE, TRIME_KEY
from trime_fairseq.memory.mixing import fp32
from trime_fairseq.memory.sources import MemoryBatch
from trime_fairseq.models.alibi_lm import AlibiLanguageModel, AlibiLayer, AlibiLMDecoder, causal_visibility
from trime_fairseq.models.recurrent_decoder import fill_defaults
from trime_fairseq.models.recurrent_memory import MemoryState, RecurrentMemory
from trime_fairseq.models.relative_attention import masked_softmax
from trime_fairseq.models.token_io import UNBOUNDED_POSITIONS, TokenLMDecoder

logger = logging.getLogger(__name__)

BANK = "bank."  # prefix of the bank's tensors in a memory state
Retriever = Callable[[Tensor, float], MemoryBatch]  # (queries (B, T, H, D), scale) -> memory batch


@dataclass
class LongMemConfig(FairseqDataclass):
    backbone_path: Optional[str] = field(
        default=None, metadata={"help": "frozen backbone: an alibi_lm checkpoint (fairseq-train --arch alibi_lm_*)"}
    )
    memory_size: int = field(
        default=65536, metadata={"help": "M: tokens per stream in the memory bank (0: no memory)"}
    )
    chunk_size: int = field(default=4, metadata={"help": "csz: tokens per retrieved chunk"})
    memory_k: int = field(
        default=64, metadata={"help": "K: (key, value) pairs retrieved per token and head (K/csz chunks)"}
    )
    memory_layer: int = field(
        default=9, metadata={"help": "the SideNet's memory-augmented layer (1-based; paper: 9 of 12)"}
    )
    backbone_memory_layer: Optional[int] = field(
        default=None,
        metadata={"help": "m: the backbone layer (1-based) whose keys / values fill the bank "
        "(default 2 x --memory-layer: the backbone layer the memory layer is initialised from; paper: 18 of 24)"},
    )
    bank_reset: ChoiceEnum(["never", "document"]) = field(
        default="never",
        metadata={"help": "'document': empty a stream's bank at every WikiText article start (from input tokens)"},
    )
    memory_search: ChoiceEnum(list(SEARCHES)) = field(
        default="torch", metadata={"help": "chunk search: exact inner product in torch, or faiss IndexFlatIP"}
    )
    dropout: float = field(default=0.1, metadata={"help": "SideNet dropout (residual branches, FFN)"})
    attention_dropout: float = field(default=0.0, metadata={"help": "SideNet dropout on attention probabilities"})
    tokens_per_sample: int = II("task.tokens_per_sample")  # generation: tokens per segment


# -- the memory-augmented layer ----------------------------------------------------------------------


class MemoryAugmentedLayer(AlibiLayer):
    """An ALiBi layer whose attention is LongMem's joint attention (Eq. 2-3) with a head-wise gate g (H,)."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.gate = nn.Parameter(torch.zeros(cfg.decoder_attention_heads))  # σ(0) = 0.5

    def attend(self, q: Tensor, k: Tensor, v: Tensor, visible: Tensor, memory: Optional[Retriever]) -> Tensor:
        """q (B, T, H, D), k / v (B, S + T, H, D) -> σ(g)·A + (1 − σ(g))·M  (B, T, H, D)."""
        local = self.local_attention(q, k, v, visible)
        if memory is None:
            return local
        batch = memory(q, 1.0 / math.sqrt(q.size(-1)))  # scores (B, H, T, K), values (B, H, T, K, D)
        probs, _ = masked_softmax(batch.scores, batch.mask)  # rows without memory: all zero
        retrieved = torch.einsum("bhtk,bhtkd->bthd", self.attn_dropout(probs).to(v.dtype), batch.values.to(v.dtype))
        has_memory = batch.mask.any(dim=-1).transpose(1, 2)  # (B, T, H)
        weight = torch.where(has_memory, torch.sigmoid(fp32(self.gate)), 1.0).unsqueeze(-1)  # (B, T, H, 1)
        return (weight * fp32(local) + (1.0 - weight) * fp32(retrieved)).to(local.dtype)


# -- documents ---------------------------------------------------------------------------------------


def document_starts(tokens: Tensor, previous: Tensor, boundaries: DocumentBoundaries, pad: int) -> Tensor:
    """(B, T) bool: input position s starts a WikiText article iff entry s − 1 starts one by
    ``memory/documents.py``'s rule (x_{s−2} = eos, x_{s−1} = "=", x_s ≠ "="): the entry that reads the heading's
    "=" is the article's first, and a query may use it from the next input on -- inputs only (x_{≤s}).
    ``previous`` (B, 2) are the row's two inputs before ``tokens``."""
    x = torch.cat([previous, tokens], dim=1)
    return boundaries.starts(x[:, :-2], x[:, 1:-1], x[:, 2:]) & (x[:, 2:] != pad)


# -- the decoder ---------------------------------------------------------------------------------------


class LongMemDecoder(TokenLMDecoder):
    provides_trime_keys = True
    STATE_KEY = "longmem"

    def __init__(self, cfg, dictionary, backbone: AlibiLMDecoder):
        super().__init__(dictionary)
        self.cfg = cfg
        depth = len(backbone.layers)
        if depth % 2 != 0:
            raise ValueError(f"the SideNet has L'/2 layers: the backbone needs an even number of layers, has {depth}")
        self.side_layers = depth // 2
        if not 1 <= cfg.memory_layer <= self.side_layers:
            raise ValueError(
                f"--memory-layer {cfg.memory_layer} is out of range: the SideNet has {self.side_layers} layers (1-based)"
            )
        self.memory_layer = cfg.memory_layer
        self.backbone_memory_layer = cfg.backbone_memory_layer or 2 * cfg.memory_layer
        if not 1 <= self.backbone_memory_layer <= depth:
            raise ValueError(
                f"--backbone-memory-layer {self.backbone_memory_layer} is out of range: the backbone has {depth} layers"
            )
        if cfg.memory_size < 0:
            raise ValueError(f"--memory-size must be >= 0, got {cfg.memory_size}")
        self.bank_config = (
            BankConfig(cfg.memory_size, cfg.chunk_size, cfg.memory_k, str(cfg.memory_search))
            if cfg.memory_size > 0 else None
        )
        self.bank_reset = str(cfg.bank_reset)
        self.boundaries = None
        if self.bank_reset == "document":
            self.boundaries = DocumentBoundaries.from_dictionary(dictionary, required=False)
            if self.boundaries is None:
                raise ValueError(f"--bank-reset document finds WikiText articles by '{HEADING}' headings, "
                                 "but the dictionary has no such symbol")
        if cfg.tokens_per_sample is not None and cfg.tokens_per_sample < 1:
            raise ValueError(f"tokens_per_sample must be >= 1, got {cfg.tokens_per_sample}")
        self.segment_length = cfg.tokens_per_sample
        self.padding_idx = dictionary.pad()

        self.backbone = backbone
        for p in self.backbone.parameters():
            p.requires_grad_(False)
        self.backbone.eval()
        self.num_heads, self.head_dim = backbone.num_heads, backbone.head_dim
        side_cfg = SimpleNamespace(
            decoder_embed_dim=backbone.embed_dim,
            decoder_attention_heads=backbone.num_heads,
            decoder_ffn_embed_dim=backbone.cfg.decoder_ffn_embed_dim,
            activation_fn=backbone.cfg.activation_fn,
            dropout=cfg.dropout,
            attention_dropout=cfg.attention_dropout,
        )
        self.layers = nn.ModuleList()
        for layer in range(1, self.side_layers + 1):  # SideNet layer l <- backbone layer 2l (1-based)
            side = MemoryAugmentedLayer(side_cfg) if layer == self.memory_layer else AlibiLayer(side_cfg)
            side.to(backbone.final_norm.weight)  # the backbone's device and dtype
            missing, unexpected = side.load_state_dict(backbone.layers[2 * layer - 1].state_dict(), strict=False)
            if unexpected or set(missing) - {"gate"}:
                raise RuntimeError(f"SideNet layer {layer} does not match backbone layer {2 * layer}: {missing} {unexpected}")
            self.layers.append(side)
        self.final_norm = nn.LayerNorm(backbone.embed_dim).to(backbone.final_norm.weight)
        self.final_norm.load_state_dict(backbone.final_norm.state_dict())
        self.recurrent_memory = RecurrentMemory()

    # the backbone's frozen output layer is the model's
    @property
    def adaptive_softmax(self):
        return self.backbone.adaptive_softmax

    @adaptive_softmax.setter
    def adaptive_softmax(self, value):
        if value is not None:  # FairseqDecoder.__init__ sets None
            raise AttributeError("longmem shares the backbone's output layer")

    def output_layer(self, features: Tensor) -> Tensor:
        return self.backbone.output_layer(features)

    def train(self, mode: bool = True):
        super().train(mode)
        self.backbone.eval()  # frozen: no dropout, ever
        return self

    # -- one segment ------------------------------------------------------------------------------------
    def _new_bank(self, rows: int, like: Tensor) -> Optional[ChunkMemoryBank]:
        if self.bank_config is None:
            return None
        return ChunkMemoryBank.empty(self.bank_config, rows, self.num_heads, self.head_dim, like.dtype, like.device)

    def _bank(self, state: Optional[MemoryState]) -> Optional[ChunkMemoryBank]:
        if self.bank_config is None or state is None or BANK + "keys" not in state:
            return None
        return ChunkMemoryBank.from_state(self.bank_config, state, BANK)

    def _documents(self, tokens: Tensor, previous: Tensor) -> Tuple[Tensor, Tensor]:
        """(starts (B, T), previous inputs for the next call (B, 2)) -- no starts without --bank-reset document."""
        if self.boundaries is None:
            starts = torch.zeros_like(tokens, dtype=torch.bool)
        else:
            starts = document_starts(tokens, previous, self.boundaries, self.padding_idx)
        return starts, torch.cat([previous, tokens], dim=1)[:, -2:]

    def run_layers(
        self,
        tokens: Tensor,
        bank: Optional[ChunkMemoryBank],
        bank_visible: Tensor,
        cache: Optional[MemoryState] = None,
    ):
        """Backbone + SideNet over ``tokens`` (B, T) after the cached positions of the segment (generation).

        ``bank_visible`` (B, T) bool: queries that may read the bank. Returns (features (B, T, d),
        TRIME key (B, T, d), backbone states, SideNet keys / values of these tokens)."""
        backbone_cache = None if cache is None else {
            name[len("backbone."):]: value for name, value in cache.items() if name.startswith("backbone.")
        }
        with torch.no_grad():
            states = self.backbone.encode(tokens, backbone_cache)
        hidden = states.hidden
        valid = tokens.ne(self.padding_idx)
        key_valid = valid if cache is None else torch.cat([cache["backbone.valid"], valid], dim=1)
        visible = causal_visibility(key_valid, tokens.size(1))  # (B, 1, T, S + T)
        retrieve = None if bank is None else (lambda q, scale: bank.retrieve(q, scale, bank_visible))
        x, key, side_kv = hidden[0], hidden[0], []
        for layer, block in enumerate(self.layers, start=1):
            past = None if cache is None else (cache[f"side.k.{layer}"], cache[f"side.v.{layer}"])
            x, key, kv = block(x, visible, past, memory=retrieve if layer == self.memory_layer else None)
            x = x + (hidden[2 * layer] - hidden[2 * layer - 2])  # Eq. 1
            side_kv.append(kv)
        return self.final_norm(x), key, states, side_kv

    def _commit(self, bank: Optional[ChunkMemoryBank], key_values, valid: Tensor, starts: Tensor) -> None:
        """After scoring: rows with an article start restart; the tokens from the last start on enter the bank."""
        if bank is None:
            return
        begun = starts.long().cumsum(dim=1)
        if self.boundaries is not None:
            bank.reset(starts.any(dim=1))
            valid = valid & (begun == begun[:, -1:])
        keys, values = key_values[self.backbone_memory_layer - 1]
        bank.append(keys, values, valid)

    # -- fairseq interface ------------------------------------------------------------------------------
    def extract_features(self, prev_output_tokens: Tensor, encoder_out=None, incremental_state=None, **kwargs):
        if incremental_state is not None:
            features, key = self._extract_incremental(prev_output_tokens, incremental_state)
        else:
            features, key = self._extract_segment(prev_output_tokens)
        return features, {"attn": None, "inner_states": None, TRIME_KEY: key, TRIME_FEATURE: features}

    def _extract_segment(self, tokens: Tensor) -> Tuple[Tensor, Tensor]:
        """A segment of every row's stream (training, fairseq-eval-lm): the bank follows the rows."""
        bsz = tokens.size(0)
        if self.bank_config is not None and not self.recurrent_memory.enabled:
            raise ValueError(
                "longmem reads a memory bank of each stream's earlier segments: train and evaluate it with "
                "--task trime_lm --batching stream (or set memory_size 0)"
            )
        state = self.recurrent_memory.read(bsz, self.training)
        bank = self._bank(state)
        if bank is None:
            bank = self._new_bank(bsz, self.backbone.final_norm.weight)
        previous = state["previous"] if state is not None else tokens.new_full((bsz, 2), self.padding_idx)
        starts, previous = self._documents(tokens, previous)
        bank_visible = starts.long().cumsum(dim=1) == 0
        features, key, states, _ = self.run_layers(tokens, bank, bank_visible)
        self._commit(bank, states.key_values, tokens.ne(self.padding_idx), starts)
        new_state = {"previous": previous}
        if bank is not None:
            new_state.update(bank.state(BANK))
        self.recurrent_memory.write(new_state, bsz, self.training)
        return features, key

    def _extract_incremental(self, prev_output_tokens: Tensor, incremental_state) -> Tuple[Tensor, Tensor]:
        """Generation: the tokens not seen yet, cut at segment ends (the finished segment then enters the bank)."""
        state = self.get_incremental_state(incremental_state, self.STATE_KEY)
        bsz = prev_output_tokens.size(0)
        if state is None:
            state = {"steps": prev_output_tokens.new_zeros(bsz), "previous": prev_output_tokens.new_full((bsz, 2), self.padding_idx)}
            bank = self._new_bank(bsz, self.backbone.final_norm.weight)
            if bank is not None:
                state.update(bank.state(BANK))
        tokens = prev_output_tokens[:, int(state["steps"][0]) :]
        if tokens.size(1) == 0:
            raise ValueError("no new tokens to process (incremental state already covers the input)")
        outputs: List[Tuple[Tensor, Tensor]] = []
        while tokens.size(1) > 0:
            cached = state["backbone.valid"].size(1) if "backbone.valid" in state else 0
            if cached == self.segment_length:
                state = self._finish_segment(state)
                cached = 0
            piece, tokens = tokens[:, : self.segment_length - cached], tokens[:, self.segment_length - cached :]
            state, out = self._step(state, piece)
            outputs.append(out)
        self.set_incremental_state(incremental_state, self.STATE_KEY, state)
        return torch.cat([f for f, _ in outputs], dim=1), torch.cat([k for _, k in outputs], dim=1)

    def _step(self, state: MemoryState, tokens: Tensor) -> Tuple[MemoryState, Tuple[Tensor, Tensor]]:
        cache = state if "backbone.valid" in state else None
        bank = self._bank(state)
        starts, previous = self._documents(tokens, state["previous"])
        seen = state["segment.starts"].any(dim=1, keepdim=True) if cache is not None else starts[:, :0].any(1, keepdim=True)
        bank_visible = (starts.long().cumsum(dim=1) == 0) & ~seen
        features, key, states, side_kv = self.run_layers(tokens, bank, bank_visible, cache)
        new: Dict[str, Tensor] = {"backbone.valid": tokens.ne(self.padding_idx), "segment.starts": starts}
        for i, (k, v) in enumerate(states.key_values):
            new[f"backbone.k.{i}"], new[f"backbone.v.{i}"] = k, v
        for layer, (k, v) in enumerate(side_kv, start=1):
            new[f"side.k.{layer}"], new[f"side.v.{layer}"] = k.detach(), v.detach()
        if cache is not None:
            new = {name: torch.cat([cache[name], value], dim=1) for name, value in new.items()}
        state = {name: value for name, value in state.items() if name not in new}
        state.update(new)
        state["previous"] = previous
        state["steps"] = state["steps"] + tokens.size(1)
        return state, (features, key)

    def _finish_segment(self, state: MemoryState) -> MemoryState:
        """The cached segment enters the bank; the next token starts an empty segment."""
        bank = self._bank(state)
        m = self.backbone_memory_layer - 1
        key_values = [None] * len(self.backbone.layers)
        key_values[m] = (state[f"backbone.k.{m}"], state[f"backbone.v.{m}"])
        self._commit(bank, key_values, state["backbone.valid"], state["segment.starts"])
        kept = {name: value for name, value in state.items()
                if not name.startswith(("backbone.", "side.", "segment.", BANK))}
        if bank is not None:
            kept.update(bank.state(BANK))
        return kept

    def max_positions(self):
        return UNBOUNDED_POSITIONS  # the bank holds what the local context cannot


# -- the model ---------------------------------------------------------------------------------------


def load_backbone(path: Optional[str], task) -> AlibiLMDecoder:
    """The frozen backbone: an ``alibi_lm`` checkpoint built for ``task``'s dictionary (checked)."""
    if not path:
        raise ValueError("longmem needs --backbone-path: an alibi_lm checkpoint (fairseq-train --arch alibi_lm_*)")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--backbone-path {path}: no such checkpoint")
    state = checkpoint_utils.load_checkpoint_to_cpu(path)
    model_cfg = state["cfg"].model
    name = getattr(model_cfg, "_name", None) or getattr(model_cfg, "arch", None)
    if ARCH_MODEL_REGISTRY.get(name) is not AlibiLanguageModel:
        raise ValueError(f"--backbone-path {path} holds a '{name}' model; longmem needs an alibi_lm backbone")
    from fairseq import models

    model = models.build_model(model_cfg, task)
    model.load_state_dict(state["model"], strict=True, model_cfg=model_cfg)
    logger.info("longmem backbone: %s (%d layers, d %d)", path, len(model.decoder.layers), model.decoder.embed_dim)
    return model.decoder


@register_model("longmem", dataclass=LongMemConfig)
class LongMemModel(FairseqLanguageModel):
    @classmethod
    def build_model(cls, cfg, task):
        return cls(LongMemDecoder(cfg, task.target_dictionary, load_backbone(cfg.backbone_path, task)))

    @property
    def recurrent_memory(self) -> RecurrentMemory:
        return self.decoder.recurrent_memory

    def load_state_dict(self, state_dict, strict=True, model_cfg=None, args=None):
        """Refuse a checkpoint adapted on a backbone of other sizes than ``--backbone-path``; warn when the
        backbone weights differ (the checkpoint's copy, the one the SideNet was adapted on, is used)."""
        prefix = "decoder.backbone."
        own = self.decoder.backbone.state_dict()
        differs = []
        for name, value in own.items():
            stored = state_dict.get(prefix + name)
            if stored is None:
                continue
            if stored.shape != value.shape:
                raise ValueError(
                    f"this longmem checkpoint was adapted on another backbone than --backbone-path: "
                    f"{name} has shape {tuple(stored.shape)} there, {tuple(value.shape)} in the backbone file"
                )
            if not torch.equal(stored.to(value.device, value.dtype), value):
                differs.append(name)
        if differs:
            logger.warning("the backbone in this checkpoint differs from --backbone-path in %d tensors (e.g. %s); "
                           "using the checkpoint's copy", len(differs), differs[0])
        return super().load_state_dict(state_dict, strict=strict, model_cfg=model_cfg, args=args)


@register_model_architecture("longmem", "longmem_gpt2_medium")
def longmem_gpt2_medium(args):
    """The paper's setting (§3.1, Table 7) on an alibi_lm_gpt2_medium backbone: M 65,536, K 64, csz 4,
    memory layer 9 of 12 reading backbone layer 18 of 24."""
    fill_defaults(args, LongMemConfig, memory_size=65536, chunk_size=4, memory_k=64, memory_layer=9,
                  dropout=0.1, attention_dropout=0.0)


@register_model_architecture("longmem", "longmem_wikitext2_small")
def longmem_wikitext2_small(args):
    """CPU setting (docs/results_longmem.md) on an alibi_lm_wikitext2_small backbone (8 layers): SideNet 4 layers,
    memory layer 3 reading backbone layer 6 (the paper's 3/4 depth), M 4,096, K 64, csz 4."""
    fill_defaults(args, LongMemConfig, memory_size=4096, chunk_size=4, memory_k=64, memory_layer=3,
                  dropout=0.1, attention_dropout=0.0)
