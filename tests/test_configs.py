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
    architecture's sizes, or it silently trains another model than --arch NAME."""
    from fairseq.models import ARCH_CONFIG_REGISTRY
    from omegaconf import open_dict

    GlobalHydra.instance().clear()
    hydra_init(path.stem)
    with initialize_config_dir(config_dir=str(path.parent), version_base="1.1"):
        cfg = compose(config_name=path.stem, overrides=["task.data=/nonexistent"])
    add_defaults(cfg)
    with open_dict(cfg.model):
        ARCH_CONFIG_REGISTRY[cfg.model._name](cfg.model)  # as fairseq.models.build_model does
    expected = cli_architecture(cfg.model._name)
    got = {name: cfg.model[name] for name in expected}
    # a config may deliberately change a field; it must then say so in the file (the field is spelled out)
    spelled = set(compose_model_keys(path))
    differs = {k: (got[k], v) for k, v in expected.items() if got[k] != v and k not in spelled}
    assert not differs, f"{path.name} builds {cfg.model._name} with other values (hydra, --arch): {differs}"


def compose_model_keys(path):
    from omegaconf import OmegaConf

    return list(OmegaConf.load(path).get("model", {}).keys())
