"""Evaluation memory speed, as ratios measured in one run on the same batches.

1. ``fairseq-eval-lm``'s scorer (``SequenceScorer``) at the paper's evaluation shape
   (rows of L = 3,072 tokens, the last 512 scored, 2,560 of context): scored tokens/s
   of ``--eval-memory trime`` and ``cache`` relative to the plain model. Target >= 0.8.
2. ``trime-tune``'s grid for TRIMELM_ext (τ x τ' x λ = 3 x 4 x 3 = 36 points, one
   datastore search and one summary per distinct (part, scale) per batch) relative to
   one ``fairseq-eval-lm --eval-memory trime_ext`` pass over the same batches. Target <= 2.

The model is ``trime_lm_wikitext2_small`` with random weights (the memory work does not
depend on them) over the WikiText-2 dictionary; the datastore holds its keys g of the
first ``--datastore-tokens`` training tokens (IVF-PQ, K = 1024). Modes alternate batch by
batch, so load on a shared machine hits all of them alike.

    OMP_NUM_THREADS=1 python benchmarks/bench_eval_memory.py data-bin/wikitext-2
"""

import argparse
import os
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

import trime_fairseq  # noqa: E402,F401  (first: it keeps fairseq's import from logging at DEBUG)
from fairseq import options, tasks  # noqa: E402
from fairseq.dataclass.utils import convert_namespace_to_omegaconf  # noqa: E402
from fairseq.sequence_scorer import SequenceScorer  # noqa: E402
from trime_fairseq.checksums import dictionary_checksum, loaded_model_checksum  # noqa: E402
from trime_fairseq.cli.grid_search import grid  # noqa: E402
from trime_fairseq.cli.tune import axes_of  # noqa: E402
from trime_fairseq.memory.datastore import DatastoreSpec, DatastoreWriter  # noqa: E402
from trime_fairseq.memory.keys import get_keys  # noqa: E402


def setup(data, length, context, extra=()):
    argv = [data, "--task", "trime_lm", "--arch", "trime_lm_wikitext2_small", "--tokens-per-sample",
            str(length - context), "--cpu", *extra]
    cfg = convert_namespace_to_omegaconf(options.parse_args_and_arch(options.get_training_parser(), argv))
    task = tasks.setup_task(cfg.task)
    return task, cfg


def model_for(task, cfg, state):
    model = task.build_model(cfg.model)
    model.load_state_dict(state)  # the same weights for every mode
    return model.eval()


def batches(task, split, context, batch_size, count):
    task.load_dataset(split)
    itr = task.eval_lm_dataloader(task.dataset(split), max_tokens=None, batch_size=batch_size, num_workers=0,
                                  context_window=context, max_positions=None)
    out = []
    for sample in itr:
        if len(out) == count:
            break
        out.append(sample)
    return out


def timed_scoring(runs, samples, pad):
    """Alternate the modes batch by batch; scored tokens/s of each."""
    seconds = {name: 0.0 for name in runs}
    tokens = 0
    with torch.no_grad():
        for name, (model, scorer) in runs.items():  # warm-up
            scorer.generate([model], samples[0])
            if getattr(model, "trime_eval_memory", None) is not None:
                model.trime_eval_memory.reset()
        for sample in samples:
            tokens += int(sample["target"].ne(pad).sum())
            for name, (model, scorer) in runs.items():
                start = time.perf_counter()
                scorer.generate([model], sample)
                seconds[name] += time.perf_counter() - start
    return {name: tokens / s for name, s in seconds.items()}


