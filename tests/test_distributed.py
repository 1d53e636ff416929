"""Data-parallel training with real worker processes (2 CPU processes, gloo; ../shared/MULTIPROCESS.md).

* The memory across workers (``--memory-across-workers``): each worker's loss and the summed gradients
  equal one process over the concatenated batch in which every worker's loss sees the other workers'
  entries detached; a later token of another worker changes nothing earlier in the stream; a dummy
  batch's entries are invisible; a run that is not whole in the step is an error.
* Every batching under fairseq's real training loop on 2 workers: each epoch's items exactly once, runs
  and streams in order, and an interrupted run resumed from checkpoint_last.pt replays the same batches.
* fairseq-train itself (the CLI, 2 processes) with --memory-across-workers matches the single process.
"""

import re
import subprocess

import numpy as np
import pytest
import torch
from conftest import ROOT, run_cli
from distributed_workers import (SEQ_LEN, free_port, global_sample, inject_pattern, launch, make_criterion,
                                 math_scenarios, math_worker, scenario_task, train_worker)
from tiny_models import tiny_lm, tiny_task

from trime_fairseq.criterions.trime_ext_loss import TrimeExtLoss
from trime_fairseq.criterions.trime_long_loss import TrimeLongLoss
from trime_fairseq.criterions.trime_loss import TrimeLoss

# ----------------------------------------------------------------------------------------------
# the memory across workers: 2 processes against the single-process reference
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def math_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("math")
    names = list(math_scenarios())
    launch(math_worker, (str(out), names))
    return {name: [torch.load(out / f"{name}-{rank}.pt") for rank in (0, 1)] for name in names}


def reference(name, detach_others=True):
    """One process, the concatenated batch: for each worker w, its rows' losses with every other worker's
    memory keys detached (``detach_others``), and the gradient of the sum of all workers' losses."""
    spec = math_scenarios()[name]
    task = scenario_task(spec)
    model = tiny_lm(task)
    sample = global_sample(task, spec)
    bsz = sample["target"].size(0)
    losses, grads = [], {}
    for w, rows in enumerate(spec["rows"]):
        lo = sum(spec["rows"][:w])
        own = torch.zeros(bsz, 1, 1, dtype=torch.bool)
        own[lo:lo + rows] = True
        crit = make_criterion(task, spec, across=False)
        if spec["kind"] == "ext":
            inject_pattern(crit, spec["dropped"])
        single = crit.training_memory

        def detached(keys, *args, own=own):
            return single(torch.where(own, keys, keys.detach()) if detach_others else keys, *args)

        crit.training_memory = detached
        model.zero_grad()
        trime, _, in_memory, valid = crit.token_losses(model, sample)
        mine = torch.zeros(bsz, SEQ_LEN, dtype=torch.bool)
        mine[lo:lo + rows] = True
        (trime.masked_fill(~valid | ~mine.view(-1), 0)).sum().backward()
        for n, p in model.named_parameters():
            if p.grad is not None:
                grads[n] = grads.get(n, 0) + p.grad.clone()
        losses.append((trime.view(bsz, SEQ_LEN)[lo:lo + rows], in_memory.view(bsz, SEQ_LEN)[lo:lo + rows],
                       valid.view(bsz, SEQ_LEN)[lo:lo + rows]))
    return losses, grads


def assert_matches_reference(name, results):
    ref_losses, ref_grads = reference(name)
    for rank, result in enumerate(results):
        assert "error" not in result, result.get("error")
        rows, width = result["shape"]
        trime, in_memory, valid = (t.view(rows, width) for t in (result["trime"], result["in_memory"], result["valid"]))
        ref_trime, ref_in_memory, ref_valid = (t[:, :width] for t in ref_losses[rank])
        assert torch.equal(valid, ref_valid)
        torch.testing.assert_close(trime.masked_fill(~valid, 0), ref_trime.masked_fill(~ref_valid, 0))
        assert torch.equal(in_memory & valid, ref_in_memory & ref_valid)
    summed = {n: results[0]["grads"].get(n, 0) + results[1]["grads"].get(n, 0) for n in ref_grads}
    for n, g in ref_grads.items():
        torch.testing.assert_close(summed[n], g, msg=n)
    return ref_grads


