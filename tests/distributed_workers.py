"""Worker processes for tests/test_distributed.py: 2 CPU processes, gloo, one TCP rendezvous.

``launch(target, args, world_size)`` starts ``target(rank, world_size, port, *args)`` in fresh
(spawned) processes and waits with a timeout, so a hung collective fails the test instead
of blocking CI. Results travel through files (``torch.save``) that the test reads.
"""

import multiprocessing
import os
import socket
import sys
import traceback
from datetime import timedelta
from pathlib import Path

TIMEOUT = 600


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(target, args, world_size: int = 2, timeout: float = TIMEOUT) -> None:
    ctx = multiprocessing.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=_run, args=(target, rank, world_size, port, *args)) for rank in range(world_size)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout)
    alive = [p for p in procs if p.is_alive()]
    for p in alive:
        p.terminate()
        p.join(10)
    if alive:
        raise TimeoutError(f"{len(alive)} worker(s) still running after {timeout}s (a collective hung?)")
    codes = [p.exitcode for p in procs]
    if any(codes):
        raise RuntimeError(f"worker exit codes {codes}")


def _run(target, rank, world_size, port, *args):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                         world_size=world_size, timeout=timedelta(seconds=TIMEOUT // 2))
    try:
        target(rank, world_size, port, *args)
    except BaseException:
        traceback.print_exc()
        sys.exit(1)
    finally:
        torch.distributed.destroy_process_group()
        release_fairseq_group()


def release_fairseq_group():
    """Drop fairseq's cached handle of the destroyed global group (``get_global_group._global_group``).

    Left in place, the group's C++ object is only freed during interpreter finalization, where gloo's
    threads then sometimes abort the process (SIGABRT, "terminate called without an active exception")
    after all of its work was done."""
    import gc

    from fairseq.distributed import utils as distributed_utils

    if hasattr(distributed_utils.get_global_group, "_global_group"):
        del distributed_utils.get_global_group._global_group
    gc.collect()


# -- the memory across workers: loss, gradients, perturbation, dummy batch, incomplete runs ---------

def math_scenarios():
    """name -> criterion kind, run length m, dataset ids of the concatenated batch's rows, rows per worker,
    --memory-block-size, drop pattern (ext), perturbed later token, worker in a dummy batch."""
    return {
        "long_span": dict(kind="long", m=4, ids=[20, 21, 22, 23], rows=[2, 2], block=0),
        "long_span_blockwise": dict(kind="long", m=4, ids=[20, 21, 22, 23], rows=[2, 2], block=5),
        "long_span_perturbed": dict(kind="long", m=4, ids=[20, 21, 22, 23], rows=[2, 2], block=0, perturb=True),
        "long_straddle": dict(kind="long", m=2, ids=[8, 9, 2, 3, 14, 15], rows=[3, 3], block=0),
        "ext": dict(kind="ext", ids=[0, 1, 2, 3], rows=[2, 2], block=0, dropped=[True, False, False, True]),
        "ext_blockwise": dict(kind="ext", ids=[0, 1, 2, 3], rows=[2, 2], block=7, dropped=[True, False, False, True]),
        "ext_dummy": dict(kind="ext", ids=[0, 1, 2, 3], rows=[2, 2], block=0, dropped=[False, False, False, False],
                          dummy_rank=1),
        "long_incomplete": dict(kind="long", m=4, ids=[20, 21, 30, 31], rows=[2, 2], block=0),
    }


SHORT_LAST_ROWS = 2  # the last worker's rows end 2 positions early: its batch is 2 positions narrower
SEQ_LEN = 6


def global_sample(task, spec):
    """The concatenated batch of all workers (B, T); the last worker's rows end with padding."""
    import torch
    from tiny_models import lm_sample

    sample = lm_sample(task, bsz=len(spec["ids"]), tsz=SEQ_LEN, seed=3)
    pad = task.dictionary.pad()
    last = spec["rows"][-1]
    sample["net_input"]["src_tokens"][-last:, -SHORT_LAST_ROWS:] = pad
    sample["target"][-last:, -SHORT_LAST_ROWS:] = pad
    if spec.get("perturb"):  # a later token of the last worker's last row: input at 2 = target at 1
        new = (int(sample["target"][-1, 1]) + 1 - task.dictionary.nspecial) % 6 + task.dictionary.nspecial
        sample["target"][-1, 1] = new
        sample["net_input"]["src_tokens"][-1, 2] = new
    sample["id"] = torch.tensor(spec["ids"])
    if spec["kind"] == "long":
        sample["segments_per_run"] = spec["m"]
    return sample


def worker_sample(sample, spec, rank: int, pad: int):
    """This worker's rows of the global sample, cut to its own longest row (as fairseq collates)."""
    lo = sum(spec["rows"][:rank])
    hi = lo + spec["rows"][rank]
    target = sample["target"][lo:hi]
    width = int(target.ne(pad).sum(0).nonzero().max()) + 1
    out = {k: v for k, v in sample.items() if k not in ("net_input", "target", "id")}
    out.update(id=sample["id"][lo:hi], target=target[:, :width].clone(),
               net_input={"src_tokens": sample["net_input"]["src_tokens"][lo:hi, :width].clone(),
                          "src_lengths": sample["net_input"]["src_lengths"][lo:hi]})
    return out


def make_criterion(task, spec, across: bool):
    from trime_fairseq.criterions.trime_ext_loss import TrimeExtLoss
    from trime_fairseq.criterions.trime_long_loss import TrimeLongLoss

    base = dict(ce_warmup_ratio=0.0, ce_warmup_updates=None, max_update=0, sentence_avg=False,
                memory_across_workers=across)
    if spec["kind"] == "long":
        return TrimeLongLoss(task, memory_block_size=spec["block"], **base)
    return TrimeExtLoss(task, local_drop_prob=0.9, memory_block_size=spec["block"], seed=1, **base)


def inject_pattern(crit, dropped):
    import torch

    pattern = torch.tensor(dropped, dtype=torch.bool)
    crit.draw_local_drop = lambda bsz: pattern.clone()


def scenario_task(spec):
    from tiny_models import tiny_task

    if spec["kind"] == "long":
        return tiny_task(batching="consecutive", consecutive_segments=spec["m"])
    return tiny_task()


def math_worker(rank, world_size, port, out_dir, names):
    import torch
    from tiny_models import tiny_lm

    from trime_fairseq.memory.gathered import DUMMY_BATCH

    for name in names:
        spec = math_scenarios()[name]
        task = scenario_task(spec)
        model = tiny_lm(task)
        pad = task.dictionary.pad()
        sample = worker_sample(global_sample(task, spec), spec, rank, pad)
        if spec.get("dummy_rank") == rank:
            sample[DUMMY_BATCH] = True
        crit = make_criterion(task, spec, across=True)
        if spec["kind"] == "ext":
            lo = sum(spec["rows"][:rank])
            inject_pattern(crit, spec["dropped"][lo:lo + spec["rows"][rank]])
        result = {}
        try:
            trime, _, in_memory, valid = crit.token_losses(model, sample)
            trime.masked_fill(~valid, 0).sum().backward()
            result.update(trime=trime.detach(), in_memory=in_memory, valid=valid, shape=tuple(sample["target"].shape),
                          grads={n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        except ValueError as e:
            result["error"] = str(e)
        torch.save(result, Path(out_dir) / f"{name}-{rank}.pt")


# -- real fairseq training: every batching, coverage, order, resume ------------------------------------

def train_worker(rank, world_size, port, out_dir, runs):
    """``runs``: list of (name, argv) for fairseq_cli.train.main; every training sample's ids are recorded
    (dummy batches left out) to ``{name}-{rank}.pt`` as a list of (update number, ids)."""
    import torch
    from fairseq import options
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf
    from fairseq.distributed import utils as distributed_utils
    from fairseq_cli import train

    from trime_fairseq.memory.gathered import DUMMY_BATCH
    from trime_fairseq.tasks.trime_lm import TrimeLMTask

    seen = []
    original = TrimeLMTask.train_step

    def recording(self, sample, model, criterion, optimizer, update_num, ignore_grad=False):
        if not ignore_grad and not sample.get(DUMMY_BATCH, False):
            seen.append((int(update_num), sample["id"].tolist()))
        return original(self, sample, model, criterion, optimizer, update_num, ignore_grad)

    TrimeLMTask.train_step = recording
    for name, argv in runs:
        seen.clear()
        argv = list(argv) + ["--distributed-world-size", str(world_size), "--distributed-rank", str(rank),
                             "--distributed-no-spawn", "--distributed-init-method", f"tcp://127.0.0.1:{port}",
                             "--distributed-backend", "gloo", "--ddp-backend", "legacy_ddp", "--cpu"]
        parser = options.get_training_parser()
        cfg = convert_namespace_to_omegaconf(options.parse_args_and_arch(parser, argv))
        distributed_utils.call_main(cfg, train.main)
        torch.save(list(seen), Path(out_dir) / f"{name}-{rank}.pt")
