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
import sys

import numpy as np
import pytest
import torch
from conftest import PYTHON, ROOT, run_cli
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
