"""Decoding throughput of kNN-MT vs the plain model, in one run, on the same batches.

Builds two datastores of the checkpoint's decoder keys over ``--datastore-split`` (an exact
``Flat`` index and an ``IVF-PQ`` one, L2 as kNN-MT), then decodes the first ``--sentences``
sentences of ``--split`` with beam search (``fairseq-generate``'s SequenceGenerator, incremental
decoding, the per-step search of the live hypotheses) under each setting, alternating the
settings batch by batch, and prints sentences/s and the ratio to plain decoding. Our target was
kNN-MT >= 0.5x plain with IVF-PQ; measured 0.34x (docs/results_mt.md): with a 2.6M-parameter model on one
CPU thread a plain decoding step is so cheap that the search of every step dominates (the kNN-MT paper
reports a slowdown of about two orders of magnitude with its exact search).

    OMP_NUM_THREADS=1 python benchmarks/bench_knn_mt.py data-bin/multi30k \\
        --path runs/multi30k-mt-1000/transformer/checkpoint_last.pt
"""

import argparse
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

import trime_fairseq  # noqa: E402,F401  (first: it keeps fairseq's import from logging at DEBUG)
from fairseq import checkpoint_utils, options, tasks  # noqa: E402
from fairseq.data import data_utils  # noqa: E402
from fairseq.dataclass.utils import convert_namespace_to_omegaconf  # noqa: E402

from trime_fairseq.cli import build_datastore  # noqa: E402


def load(data, path, extra=()):
    argv = [data, "--user-dir", "trime_fairseq", "--task", "trime_translation", "--path", path, "--cpu",
            "--beam", "5", *extra]
    cfg = convert_namespace_to_omegaconf(options.parse_args_and_arch(options.get_generation_parser(), argv))
    task = tasks.setup_task(cfg.task)
    models, _ = checkpoint_utils.load_model_ensemble([path], task=task)
    return task, models[0].eval(), task.build_generator(models, cfg.generation)


def decoding_samples(task, split: str, sentences: int, max_tokens: int):
    """Batches (collated samples) of the first ``sentences`` sentences of ``split``, by fairseq's length order."""
    task.load_dataset(split)
    dataset = task.dataset(split)
    indices = dataset.ordered_indices()
    indices = indices[indices < sentences]
    batches = data_utils.batch_by_size(indices, dataset.num_tokens, max_tokens=max_tokens)
    return [dataset.collater([dataset[i] for i in b]) for b in batches]


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("data")
    p.add_argument("--path", required=True, help="a translation checkpoint")
    p.add_argument("--split", default="test")
    p.add_argument("--datastore-split", default="train")
    p.add_argument("--sentences", type=int, default=300)
    p.add_argument("--max-tokens", type=int, default=4000)
    p.add_argument("--k", type=int, default=16)
    p.add_argument("--ivf", default="IVF256,PQ32", help="the approximate index")
    p.add_argument("--nprobe", type=int, default=8)
    return p


def main():
    args = get_parser().parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        stores = {}
        for name, factory in (("flat", "Flat"), ("ivfpq", args.ivf)):
            out = os.path.join(tmp, name)
            build_datastore.main(build_datastore.get_parser().parse_args(
                ["--path", args.path, "--data", args.data, "--gen-subset", args.datastore_split, "--output", out,
                 "--index-factory", factory, "--metric", "l2", "--nprobe", str(args.nprobe), "--ntrain", "100000",
                 "--cpu", "--no-progress-bar"]))
            stores[name] = out
        runs = {"plain": load(args.data, args.path)}
        for name, out in stores.items():
            runs[f"kNN-MT {name}"] = load(args.data, args.path, ("--eval-memory", "knn", "--datastore", out,
                                                                 "--knn-k", str(args.k)))
        samples = decoding_samples(runs["plain"][0], args.split, args.sentences, args.max_tokens)
        seconds = {name: 0.0 for name in runs}
        with torch.no_grad():
            for name, (t, model, generator) in runs.items():  # warm-up (first search checks the model)
                t.inference_step(generator, [model], samples[0])
            for sample in samples:
                for name, (t, model, generator) in runs.items():
                    start = time.perf_counter()
                    t.inference_step(generator, [model], sample)
                    seconds[name] += time.perf_counter() - start
        n = sum(len(s["id"]) for s in samples)
    base = n / seconds["plain"]
    print(f"beam 5, {n} sentences of {args.split}, K = {args.k}, datastore of {args.datastore_split} "
          f"({args.ivf} nprobe {args.nprobe} vs Flat), torch threads {torch.get_num_threads()}")
    print()
    print("| decoding | sentences/s | vs plain |")
    print("|---|---:|---:|")
    for name, s in seconds.items():
        print(f"| {name} | {n / s:.1f} | {n / s / base:.2f} |")


if __name__ == "__main__":
    main()
