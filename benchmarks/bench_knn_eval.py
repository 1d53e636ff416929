"""Evaluation throughput: plain LM vs kNN-LM vs TRIMELM_ext, on the same batches in one run.

Loads a checkpoint and its datastore exactly as ``fairseq-eval-lm`` would (same
task options, ``get_normalized_probs`` hook, ``SequenceScorer``) and times the
first ``--batches`` batches of a split under each evaluation memory, alternating
the modes batch by batch so that load on a shared machine hits all of them alike.
Prints a markdown table of scored tokens per second and the ratio to the plain
model (the paper, Table 2: 3,600 vs 300 tokens/s on one GPU with FAISS on 32 CPUs).

    OMP_NUM_THREADS=1 python benchmarks/bench_knn_eval.py data-bin/wikitext-2 \\
        --path runs/wikitext2-ext-200/vanilla/checkpoint_last.pt \\
        --datastore runs/wikitext2-ext-200/dstore_vanilla --modes none,knn --knn-k 1024
"""

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))  # normalised: fairseq compares --user-dir paths

from trime_fairseq.cli.loading import eval_batches, eval_lm_config, load_eval_models  # noqa: E402

MODE_ARGS = {
    "none": [],
    "knn": ["--eval-memory", "knn"],
    "knn_rescore": ["--eval-memory", "knn", "--knn-rescore"],
    "trime_ext": ["--eval-memory", "trime_ext"],
}


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("data")
    p.add_argument("--path", required=True)
    p.add_argument("--datastore", required=True)
    p.add_argument("--modes", default="none,knn", help=f"comma list of {sorted(MODE_ARGS)}")
    p.add_argument("--knn-k", default="1024")
    p.add_argument("--knn-nprobe", default=None)
    p.add_argument("--split", default="valid")
    p.add_argument("--batches", type=int, default=20)
    p.add_argument("--eval-args", default="--tokens-per-sample 256 --context-window 128 --batch-size 8")
    return p


def main():
    args = get_parser().parse_args()
    from fairseq.sequence_scorer import SequenceScorer

    modes = args.modes.split(",")
    runs = {}
    for mode in modes:
        argv = [args.data, "--user-dir", "trime_fairseq", "--task", "trime_lm", "--path", args.path,
                "--gen-subset", args.split, "--cpu", "--no-progress-bar", *args.eval_args.split(), *MODE_ARGS[mode]]
        if mode != "none":
            argv += ["--datastore", args.datastore, "--knn-k", args.knn_k]
            if args.knn_nprobe:
                argv += ["--knn-nprobe", args.knn_nprobe]
        cfg, _ = eval_lm_config(argv)
        models, task = load_eval_models(cfg)
        batches = []
        for i, sample in enumerate(eval_batches(cfg, task, models)):
            if i == args.batches:
                break
            batches.append(sample)
        runs[mode] = (models, SequenceScorer(task.target_dictionary), batches, task.target_dictionary.pad())
    seconds = {mode: 0.0 for mode in modes}
    tokens = {mode: 0 for mode in modes}
    with torch.no_grad():
        for mode in modes:  # warm-up (first search checks the model against the datastore), untimed
            models, scorer, batches, _ = runs[mode]
            scorer.generate(models, batches[0])
        for i in range(args.batches):
            for mode in modes:
                models, scorer, batches, pad = runs[mode]
                if i >= len(batches):
                    continue
                sample = batches[i]
                t = time.perf_counter()
                scorer.generate(models, sample)
                seconds[mode] += time.perf_counter() - t
                tokens[mode] += int(sample["target"].ne(pad).sum())
    base = tokens[modes[0]] / seconds[modes[0]]
    print(f"{args.batches} batches of `{args.split}` ({args.eval_args}); K = {args.knn_k}; "
          f"torch threads {torch.get_num_threads()}")
    print()
    print("| evaluation | scored tokens/s | vs " + modes[0] + " |")
    print("|---|---:|---:|")
    for mode in modes:
        rate = tokens[mode] / seconds[mode]
        print(f"| {mode} | {rate:,.0f} | {rate / base:.3f} |")


if __name__ == "__main__":
    main()
