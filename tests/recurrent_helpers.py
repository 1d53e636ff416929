"""Tiny float64 Transformer-XL / LaMemo decoders and token batches for the tests."""

import torch
from fairseq.data import Dictionary

import trime_fairseq  # noqa: F401  (registers models, task, criteria)
from trime_fairseq.models.transformer_xl import TransformerXLConfig, TransformerXLDecoder

VOCAB = 40


def dictionary(size: int = VOCAB) -> Dictionary:
    d = Dictionary()
    for i in range(size - len(d)):
        d.add_symbol(f"w{i}")
    return d


def tiny(decoder_cls=TransformerXLDecoder, config_cls=TransformerXLConfig, seed=0, **overrides):
    """A float64, eval-mode decoder with randomized biases and norms (so every parameter matters)."""
    torch.manual_seed(seed)
    options = dict(
        decoder_layers=2,
        decoder_embed_dim=12,
        decoder_attention_heads=2,
        decoder_ffn_embed_dim=20,
        dropout=0.0,
        attention_dropout=0.0,
        mem_len=0,
    )
    options.update(overrides)
    cfg = config_cls(**options)
    cfg.max_target_positions = None
    decoder = decoder_cls(cfg, dictionary()).double().eval()
    with torch.no_grad():
        for name, p in decoder.named_parameters():
            if "bias" in name or "norm" in name:
                p.normal_(0.0 if "weight" not in name else 1.0, 0.3)
    return decoder


def tokens(bsz, length, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(4, VOCAB, (bsz, length), generator=g)


def features(decoder, toks, **kwargs):
    return decoder(toks, features_only=True, **kwargs)[0]
