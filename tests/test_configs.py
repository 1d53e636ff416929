"""Every hydra config under configs/ composes the way fairseq-hydra-train composes it,
names registered components, and fills their dataclass defaults without unknown keys."""

from pathlib import Path

import pytest
from fairseq.criterions import CRITERION_REGISTRY
from fairseq.dataclass.initialize import add_defaults, hydra_init
from fairseq.models import ARCH_MODEL_REGISTRY
from fairseq.tasks import TASK_REGISTRY
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

import trime_fairseq  # noqa: F401

CONFIGS = sorted(Path(__file__).resolve().parents[1].joinpath("configs").rglob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(p.parents[1])))
def test_config_composes_with_fairseq_defaults(path):
    GlobalHydra.instance().clear()
    hydra_init(path.stem)
    # version_base 1.1: fairseq itself still calls hydra.experimental.initialize, which later
    # in-process callers (convert_namespace_to_omegaconf) need to stay allowed
    with initialize_config_dir(config_dir=str(path.parent), version_base="1.1"):
        cfg = compose(config_name=path.stem, overrides=["task.data=/nonexistent"])
    add_defaults(cfg)
    assert cfg.common.user_dir == "trime_fairseq"
    assert cfg.task._name in TASK_REGISTRY
    assert cfg.model._name in ARCH_MODEL_REGISTRY, f"unknown architecture {cfg.model._name}"
    assert cfg.criterion._name in CRITERION_REGISTRY
    assert cfg.optimization.max_update > 0


ARCH_FIELDS = (
    "decoder_layers", "decoder_embed_dim", "decoder_input_dim", "decoder_output_dim", "decoder_ffn_embed_dim",
    "decoder_attention_heads", "decoder_normalize_before", "no_decoder_final_norm", "dropout",
    "attention_dropout", "activation_dropout", "adaptive_input", "adaptive_input_factor", "adaptive_input_cutoff",
    "adaptive_softmax_cutoff", "adaptive_softmax_factor", "adaptive_softmax_dropout", "tie_adaptive_weights",
    "tie_adaptive_proj", "share_decoder_input_output_embed",
)


def cli_architecture(arch: str) -> dict:
    """The architecture fields ``fairseq-train --arch ARCH`` builds the model with."""
    from fairseq import options

    parser = options.get_training_parser()
    args = options.parse_args_and_arch(parser, ["/nonexistent", "--task", "language_modeling", "--arch", arch])
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf

    model = convert_namespace_to_omegaconf(args).model
    return {name: model[name] for name in ARCH_FIELDS if name in model}


TRANSFORMER_LM_CONFIGS = [p for p in CONFIGS if "trime_lm_" in p.read_text()]


@pytest.mark.parametrize("path", TRANSFORMER_LM_CONFIGS, ids=lambda p: str(p.relative_to(p.parents[1])))
def test_hydra_config_builds_the_architecture_it_names(path):
    """fairseq-hydra-train fills the model node with transformer_lm's defaults before the
    architecture function runs (which then keeps them): a config must spell out its
    architecture's sizes, or it silently trains another model than --arch NAME. Every
    architecture field is compared, those the file spells out included."""
    cfg = composed(path)
    expected = cli_architecture(cfg.model._name)
    assert len(expected) >= 15, expected
    differs = {k: (cfg.model[k], v) for k, v in expected.items() if cfg.model[k] != v}
    assert not differs, f"{path.name} builds {cfg.model._name} with other values (hydra, --arch): {differs}"


def composed(path):
    """The config as fairseq-hydra-train builds the model from it (arch function applied)."""
    from fairseq.models import ARCH_CONFIG_REGISTRY
    from omegaconf import open_dict

    GlobalHydra.instance().clear()
    hydra_init(path.stem)
    with initialize_config_dir(config_dir=str(path.parent), version_base="1.1"):
        cfg = compose(config_name=path.stem, overrides=["task.data=/nonexistent", "task.bm25_order=/nonexistent"]
                      if "bm25_order" in path.read_text() else ["task.data=/nonexistent"])
    add_defaults(cfg)
    with open_dict(cfg.model):
        ARCH_CONFIG_REGISTRY[cfg.model._name](cfg.model)  # as fairseq.models.build_model does
    return cfg


# -- against the paper (TRIME Table 11), not against the code's own --arch ------------------------

WIKITEXT103_VOCAB = 267_744  # fairseq-preprocess's dictionary of WikiText-103 (padded to a multiple of 8)
ENWIK8_VOCAB = 208
PAPER_PARAMS = {  # Table 11, #Params
    "trime_lm_wiki103_247m": (247e6, WIKITEXT103_VOCAB),
    "trime_lm_wiki103_150m": (150e6, WIKITEXT103_VOCAB),
    "trime_lm_wiki103_7m": (7e6, WIKITEXT103_VOCAB),
    "trime_lm_enwik8_38m": (38e6, ENWIK8_VOCAB),
}


