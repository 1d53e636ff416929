"""End to end through the real CLIs on a WikiText-2 slice:
fairseq-train (trime_loss) -> fairseq-eval-lm without memory / with local memory / with the cache,
trime-tune, fairseq-hydra-train on a configs/ file, and clear errors for bad options."""

import json
import re
import subprocess

import pytest
from conftest import ROOT, perplexity, run_cli

TINY_MODEL = [
    "--arch", "trime_lm_wikitext2_small", "--decoder-layers", "2",
    "--decoder-embed-dim", "64", "--decoder-ffn-embed-dim", "128", "--decoder-attention-heads", "2",
]


@pytest.fixture(scope="module")
def trime_checkpoint(wikitext2_bin, tmp_path_factory):
    save = tmp_path_factory.mktemp("ckpt")
    out = run_cli([
        "fairseq-train", wikitext2_bin, "--user-dir", "trime_fairseq", "--task", "trime_lm",
        *TINY_MODEL, "--criterion", "trime_loss", "--ce-warmup-updates", "4",
        "--optimizer", "adam", "--lr", "0.002", "--lr-scheduler", "inverse_sqrt", "--warmup-updates", "5",
        "--tokens-per-sample", "64", "--batch-size", "4", "--max-update", "24", "--cpu",
        "--log-format", "simple", "--log-interval", "8", "--save-dir", save, "--no-epoch-checkpoints",
        "--disable-validation", "--num-workers", "0",
    ])
    assert "trime_loss=" in out and "in_memory=" in out and "ce_loss=" in out, out[-3000:]
    assert "num_updates=24" in out
    return save / "checkpoint_last.pt"


def eval_lm(data, checkpoint, *extra):
    return run_cli([
        "fairseq-eval-lm", data, "--user-dir", "trime_fairseq", "--task", "trime_lm", "--path", checkpoint,
        "--gen-subset", "valid", "--tokens-per-sample", "64", "--context-window", "32",
        "--batch-size", "8", "--cpu", "--num-workers", "0", *extra,
    ])


def test_eval_lm_with_and_without_memory(wikitext2_bin, trime_checkpoint):
    plain = perplexity(eval_lm(wikitext2_bin, trime_checkpoint))
    local = perplexity(eval_lm(wikitext2_bin, trime_checkpoint, "--eval-memory", "trime", "--memory-temperature", "2"))
    chunked = perplexity(eval_lm(
        wikitext2_bin, trime_checkpoint, "--eval-memory", "trime", "--memory-temperature", "2", "--softmax-batch", "100"
    ))
    cache = perplexity(eval_lm(
        wikitext2_bin, trime_checkpoint, "--eval-memory", "cache", "--cache-lambda", "0.1", "--cache-theta", "0.3"
    ))
    for value in (plain, local, cache):
        assert 1.0 < value < 1e6
    assert local != plain and cache != plain
    assert chunked == pytest.approx(local, rel=1e-4)


def test_tune_reports_best_memory_options(wikitext2_bin, trime_checkpoint, tmp_path):
    results = tmp_path / "tune.json"
    out = run_cli([
        "trime-tune", wikitext2_bin, "--user-dir", "trime_fairseq", "--task", "trime_lm", "--path", trime_checkpoint,
        "--gen-subset", "valid", "--tokens-per-sample", "64", "--context-window", "32", "--batch-size", "8", "--cpu",
        "--num-workers", "0", "--eval-memory", "trime", "--temperatures", "1,2", "--no-progress-bar",
        "--widen-edges", "1", "--results-json", results,
    ])
    best = re.search(r"best: --eval-memory trime --memory-temperature ([0-9.]+)  \(valid perplexity ([0-9.]+)", out)
    assert best, out[-3000:]
    # machine-readable results; a best value on an edge of the 2-point grid was widened once
    data = json.loads(results.read_text())
    assert data["best"] == f"--eval-memory trime --memory-temperature {best.group(1)}"
    assert len(data["rounds"]) == 2 and len(data["rounds"][1]["axes"]["memory_temperature"]) == 3
    assert len(data["points"]) == 1 + 3  # plain model + τ in {0.5, 1, 2} or {1, 2, 4}
    # the tuner's number is what fairseq-eval-lm reports for the same options
    reported = perplexity(eval_lm(wikitext2_bin, trime_checkpoint, "--eval-memory", "trime",
                                  "--memory-temperature", best.group(1)))
    assert float(best.group(2)) == pytest.approx(reported, rel=1e-3)


def test_unknown_option_combination_is_a_clear_error(wikitext2_bin, trime_checkpoint):
    proc = subprocess.run(
        ["fairseq-eval-lm", str(wikitext2_bin), "--user-dir", "trime_fairseq", "--task", "trime_lm",
         "--path", str(trime_checkpoint), "--cpu", "--eval-memory", "trime", "--cache-lambda", "0.1"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode != 0
    assert "--cache-lambda has no effect with --eval-memory trime" in proc.stderr + proc.stdout


def test_hydra_train_on_config_file(wikitext2_bin, tmp_path):
    out = run_cli([
        "fairseq-hydra-train", "--config-dir", ROOT / "configs" / "trime", "--config-name", "wikitext2_small",
        f"task.data={wikitext2_bin}", "optimization.max_update=3", f"checkpoint.save_dir={tmp_path / 'ckpt'}",
        f"hydra.run.dir={tmp_path / 'hydra'}", "task.tokens_per_sample=64", "dataset.batch_size=2",
        "common.log_interval=1", "dataset.disable_validation=true",
    ])
    assert "trime_loss=" in out and "num_updates=3" in out, out[-3000:]
    assert (tmp_path / "ckpt" / "checkpoint_last.pt").exists()


@pytest.mark.parametrize("cli", ["trime-tune", "trime-build-datastore"])
def test_our_clis_print_no_import_noise(cli):
    """fairseq's import configures the root logger at DEBUG (faiss's loader then prints its CPU probing),
    and fairseq asks for tensorboardX: the help must be the first thing a user sees."""
    proc = subprocess.run([cli, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0
    assert proc.stdout.startswith("usage: " + cli), proc.stdout[:300]
    assert proc.stderr == "", proc.stderr[:500]