@pytest.mark.parametrize("name", ["long_span", "long_span_blockwise", "long_straddle", "ext", "ext_blockwise"])
def test_loss_and_gradients_equal_one_process_with_other_workers_detached(math_results, name):
    ref_grads = assert_matches_reference(name, math_results[name])
    # the reference is not trivially the plain single process: gradients into the others' keys differ
    _, full = reference(name, detach_others=False)
    assert any(not torch.allclose(full[n], g) for n, g in ref_grads.items())


def test_other_workers_entries_are_in_the_memory(math_results):
    # a run spanning both workers: worker 1's positions find worker 0's tokens (and are not a local-only loss)
    for name in ("long_span", "ext"):
        first, second = math_results[name]
        assert second["in_memory"].any()
    # worker 0 of the ext step alone (worker 1 in a dummy batch) differs from worker 0 with worker 1's segments
    assert not torch.allclose(math_results["ext_dummy"][0]["trime"], math_results["ext"][0]["trime"])


def test_a_later_token_on_another_worker_changes_nothing_earlier(math_results):
    """Perturb input 2 / target 1 of the run's last segment (worker 1): every earlier position of the run
    keeps its loss -- worker 0 entirely, worker 1's first row and position 0 of its second."""
    base, moved = math_results["long_span"], math_results["long_span_perturbed"]
    torch.testing.assert_close(moved[0]["trime"], base[0]["trime"], rtol=0, atol=0)
    rows, width = base[1]["shape"]
    before, after = base[1]["trime"].view(rows, width), moved[1]["trime"].view(rows, width)
    torch.testing.assert_close(after[0], before[0], rtol=0, atol=0)
    assert after[1, 0] == before[1, 0]
    assert after[1, 1] != before[1, 1], "the perturbed target's own loss changes (the test can fail)"


def test_a_dummy_batch_is_invisible_to_the_other_workers(math_results):
    """Worker 1 runs fairseq's dummy batch: worker 0's losses are those of its own batch alone."""
    spec = math_scenarios()["ext_dummy"]
    task = scenario_task(spec)
    model = tiny_lm(task)
    sample = global_sample(task, spec)
    alone = {k: v for k, v in sample.items() if k not in ("net_input", "target", "id")}
    alone.update(id=sample["id"][:2], target=sample["target"][:2],
                 net_input={k: v[:2] for k, v in sample["net_input"].items()})
    crit = make_criterion(task, spec, across=False)
    inject_pattern(crit, spec["dropped"][:2])
    trime, _, _, valid = crit.token_losses(model, alone)
    torch.testing.assert_close(math_results["ext_dummy"][0]["trime"].masked_fill(~valid, 0),
                               trime.detach().masked_fill(~valid, 0))


def test_a_run_not_whole_in_the_step_is_an_error(math_results):
    for result in math_results["long_incomplete"]:
        assert "has 2 of its 4 segments" in result.get("error", ""), result


def test_option_errors_without_a_group_and_for_trime_loss():
    task = tiny_task(batching="consecutive", consecutive_segments=2)
    base = dict(ce_warmup_ratio=0.0, ce_warmup_updates=None, max_update=0, sentence_avg=False)
    with pytest.raises(ValueError, match="needs data-parallel training"):
        TrimeLongLoss(task, memory_block_size=0, memory_across_workers=True, **base)
    with pytest.raises(ValueError, match="needs data-parallel training"):
        TrimeExtLoss(tiny_task(), memory_across_workers=True, **base)
    with pytest.raises(ValueError, match="no effect with trime_loss"):
        TrimeLoss(tiny_task(), memory_across_workers=True, **base)


