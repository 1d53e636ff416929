"""Tiny in-process fairseq models and batches for math tests (no data files, no CLI)."""

import torch
from omegaconf import OmegaConf
from fairseq.data import Dictionary
from fairseq.models.transformer_lm import TransformerLanguageModel, TransformerLanguageModelConfig

import trime_fairseq  # noqa: F401  (registers the plugin)
from trime_fairseq.criterions.trime_loss import TrimeLoss
from trime_fairseq.tasks.trime_lm import TrimeLMConfig, TrimeLMTask


def tiny_dictionary(words: int = 20) -> Dictionary:
    d = Dictionary()
    for i in range(words):
        d.add_symbol(f"w{i}")
    return d


def tiny_task(words: int = 20, **task_options) -> TrimeLMTask:
    cfg = TrimeLMConfig(tokens_per_sample=64, **task_options)
    return TrimeLMTask(cfg, tiny_dictionary(words))


def tiny_lm(task, adaptive: bool = False, layers: int = 2, dim: int = 16, pre_norm: bool = True, seed: int = 0,
            checkpoint_activations: bool = False):
    """A 2-layer transformer_lm without dropout; adaptive softmax with cutoffs 10,16 if asked."""
    torch.manual_seed(seed)
    cfg = TransformerLanguageModelConfig(
        _name="transformer_lm",
        add_bos_token=False,
        tpu=False,
        decoder_layers=layers,
        decoder_embed_dim=dim,
        decoder_input_dim=dim,
        decoder_output_dim=dim,
        decoder_ffn_embed_dim=2 * dim,
        decoder_attention_heads=2,
        decoder_normalize_before=pre_norm,
        dropout=0.0,
        adaptive_softmax_cutoff="10,16" if adaptive else None,
        adaptive_softmax_dropout=0.0,
        tokens_per_sample=64,
        max_target_positions=64,
        checkpoint_activations=checkpoint_activations,
    )
    model = task.build_model(OmegaConf.structured(cfg))
    assert isinstance(model, TransformerLanguageModel)
    return model.double()


def lm_sample(task, bsz: int = 3, tsz: int = 12, pad_last: int = 0, seed: int = 1, distinct: int = 6):
    """A batch of random token streams (src = x[:-1], target = x[1:]) over ``distinct``
    word types (so targets repeat and occur in memory); the last ``pad_last``
    positions of the last row are padding."""
    g = torch.Generator().manual_seed(seed)
    d = task.dictionary
    x = torch.randint(d.nspecial, d.nspecial + distinct, (bsz, tsz + 1), generator=g)
    src, tgt = x[:, :-1].clone(), x[:, 1:].clone()
    if pad_last:
        src[-1, -pad_last:] = d.pad()
        tgt[-1, -pad_last:] = d.pad()
    return {
        "id": torch.arange(bsz),
        "net_input": {"src_tokens": src, "src_lengths": src.ne(d.pad()).sum(1)},
        "target": tgt,
        "ntokens": int(tgt.ne(d.pad()).sum()),
        "nsentences": bsz,
    }


def trime_criterion(task, **overrides) -> TrimeLoss:
    options = dict(ce_warmup_ratio=0.0, ce_warmup_updates=None, max_update=0, sentence_avg=False)
    options.update(overrides)
    return TrimeLoss(task, **options)


def row_gradient(model, criterion, sample, loss_row: int, grad_row: int) -> float:
    """|d(TRIME losses of row ``loss_row``) / d(input embeddings of row ``grad_row``)|, summed.

    Rows of a batch never attend to each other, so this is non-zero only when the
    criterion's memory links the two rows."""
    captured = {}

    def keep(module, inputs, output):
        output.retain_grad()
        captured["emb"] = output

    handle = model.decoder.embed_tokens.register_forward_hook(keep)
    try:
        trime, _, _, valid = criterion.token_losses(model, sample)
    finally:
        handle.remove()
    rows = torch.zeros_like(valid).view(sample["target"].size(0), -1)
    rows[loss_row] = True
    trime.masked_fill(~(valid & rows.view(-1)), 0).sum().backward()
    grad = float(captured["emb"].grad[grad_row].abs().sum())
    model.zero_grad()
    return grad
