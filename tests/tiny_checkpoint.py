"""A tiny binarized LM corpus and an untrained (random-weight) fairseq checkpoint of a small transformer LM on it:
for end-to-end tests of the command-line tools (trime-build-datastore, trime-train-skip-predictor, benchmarks)
without shared data and without training."""

from pathlib import Path

import numpy as np
import torch
from fairseq import options, tasks
from fairseq.data import Dictionary, indexed_dataset
from fairseq.dataclass.utils import convert_namespace_to_omegaconf
from omegaconf import OmegaConf

import trime_fairseq  # noqa: F401  (registers the plugin)

ROOT = Path(__file__).resolve().parents[1]  # (no conftest import: benchmarks/gpu_check.py uses these without pytest)


def tiny_corpus(folder, words: int = 30, lines=(("train", 120), ("valid", 40)), seed: int = 0):
    """``folder`` with dict.txt and binarized splits of random lines (8..20 tokens, each ending in eos)."""
    folder.mkdir(parents=True, exist_ok=True)
    d = Dictionary()
    for i in range(words):
        d.add_symbol(f"w{i}", n=words - i)
    d.save(str(folder / "dict.txt"))
    g = torch.Generator().manual_seed(seed)
    for split, n in lines:
        builder = indexed_dataset.MMapIndexedDatasetBuilder(str(folder / f"{split}.bin"), dtype=np.int32)
        for _ in range(n):
            length = int(torch.randint(8, 21, (1,), generator=g))
            # a skewed choice of words, so that neighbours repeat
            tokens = (torch.rand(length, generator=g) ** 2 * words).long() + d.nspecial
            builder.add_item(torch.cat([tokens, torch.tensor([d.eos()])]).int())
        builder.finalize(str(folder / f"{split}.idx"))
    return folder


def save_random_checkpoint(argv, path, seed: int):
    """The model fairseq-train's ``argv`` builds, with random weights (``seed``), saved at ``path`` as
    fairseq-train saves a checkpoint (no update made)."""
    cfg = convert_namespace_to_omegaconf(options.parse_args_and_arch(options.get_training_parser(), argv))
    torch.manual_seed(seed)
    task = tasks.setup_task(cfg.task)
    model = task.build_model(cfg.model)
    torch.save({
        "cfg": OmegaConf.to_container(cfg, resolve=True, enum_to_str=True),
        "model": model.state_dict(),
        "optimizer_history": [{"criterion_name": "CrossEntropyCriterion", "optimizer_name": "Adam",
                               "lr_scheduler_state": {}, "num_updates": 0}],
        "extra_state": {"train_iterator": {"epoch": 1}},
    }, path)
    return path


def tiny_lm_checkpoint(path, data, seed: int = 1):
    """A random-weight transformer_lm (1 layer, d = 16) checkpoint for ``data``, as fairseq-train saves one."""
    argv = [str(data), "--user-dir", str(ROOT / "trime_fairseq"), "--task", "trime_lm", "--arch", "transformer_lm",
            "--decoder-layers", "1", "--decoder-embed-dim", "16", "--decoder-input-dim", "16",
            "--decoder-output-dim", "16", "--decoder-ffn-embed-dim", "32", "--decoder-attention-heads", "2",
            "--share-decoder-input-output-embed", "--tokens-per-sample", "32", "--criterion", "cross_entropy",
            "--optimizer", "adam", "--lr", "0.01", "--cpu", "--seed", str(seed)]
    return save_random_checkpoint(argv, path, seed)


def tiny_mt_corpus(folder, words: int = 20, lines=(("train", 150), ("valid", 60)), seed: int = 0):
    """``folder`` with dict.de.txt / dict.en.txt (one shared word list) and binarized de-en splits: random source
    lines (4..10 skewed words) whose target is the source with every word shifted by one (a learnable rule)."""
    folder.mkdir(parents=True, exist_ok=True)
    d = Dictionary()
    for i in range(words):
        d.add_symbol(f"w{i}", n=words - i)
    for lang in ("de", "en"):
        d.save(str(folder / f"dict.{lang}.txt"))
    g = torch.Generator().manual_seed(seed)
    for split, n in lines:
        builders = {lang: indexed_dataset.MMapIndexedDatasetBuilder(str(folder / f"{split}.de-en.{lang}.bin"),
                                                                     dtype=np.int32) for lang in ("de", "en")}
        for _ in range(n):
            length = int(torch.randint(4, 11, (1,), generator=g))
            src = (torch.rand(length, generator=g) ** 2 * (words - 1)).long()
            for lang, ids in (("de", src), ("en", src + 1)):
                builders[lang].add_item(torch.cat([ids + d.nspecial, torch.tensor([d.eos()])]).int())
        for lang, builder in builders.items():
            builder.finalize(str(folder / f"{split}.de-en.{lang}.idx"))
    return folder


def tiny_mt_checkpoint(path, data, seed: int = 1):
    """A random-weight transformer (1+1 layers, d = 16) checkpoint of trime_translation de-en for ``data``."""
    argv = [str(data), "--user-dir", str(ROOT / "trime_fairseq"), "--task", "trime_translation", "-s", "de", "-t",
            "en", "--arch", "transformer", "--encoder-layers", "1", "--decoder-layers", "1", "--encoder-embed-dim",
            "16", "--decoder-embed-dim", "16", "--encoder-ffn-embed-dim", "32", "--decoder-ffn-embed-dim", "32",
            "--encoder-attention-heads", "2", "--decoder-attention-heads", "2", "--share-all-embeddings",
            "--dropout", "0", "--criterion", "cross_entropy", "--optimizer", "adam", "--lr", "0.01", "--cpu",
            "--seed", str(seed)]
    return save_random_checkpoint(argv, path, seed)