# ----------------------------------------------------------------------------------------------
# fairseq's training loop on 2 workers: every batching, every item once, order, resume
# ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_wikitext(wikitext2_tiny_bin, tmp_path_factory):
    """The tiny WikiText-2 slice and a BM25 order of its 32-token segments."""
    from trime_fairseq.cli import bm25_batches

    data = wikitext2_tiny_bin
    order = tmp_path_factory.mktemp("bm25") / "bm25-32.order"
    bm25_batches.main(bm25_batches.get_parser().parse_args([
        "--data", str(data), "--tokens-per-sample", "32", "--output", str(order), "--topk", "8",
        "--no-progress-bar"]))
    return data, order


def train_argv(data, save_dir, *extra):
    return [str(data), "--user-dir", str(ROOT / "trime_fairseq"), "--task", "trime_lm", "--arch", "transformer_lm",
            "--decoder-layers", "1", "--decoder-embed-dim", "16", "--decoder-input-dim", "16", "--decoder-output-dim", "16",
            "--decoder-ffn-embed-dim", "32", "--share-decoder-input-output-embed",
            "--decoder-attention-heads", "2", "--dropout", "0", "--tokens-per-sample", "32", "--optimizer", "adam",
            "--lr", "0.001", "--seed", "3", "--ce-warmup-updates", "0", "--log-format", "simple",
            "--log-interval", "100", "--disable-validation", "--no-epoch-checkpoints", "--num-workers", "0",
            "--save-dir", str(save_dir), "--load-checkpoint-on-all-dp-ranks", *extra]


BATCHINGS = {  # name -> (options, updates before the interruption)
    # fairseq's own order; its batch_by_size drops the epoch's last partial batch when --batch-size is below
    # --required-batch-size-multiple (default 8), hence the multiple 1
    "shuffled": (["--criterion", "trime_loss", "--batch-size", "4", "--required-batch-size-multiple", "1"], 5),
    "consecutive": (["--criterion", "trime_long_loss", "--batching", "consecutive", "--consecutive-segments", "2",
                     "--batch-size", "4", "--memory-block-size", "0"], 5),
    "consecutive_across": (["--criterion", "trime_long_loss", "--batching", "consecutive", "--consecutive-segments",
                            "4", "--batch-size", "2", "--memory-across-workers", "--memory-block-size", "0"], 6),
    "bm25": (["--criterion", "trime_ext_loss", "--batching", "bm25", "--batch-size", "4", "--update-freq", "2",
              "--memory-across-workers", "--memory-block-size", "0"], 3),
    "stream": (["--criterion", "trime_loss", "--batching", "stream", "--batch-size", "3"], 5),
}


@pytest.fixture(scope="module")
def training_runs(tiny_wikitext, tmp_path_factory):
    """Per batching: one epoch uninterrupted; the same epoch stopped after k updates and resumed from
    checkpoint_last.pt. Every worker's (update, ids) of every training batch."""
    data, order = tiny_wikitext
    out = tmp_path_factory.mktemp("train")
    runs = []
    for name, (options, stop) in BATCHINGS.items():
        options = options + (["--bm25-order", str(order)] if name == "bm25" else [])
        runs += [(f"{name}-full", train_argv(data, out / name / "full", *options, "--max-epoch", "1")),
                 (f"{name}-part", train_argv(data, out / name / "resumed", *options, "--max-update", str(stop))),
                 (f"{name}-resume", train_argv(data, out / name / "resumed", *options, "--max-epoch", "1"))]
    launch(train_worker, (str(out), runs))
    return {name: [torch.load(out / f"{name}-{rank}.pt") for rank in (0, 1)] for name, _ in runs}