def build_datastore(folder, model, task, tokens, factory):
    train = batches(task, "train", 128, 8, max(1, tokens // (8 * 128)))
    keys, values = [], []
    with torch.no_grad():
        for sample in train:
            g = get_keys(model(**sample["net_input"]))
            real = sample["target"].ne(task.target_dictionary.pad())
            keys.append(g[real].float())
            values.append(sample["target"][real])
    keys, values = torch.cat(keys), torch.cat(values)
    d = task.target_dictionary
    spec = DatastoreSpec(dim=keys.size(1), key_type="trime_key", metric="ip", dictionary_size=len(d),
                         dictionary_sha256=dictionary_checksum(d), model_path="random",
                         model_sha256=loaded_model_checksum(model))
    writer = DatastoreWriter(folder, spec, capacity=len(values))
    writer.add(keys, values.int())
    writer.commit(1)
    writer.finish_keys()
    writer.build_index(factory, ntrain=50_000, progress_bar=False)
    writer.finalize(nprobe=8)
    return len(values)


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("data")
    p.add_argument("--batches", type=int, default=6, help="rows of the paper's shape (part 1)")
    p.add_argument("--tune-batches", type=int, default=12, help="batches of 8 x 256 tokens (part 2)")
    p.add_argument("--datastore-tokens", type=int, default=200_000)
    p.add_argument("--index", default="IVF256,PQ16")
    p.add_argument("--knn-k", type=int, default=1024)
    return p


def main():
    args = get_parser().parse_args()
    torch.manual_seed(1)

    # 1. the paper's evaluation shape: trime / cache vs plain
    task, cfg = setup(args.data, 3072, 2560)
    state = task.build_model(cfg.model).state_dict()
    pad = task.target_dictionary.pad()
    samples = batches(task, "valid", 2560, 1, args.batches)
    runs = {}
    for name, extra in (("plain", ()), ("trime", ("--eval-memory", "trime")), ("cache", ("--eval-memory", "cache"))):
        t, c = setup(args.data, 3072, 2560, extra)
        runs[name] = (model_for(t, c, state), SequenceScorer(t.target_dictionary))
    rate = timed_scoring(runs, samples, pad)
    print(f"1. fairseq-eval-lm's scorer, rows of 3,072 tokens with 512 scored (2,560 context), {len(samples)} rows "
          f"of WikiText-2 valid, trime_lm_wikitext2_small, torch threads {torch.get_num_threads()}")
    print()
    print("| evaluation | scored tokens/s | vs plain |")
    print("|---|---:|---:|")
    for name, r in rate.items():
        print(f"| {name} | {r:,.0f} | {r / rate['plain']:.2f} |")
    print()

    # 2. trime-tune's 36-point trime_ext grid vs one trime_ext evaluation pass
    with tempfile.TemporaryDirectory() as tmp:
        task, cfg = setup(args.data, 256, 128)
        model = model_for(task, cfg, task.build_model(cfg.model).state_dict())
        n = build_datastore(tmp, model, task, args.datastore_tokens, args.index)
        extra = ("--eval-memory", "trime_ext", "--datastore", tmp, "--knn-k", str(args.knn_k))
        t, c = setup(args.data, 256, 128, extra)
        evaluated = model_for(t, c, model.state_dict())
        memory = evaluated.trime_eval_memory
        tune_args = argparse.Namespace(temperatures="0.5,1,2", interpolation_temperatures="1,2,5,10",
                                       interpolation_lambdas="0.1,0.25,0.4")
        axes = axes_of(memory.options, tune_args)  # the trime_ext record's axes
        points = grid(memory.options, axes)
        samples = batches(t, "valid", 128, 8, args.tune_batches)
        scorer = SequenceScorer(t.target_dictionary)
        seconds = {"eval": 0.0, "tune": 0.0}
        with torch.no_grad():
            scorer.generate([evaluated], samples[0])  # warm-up (model check on the first search)
            for sample in samples:
                start = time.perf_counter()
                scorer.generate([evaluated], sample)
                seconds["eval"] += time.perf_counter() - start
                start = time.perf_counter()
                net_output = evaluated(**sample["net_input"])
                for opt in points:
                    memory.target_log_probs(evaluated.decoder, net_output, sample, opt)
                memory.advance(net_output, sample)
                seconds["tune"] += time.perf_counter() - start
        tokens = sum(int(s["target"].ne(pad).sum()) for s in samples)
    print(f"2. TRIMELM_ext on {len(samples)} batches of 8 x 256 tokens (128 scored) of WikiText-2 valid; datastore of "
          f"{n:,} keys ({args.index}, nprobe 8), K = {args.knn_k}; grid {len(points) - 1} points + the plain model")
    print()
    print("| pass | seconds | scored tokens/s | vs one evaluation |")
    print("|---|---:|---:|---:|")
    for name in ("eval", "tune"):
        label = "fairseq-eval-lm --eval-memory trime_ext" if name == "eval" else f"trime-tune, {len(points)} points"
        print(f"| {label} | {seconds[name]:.2f} | {tokens / seconds[name]:,.0f} | "
              f"{seconds[name] / seconds['eval']:.2f} |")


if __name__ == "__main__":
    main()
