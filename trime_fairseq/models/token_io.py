"""Token embedding, output layer and fairseq interface of our own decoders (Transformer-XL, LaMemo,
the ALiBi LM, LongMem).

One config block (:class:`TokenIOConfig`), one check (:func:`check_token_io`), two builders:
the input embedding (plain, or fairseq's adaptive input) and the output layer (full softmax,
tied to the embedding or not, or fairseq's adaptive softmax), and :class:`TokenLMDecoder`, the
part of a decoder fairseq calls around ``extract_features``.
"""

import logging
from dataclasses import dataclass, field
from typing import Optional, Tuple

from fairseq import utils
from fairseq.dataclass import FairseqDataclass
from fairseq.models import FairseqIncrementalDecoder
from fairseq.modules import AdaptiveInput, AdaptiveSoftmax
from torch import Tensor, nn

from trime_fairseq.models.recurrent_memory import reorder_state

logger = logging.getLogger(__name__)

UNBOUNDED_POSITIONS = 1_000_000  # relative positions / memories: any length can be processed


@dataclass
class TokenIOConfig(FairseqDataclass):
    no_scale_embedding: bool = field(default=False, metadata={"help": "do not scale embeddings by √d"})
    adaptive_input: bool = field(default=False, metadata={"help": "adaptive input embeddings"})
    adaptive_input_factor: float = field(default=1, metadata={"help": "adaptive input dimension reduction factor"})
    adaptive_input_cutoff: Optional[str] = field(default=None, metadata={"help": "comma-separated cutoffs"})
    adaptive_softmax_cutoff: Optional[str] = field(default=None, metadata={"help": "comma-separated cutoffs"})
    adaptive_softmax_dropout: float = field(default=0.0, metadata={"help": "dropout inside the adaptive softmax"})
    adaptive_softmax_factor: float = field(default=1, metadata={"help": "adaptive softmax dimension reduction factor"})
    tie_adaptive_weights: bool = field(default=False, metadata={"help": "tie adaptive input and softmax weights"})
    tie_adaptive_proj: bool = field(default=False, metadata={"help": "tie adaptive input and softmax projections"})
    share_decoder_input_output_embed: bool = field(default=False, metadata={"help": "tie input and output embeddings"})


def check_token_io(cfg) -> None:
    """Clear errors for embedding / output settings that cannot work."""
    if cfg.tie_adaptive_weights:
        if not cfg.adaptive_input or cfg.adaptive_softmax_cutoff is None:
            raise ValueError("tie_adaptive_weights needs adaptive_input and adaptive_softmax_cutoff")
        if cfg.adaptive_input_cutoff != cfg.adaptive_softmax_cutoff:
            raise ValueError(
                f"tied adaptive weights need equal cutoffs: {cfg.adaptive_input_cutoff} != {cfg.adaptive_softmax_cutoff}"
            )
        if cfg.adaptive_input_factor != cfg.adaptive_softmax_factor:
            raise ValueError("tied adaptive weights need adaptive_input_factor == adaptive_softmax_factor")
    if cfg.share_decoder_input_output_embed and (cfg.adaptive_input or cfg.adaptive_softmax_cutoff):
        raise ValueError("share_decoder_input_output_embed is for plain embeddings; use tie_adaptive_weights")


def cutoffs(value: Optional[str], vocab_size: int, what: str):
    """Parsed cutoffs below the vocabulary size (larger ones are dropped with a warning)."""
    if value is None:
        return None
    parsed = utils.eval_str_list(value, type=int)
    kept = [c for c in parsed if c < vocab_size]
    if len(kept) < len(parsed):
        logger.warning("%s cutoffs %s >= vocabulary size %d dropped: using %s", what, parsed, vocab_size, kept)
    if not kept:
        raise ValueError(f"no {what} cutoff is below the vocabulary size {vocab_size}: {parsed}")
    return kept


def build_token_embedding(cfg, vocab: int, dim: int, padding_idx: int) -> nn.Module:
    """(B, T) ids -> (B, T, dim), unscaled: plain N(0, dim^-1/2) embedding or adaptive input."""
    if cfg.adaptive_input:
        cutoff = cutoffs(cfg.adaptive_input_cutoff, vocab, "adaptive input")
        if cutoff is None:
            raise ValueError("adaptive_input needs adaptive_input_cutoff")
        return AdaptiveInput(vocab, padding_idx, dim, cfg.adaptive_input_factor, dim, cutoff)
    embed = nn.Embedding(vocab, dim, padding_idx=padding_idx)
    nn.init.normal_(embed.weight, mean=0.0, std=dim**-0.5)
    nn.init.zeros_(embed.weight[padding_idx])
    return embed


def build_output_layer(
    cfg, vocab: int, dim: int, embed_tokens: nn.Module
) -> Tuple[Optional[AdaptiveSoftmax], Optional[nn.Linear]]:
    """(adaptive softmax, None) or (None, full-softmax projection dim -> vocab)."""
    if cfg.adaptive_softmax_cutoff is not None:
        adaptive = AdaptiveSoftmax(
            vocab,
            dim,
            cutoffs(cfg.adaptive_softmax_cutoff, vocab, "adaptive softmax"),
            dropout=cfg.adaptive_softmax_dropout,
            adaptive_inputs=embed_tokens if cfg.tie_adaptive_weights else None,
            factor=cfg.adaptive_softmax_factor,
            tie_proj=cfg.tie_adaptive_proj,
        )
        return adaptive, None
    projection = nn.Linear(dim, vocab, bias=False)
    if cfg.share_decoder_input_output_embed:
        projection.weight = embed_tokens.weight
    else:
        nn.init.normal_(projection.weight, mean=0.0, std=dim**-0.5)
    return None, projection


class TokenLMDecoder(FairseqIncrementalDecoder):
    """``forward`` = ``extract_features`` (subclasses) + ``output_layer``; the generation state is one dict of
    batch-first tensors under ``STATE_KEY`` in ``incremental_state``, reordered row-wise for beam search."""

    STATE_KEY = "state"
    max_target_positions = None  # subclasses set it

    def forward(self, prev_output_tokens, src_lengths=None, incremental_state=None, features_only=False,
                encoder_out=None, **kwargs):
        x, extra = self.extract_features(prev_output_tokens, incremental_state=incremental_state)
        x = self.output_features(x, extra, prev_output_tokens, incremental_state, **kwargs)
        if not features_only:
            x = self.output_layer(x)
        return x, extra

    def output_features(self, features: Tensor, extra: dict, tokens: Tensor, incremental_state=None, **inputs):
        """What the output layer receives, from the last layer's features (B, T, d); the other
        ``net_input`` fields arrive as ``inputs``. The identity here; SPALM fuses its neighbours."""
        return features

    def output_layer(self, features: Tensor) -> Tensor:
        if self.adaptive_softmax is not None:
            return features  # the adaptive softmax (criterion / get_normalized_probs) projects
        return self.output_projection(features)

    def reorder_incremental_state(self, incremental_state, new_order: Tensor):
        state = self.get_incremental_state(incremental_state, self.STATE_KEY)
        if state is not None:
            self.set_incremental_state(incremental_state, self.STATE_KEY, reorder_state(state, new_order))

    def max_positions(self):
        return self.max_target_positions or UNBOUNDED_POSITIONS