def training_items(data, name):
    """Number of items of an epoch of the batching's training dataset (segments with fillers for consecutive)."""
    from trime_fairseq.data.consecutive import segment_dataset
    from trime_fairseq.tasks.trime_lm import TrimeLMConfig, TrimeLMTask

    m = {"consecutive": 2, "consecutive_across": 4}.get(name, 1)
    cfg = TrimeLMConfig(data=str(data), tokens_per_sample=32, batching="consecutive" if m > 1 else "shuffled",
                        consecutive_segments=m, dataset_impl="mmap", use_plasma_view=False, plasma_path=None, seed=3,
                        batch_size=None, batch_size_valid=None, data_buffer_size=0, tpu=False)
    task = TrimeLMTask.setup_task(cfg)
    task.load_dataset("train")
    dataset = task.dataset("train")
    return len(segment_dataset(task, dataset)) if m > 1 else len(dataset)


@pytest.mark.parametrize("name", list(BATCHINGS))
def test_two_workers_see_every_item_once_and_resume_replays_their_batches(tiny_wikitext, training_runs, name):
    full = training_runs[f"{name}-full"]
    ids = sorted(i for worker in full for _, batch in worker for i in batch if i >= 0)
    assert ids == list(range(training_items(tiny_wikitext[0], name))), "every item of the epoch exactly once"
    assert all(len(worker) > 3 for worker in full), "both workers trained"
    resumed = [part + rest for part, rest in zip(training_runs[f"{name}-part"], training_runs[f"{name}-resume"])]
    assert training_runs[f"{name}-part"][0] and training_runs[f"{name}-resume"][0], "interrupted, then resumed"
    assert resumed == full, "the resumed run replays the same (update, batch) on every worker"


def test_runs_and_streams_keep_their_order_across_workers(training_runs, tiny_wikitext):
    def steps(name):
        by_update = {}
        for rank, worker in enumerate(training_runs[f"{name}-full"]):
            for update, batch in worker:
                by_update.setdefault(update, [[], []])[rank].append(batch)
        return by_update

    # whole runs of m = 2 on each worker: rows r·2, r·2 + 1 adjacent and in order
    for update, (first, second) in steps("consecutive").items():
        for batch in first + second:
            assert len(batch) % 2 == 0 and all(b % 2 == 0 and a == b + 1 for b, a in zip(batch[::2], batch[1::2]))
    # runs of m = 4 across 2 workers x 2 rows: a step's rows (worker 0 then worker 1) are whole runs in order
    spanned = 0
    for update, (first, second) in steps("consecutive_across").items():
        rows = [i for b in first + second for i in b]
        assert len(rows) % 4 == 0
        for r in range(0, len(rows), 4):
            assert rows[r] % 4 == 0 and rows[r:r + 4] == list(range(rows[r], rows[r] + 4))
        spanned += bool(first) and bool(second)
    assert spanned > 3, "runs spanned both workers"
    # stream: every row of a worker continues its stream by one block per step
    for worker in training_runs["stream-full"]:
        batches = [batch for _, batch in worker]
        for row in range(3):
            blocks = [b[row] for b in batches if b[row] >= 0]
            assert blocks == list(range(blocks[0], blocks[0] + len(blocks)))
    # bm25 (update-freq 2): an update's 2 x 2 x 4 segments are one piece of the (rotated) chain
    from trime_fairseq.data.bm25 import read_order_file

    chain, _ = read_order_file(tiny_wikitext[1])
    position = np.empty(len(chain), int)
    position[chain] = np.arange(len(chain))
    for update, (first, second) in steps("bm25").items():
        segs = [i for b in first + second for i in b]
        if len(segs) == 16:
            gaps = np.diff(np.sort(position[segs]))
            assert (gaps != 1).sum() <= 1, f"update {update}: not one piece of the chain"


# ----------------------------------------------------------------------------------------------
# fairseq-train (the CLI): 2 worker processes with --memory-across-workers vs one process
# ----------------------------------------------------------------------------------------------


