"""End to end on a WikiText-2 slice: trime-bm25-batches -> fairseq-train --batching bm25
--criterion trime_ext_loss -> trime-build-datastore -> fairseq-eval-lm --eval-memory knn / trime_ext
-> trime-tune (TRIMELM_ext grid), through the real CLIs."""

import math
import os
import re
import subprocess

import pytest
from conftest import PYTHON, ROOT, perplexity, run_cli

from trime_fairseq.cli import bm25_batches

ENV = {"OMP_NUM_THREADS": "1"}
EVAL = ["--gen-subset", "valid", "--tokens-per-sample", "64", "--context-window", "32"]


@pytest.fixture(scope="module")
def ext_run(wikitext2_bin, tmp_path_factory):
    """A TRIMELM_ext checkpoint: a few updates (gradient accumulation, blockwise memory) on the BM25 chain."""
    tmp = tmp_path_factory.mktemp("ext")
    order = tmp / "bm25-64.order"
    bm25_batches.main(bm25_batches.get_parser().parse_args([
        "--data", str(wikitext2_bin), "--tokens-per-sample", "64", "--output", str(order), "--topk", "5",
        "--no-progress-bar"]))
    save = tmp / "ckpt"
    out = run_cli([
        PYTHON, "-m", "fairseq_cli.train", wikitext2_bin, "--user-dir", ROOT / "trime_fairseq",
        "--task", "trime_lm", "--batching", "bm25", "--bm25-order", order,
        "--tokens-per-sample", "64", "--batch-size", "4", "--update-freq", "2", "--arch", "transformer_lm",
        "--decoder-layers", "1", "--decoder-embed-dim", "32", "--decoder-input-dim", "32",
        "--decoder-output-dim", "32", "--decoder-ffn-embed-dim", "64",
        "--decoder-attention-heads", "2", "--criterion", "trime_ext_loss", "--local-drop-prob", "0.5",
        "--memory-block-size", "128", "--ce-warmup-updates", "0", "--optimizer", "adam", "--lr", "0.002",
        "--max-update", "6", "--max-valid-steps", "2", "--cpu", "--num-workers", "0", "--save-dir", save,
        "--no-epoch-checkpoints", "--log-format", "simple", "--log-interval", "3", "--seed", "3",
    ], env=ENV)
    return tmp, save / "checkpoint_last.pt", out


def test_train_ext_loss_on_bm25_batches(ext_run):
    """The log reports the dropped share (none at validation), losses are finite, a checkpoint is written."""
    _, checkpoint, out = ext_run
    assert "bm25 batching" in out and checkpoint.exists()
    shares = [float(x) for x in re.findall(r"local_dropped[ =]+([0-9.]+)", out)]
    assert shares, out[-3000:]
    assert all(0.0 <= s <= 1.0 for s in shares)
    valid = re.findall(r"valid on 'valid' subset.*?local_dropped[ =]+([0-9.]+)", out)
    assert valid and all(float(v) == 0.0 for v in valid), "no drop at validation"
    losses = [float(x) for x in re.findall(r"\| loss ([0-9.]+)", out)]
    assert losses and all(math.isfinite(x) for x in losses)


def test_datastore_then_knn_lm_and_trime_ext_evaluation(wikitext2_bin, ext_run):
    tmp, checkpoint, _ = ext_run
    store = tmp / "dstore"
    # the datastore of the evaluation text itself (exact search): kNN-LM must fall far below the LM
    log = run_cli([PYTHON, "-m", "trime_fairseq.cli.build_datastore", "--path", checkpoint, "--data", wikitext2_bin,
                   "--gen-subset", "valid", "--tokens-per-sample", "64", "--context-window", "32",
                   "--max-tokens", "4096", "--output", store, "--index-factory", "Flat", "--metric", "ip", "--cpu",
                   "--no-progress-bar"], env=ENV)
    assert "datastore complete" in log

    def eval_lm(*extra):
        return perplexity(run_cli(["fairseq-eval-lm", wikitext2_bin, "--user-dir", "trime_fairseq", "--task",
                                   "trime_lm", "--path", checkpoint, *EVAL, "--batch-size", "8", "--cpu",
                                   "--num-workers", "0", *extra], env=ENV))

    plain = eval_lm()
    knn = eval_lm("--eval-memory", "knn", "--datastore", store, "--knn-k", "8", "--knn-lambda", "0.5",
                  "--softmax-batch", "100")
    assert knn < plain / 1.5, (knn, plain)

    tuned = run_cli(["trime-tune", wikitext2_bin, "--user-dir", "trime_fairseq", "--task", "trime_lm",
                     "--path", checkpoint, *EVAL, "--batch-size", "8", "--cpu", "--no-progress-bar",
                     "--eval-memory", "trime_ext", "--datastore", store, "--knn-k", "8",
                     "--temperatures", "1,2", "--interpolation-temperatures", "1,4", "--interpolation-lambdas", "0.25,0.5",
                     "--widen-edges", "0"], env=ENV)
    best = re.search(r"best: (.*)  \(valid perplexity ([0-9.]+); without memory ([0-9.]+)\)", tuned)
    assert best, tuned[-3000:]
    assert float(best.group(3)) == pytest.approx(plain, rel=1e-3)
    # the tuned point, scored by fairseq-eval-lm, gives the number trime-tune reported
    trime_ext = eval_lm(*best.group(1).split(), "--datastore", store, "--knn-k", "8")
    assert trime_ext == pytest.approx(float(best.group(2)), rel=1e-3)
    assert trime_ext < plain


def test_missing_datastore_is_a_clear_error(wikitext2_bin, ext_run, tmp_path):
    _, checkpoint, _ = ext_run
    proc = subprocess.run(
        ["fairseq-eval-lm", str(wikitext2_bin), "--user-dir", "trime_fairseq", "--task", "trime_lm",
         "--path", str(checkpoint), *EVAL, "--cpu", "--eval-memory", "knn", "--datastore", str(tmp_path / "none")],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env=dict(os.environ, **ENV),
    )
    assert proc.returncode != 0
    assert "datastore folder not found" in proc.stderr + proc.stdout
