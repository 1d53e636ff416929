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
