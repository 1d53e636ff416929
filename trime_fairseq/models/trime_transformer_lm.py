"""Architectures of the TRIME paper's settings (Table 11) on fairseq's ``transformer_lm``.

TRIME does not change the architecture: these are plain ``transformer_lm``
models (any stock ``transformer_lm*`` architecture works with the TRIME
criteria too); the names fix the sizes the paper used.

| name                      | params | layers | d / ffn   | heads | adaptive | L (train) |
|---------------------------|--------|--------|-----------|-------|----------|-----------|
| trime_lm_wiki103_247m     | 247M   | 16     | 1024/4096 | 8     | yes      | 3072      |
| trime_lm_wiki103_150m     | 150M   | 16     | 410/2100  | 10    | yes      | 150       |
| trime_lm_wiki103_7m       | 7M     | 8      | 128/512   | 4     | yes      | 3072      |
| trime_lm_enwik8_38m       | 38M    | 12     | 512/2048  | 8     | no       | 512       |
| trime_lm_wikitext2_small  | ~5M    | 4      | 128/512   | 4     | yes (2k,10k) | CPU setting |
"""

from fairseq.models import register_model_architecture
from fairseq.models.transformer_lm import base_lm_architecture, transformer_lm_baevski_wiki103
from fairseq.utils import safe_getattr


def _set_default(args, name, value):
    setattr(args, name, safe_getattr(args, name, value))


def _adaptive_wiki103(args):
    """Adaptive input and softmax with the WikiText-103 cutoffs (Baevski & Auli 2019)."""
    for name, value in [
        ("adaptive_input", True),
        ("tie_adaptive_weights", True),
        ("tie_adaptive_proj", True),
        ("adaptive_input_cutoff", "20000,60000"),
        ("adaptive_softmax_cutoff", "20000,60000"),
        ("adaptive_softmax_dropout", 0.2),
    ]:
        _set_default(args, name, value)


@register_model_architecture("transformer_lm", "trime_lm_wiki103_247m")
def trime_lm_wiki103_247m(args):
    """Baevski & Auli's WikiText-103 model, as fairseq's transformer_lm_wiki103."""
    transformer_lm_baevski_wiki103(args)


def _small_adaptive(args, layers, dim, ffn, heads, factor):
    """Pre-norm transformer_lm with WikiText-103's adaptive input / softmax; ``factor``: the
    adaptive clusters' dimension shrinks by it per cluster (d, d/factor, d/factor²)."""
    for name, value in [
        ("decoder_layers", layers),
        ("decoder_embed_dim", dim),
        ("decoder_ffn_embed_dim", ffn),
        ("decoder_attention_heads", heads),
        ("dropout", 0.3),
        ("attention_dropout", 0.1),
        ("activation_dropout", 0.1),
        ("decoder_normalize_before", True),
        ("adaptive_softmax_factor", factor),
        ("adaptive_input_factor", factor),
    ]:
        _set_default(args, name, value)
    _adaptive_wiki103(args)
    base_lm_architecture(args)


@register_model_architecture("transformer_lm", "trime_lm_wiki103_150m")
def trime_lm_wiki103_150m(args):
    _small_adaptive(args, layers=16, dim=410, ffn=2100, heads=10, factor=1)


@register_model_architecture("transformer_lm", "trime_lm_wiki103_7m")
def trime_lm_wiki103_7m(args):
    """7.1M parameters with WikiText-103's vocabulary: the adaptive clusters shrink by 4 (128, 32, 8);
    with factor 1 the three clusters alone would hold 34M parameters."""
    _small_adaptive(args, layers=8, dim=128, ffn=512, heads=4, factor=4)


@register_model_architecture("transformer_lm", "trime_lm_enwik8_38m")
def trime_lm_enwik8_38m(args):
    for name, value in [
        ("decoder_layers", 12),
        ("decoder_embed_dim", 512),
        ("decoder_ffn_embed_dim", 2048),
        ("decoder_attention_heads", 8),
        ("dropout", 0.1),
        ("attention_dropout", 0.0),
        ("decoder_normalize_before", True),
        ("share_decoder_input_output_embed", True),
    ]:
        _set_default(args, name, value)
    base_lm_architecture(args)


@register_model_architecture("transformer_lm", "trime_lm_wikitext2_small")
def trime_lm_wikitext2_small(args):
    """A small CPU setting for WikiText-2 (README quickstart, tests, docs/results.md):
    the 7M model's shape with 4 layers and adaptive cutoffs for a 33k vocabulary."""
    for name, value in [
        ("decoder_layers", 4),
        ("adaptive_input_cutoff", "2000,10000"),
        ("adaptive_softmax_cutoff", "2000,10000"),
        ("dropout", 0.2),
        ("adaptive_softmax_dropout", 0.1),
    ]:
        _set_default(args, name, value)
    trime_lm_wiki103_7m(args)