def launch_cli_workers(argv, world_size=2, timeout=900):
    """``argv`` as ``world_size`` fairseq-train processes (../shared/MULTIPROCESS.md); rank 0's output."""
    import os

    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    procs = [subprocess.Popen(
        [*argv, "--distributed-world-size", str(world_size), "--distributed-rank", str(rank), "--distributed-no-spawn",
         "--distributed-init-method", f"tcp://127.0.0.1:{port}", "--distributed-backend", "gloo",
         "--ddp-backend", "legacy_ddp"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for rank in range(world_size)]
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=timeout)[0])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    for rank, (proc, out) in enumerate(zip(procs, outputs)):
        assert proc.returncode == 0, f"worker {rank} failed:\n{out[-5000:]}"
    return outputs[0]


def logged_losses(output, kind="train_inner"):
    """{update: loss} of fairseq's simple-format log lines (train_inner per --log-interval, valid at validation)."""
    found = {}
    for line in output.splitlines():
        if f"| {kind} |" not in line:
            continue
        update = re.search(r"num_updates[= ](\d+)", line)
        loss = re.search(r"\bloss[= ]([0-9.]+)", line)
        if update and loss:
            found[int(update.group(1))] = float(loss.group(1))
    return found


def test_fairseq_train_two_workers_across_equals_one_process(tiny_wikitext, tmp_path):
    """TRIMELM_long with runs of m = 4 segments: one process with 4 segments per batch, and 2 processes with 2
    each whose runs span both (--memory-across-workers). Same data, same memory; update 1 is the same loss,
    later updates differ only by the gradients the workers do not send into each other's keys."""
    data, _ = tiny_wikitext
    common = ["fairseq-train", data, "--user-dir", "trime_fairseq", "--task", "trime_lm", "--arch", "transformer_lm",
              "--decoder-layers", "1", "--decoder-embed-dim", "16", "--decoder-input-dim", "16",
              "--decoder-output-dim", "16", "--decoder-ffn-embed-dim", "32", "--share-decoder-input-output-embed",
              "--decoder-attention-heads", "2", "--dropout", "0", "--tokens-per-sample", "32", "--optimizer", "adam",
              "--lr", "0.003", "--seed", "3", "--criterion", "trime_long_loss", "--ce-warmup-updates", "0",
              "--batching", "consecutive", "--consecutive-segments", "4", "--memory-block-size", "0",
              "--max-update", "8", "--validate-interval-updates", "4", "--log-format", "simple", "--log-interval", "1",
              "--no-epoch-checkpoints", "--no-save", "--num-workers", "0", "--cpu"]
    single = run_cli([*common, "--batch-size", "4", "--save-dir", tmp_path / "single"])
    pair = launch_cli_workers([*common, "--batch-size", "2", "--memory-across-workers", "--save-dir", tmp_path / "pair"])
    assert "training on 2 devices" in pair and "trime_loss=" in pair
    one, two = logged_losses(single), logged_losses(pair)
    assert sorted(one) == sorted(two) == list(range(1, 9)), (one, two)
    assert abs(one[1] - two[1]) <= 0.002, (one[1], two[1])  # same parameters, same step: same loss
    for update in range(2, 9):
        assert two[update] == pytest.approx(one[update], rel=0.02), (update, one, two)
    valid_one, valid_two = logged_losses(single, "valid"), logged_losses(pair, "valid")
    assert sorted(valid_one) == sorted(valid_two) == [4, 8], (valid_one, valid_two)
    for update in (4, 8):
        assert valid_two[update] == pytest.approx(valid_one[update], rel=0.02)
    # without the option the same 2-worker batches cannot hold a run: a clear error, not a wrong memory
    proc = subprocess.run([str(a) for a in common] + ["--batch-size", "2", "--save-dir", str(tmp_path / "no")],
                          cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env=dict(__import__("os").environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT)))
    assert proc.returncode != 0 and "cannot hold a run of --consecutive-segments 4" in proc.stdout + proc.stderr