@pytest.mark.parametrize("arch", sorted(PAPER_PARAMS))
def test_architecture_has_the_papers_parameter_count(arch):
    import torch
    from fairseq.data import Dictionary
    from fairseq.models.transformer_lm import TransformerLanguageModel

    params, vocab = PAPER_PARAMS[arch]
    dictionary = Dictionary()
    for i in range(vocab - dictionary.nspecial):
        dictionary.add_symbol(f"w{i}")
    task = type("Task", (), {"source_dictionary": dictionary, "target_dictionary": dictionary})()
    from fairseq import options

    args = options.parse_args_and_arch(options.get_training_parser(),
                                       ["/x", "--task", "language_modeling", "--arch", arch])
    with torch.device("meta"):  # sizes only: nothing is allocated
        model = TransformerLanguageModel.build_model(args, task)
    count = sum(p.numel() for p in model.parameters())
    assert abs(count - params) / params < 0.03, f"{arch}: {count / 1e6:.1f}M parameters, the paper {params / 1e6:g}M"


# config -> (tokens per update, training memory per token) of Table 11, on the one worker the config assumes
PAPER_SETTINGS = {
    "trime/wiki103_247m": (73_728, 3_072),
    "trime/wiki103_150m": (36_000, 150),
    "trime/wiki103_7m": (24_576, 3_072),
    "trime/enwik8_38m": (49_152, 512),
    "trime_long/wiki103_247m": (73_728, 12_288),
    "trime_long/wiki103_150m": (36_000, 36_000),
    "trime_long/wiki103_7m": (24_576, 24_576),
    "trime_long/enwik8_38m": (49_152, 49_152),
    "trime_ext/wiki103_247m": (73_728, 12_288),
    "trime_ext/wiki103_7m": (24_576, 24_576),
}


@pytest.mark.parametrize("name", sorted(PAPER_SETTINGS))
def test_config_reaches_the_papers_tokens_per_update_and_memory(name):
    """On one worker (the README's command): Table 11's tokens per update, and the training memory a
    token can reach (local: its segment; trime_long: its run of m segments, across article ends as
    Table 11's sizes require; trime_ext: the segments of its batch)."""
    path = Path(__file__).resolve().parents[1] / "configs" / f"{name}.yaml"
    cfg = composed(path)
    seg = cfg.task.tokens_per_sample
    per_forward = (cfg.dataset.batch_size * seg if cfg.dataset.batch_size
                   else cfg.dataset.max_tokens // seg * seg)
    tokens_per_update = per_forward * cfg.optimization.update_freq[0]
    if cfg.criterion._name == "trime_long_loss":
        memory = cfg.task.consecutive_segments * seg
        assert cfg.task.cross_documents, f"{name}: runs stop at article ends (~3.3K tokens), not {memory}"
    elif cfg.criterion._name == "trime_ext_loss":
        memory = per_forward
    else:
        memory = seg
    assert (tokens_per_update, memory) == PAPER_SETTINGS[name]


def test_iwslt14_config_is_the_papers_translation_setting():
    """TRIME Table 11, IWSLT'14: 6+6 layers, d 512, FFN 1024, 39M parameters (fairseq's IWSLT'14
    dictionaries: 8,848 de / 6,632 en types), 16,384 tokens per update on one worker, adam 5e-4,
    cosine with 4k warm-up, 170k updates; TRIME-MT's criterion and BM25 batching."""
    import torch
    from fairseq.data import Dictionary
    from fairseq.models import ARCH_MODEL_REGISTRY

    cfg = composed(Path(__file__).resolve().parents[1] / "configs" / "trime_mt" / "iwslt14_de_en.yaml")
    assert (cfg.task._name, cfg.criterion._name, cfg.task.batching) == ("trime_translation", "trime_mt_loss", "bm25")
    assert cfg.dataset.max_tokens * cfg.optimization.update_freq[0] == 16_384
    assert (cfg.optimization.lr[0], cfg.lr_scheduler._name, cfg.lr_scheduler.warmup_updates,
            cfg.optimization.max_update) == (5e-4, "cosine", 4000, 170_000)
    dicts = []
    for size in (8848, 6632):
        d = Dictionary()
        for i in range(size - d.nspecial):
            d.add_symbol(f"w{i}")
        dicts.append(d)
    task = type("Task", (), {"source_dictionary": dicts[0], "target_dictionary": dicts[1]})()
    from argparse import Namespace

    from omegaconf import OmegaConf

    args = Namespace(**OmegaConf.to_container(cfg.model))
    with torch.device("meta"):
        model = ARCH_MODEL_REGISTRY[cfg.model._name].build_model(args, task)
    count = sum(p.numel() for p in model.parameters())
    assert abs(count - 39e6) / 39e6 < 0.03, f"{count / 1e6:.1f}M parameters, the paper 39M"
    assert (args.encoder_layers, args.decoder_layers, args.encoder_embed_dim, args.encoder_ffn_embed_dim) == (
        6, 6, 512, 1024)
