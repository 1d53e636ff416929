"""Fast retrieval for kNN-LM / kNN-MT, in one run: compressed indexes and skipped searches vs exact kNN and plain.

For a checkpoint and its data -- a language model (task ``trime_lm`` / ``language_modeling``) or
a translation model (``trime_translation`` / ``translation``), read from the checkpoint -- it

1. builds, with ``trime-build-datastore`` over ``--datastore-split`` (metric l2, kNN-LM / kNN-MT's),
   the exact datastore (``Flat``) and one per ``--indexes`` factory (IVF-PQ, OPQ / PCA
   compressions; the memmap keys are stored in float16, the default), plus a ``Flat`` datastore
   of ``--split`` whose keys are the queries of the recall measurement;
2. reports recall@K of every approximate index against the exact ``Flat`` search (share of the
   exact top K found, over ``--recall-queries`` queries of ``--split``);
3. trains the retrieval-skip predictor (``trime-train-skip-predictor``, He et al. 2021) on
   ``--skip-split`` with the exact datastore (its threshold chosen there);
4. evaluates ``--split`` (LM: the first ``--batches`` batches with ``fairseq-eval-lm``'s scorer;
   MT: beam search over the first ``--sentences`` sentences) under every setting -- plain,
   exact kNN, each index, each index with skipping, exact with skipping -- alternating the
   settings batch by batch in one process (so load on a shared machine hits all alike), and
   prints tokens/s (sentences/s), the ratio to plain, perplexity (BLEU) and its difference to
   exact kNN, and the fraction of positions whose search was skipped.

Targets (issue 19): kNN-MT >= 0.8x plain sentences/s with BLEU within 0.3 of exact kNN-MT;
kNN-LM evaluation >= 0.5x plain tokens/s with perplexity within 1% of exact::

    OMP_NUM_THREADS=1 python benchmarks/bench_fast_retrieval.py data-bin/wikitext-103 --path lm.pt \\
        --eval-args "--tokens-per-sample 3072 --context-window 2560 --batch-size 1" --k 1024
    OMP_NUM_THREADS=1 python benchmarks/bench_fast_retrieval.py data-bin/multi30k --path mt.pt --k 16 \\
        --split test --skip-split valid --sentences 300

(``--knn-gpu`` searches on the GPU with faiss-gpu; ``--work DIR`` keeps the datastores for a rerun.)
"""

import argparse
import json
import math
import os
import sys
import tempfile
import time
from typing import Dict, List, Tuple

import numpy as np
import torch

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench_knn_mt's decoding batches

import trime_fairseq  # noqa: E402,F401  (first: it keeps fairseq's import from logging at DEBUG)
from trime_fairseq.cli import build_datastore  # noqa: E402

DEFAULT_INDEXES = "IVF256,PQ32;OPQ32_128,IVF256,PQ32;PCA64,IVF256,Flat"


EXACT = "kNN exact (Flat)"  # the setting every approximate one is compared with


def recall_at_k(exact_ids: np.ndarray, approx_ids: np.ndarray) -> float:
    """Mean over queries of |exact top K ∩ approximate top K| / |exact top K|: ids (Q, K) int, -1 = no hit."""
    if exact_ids.shape[0] != approx_ids.shape[0]:
        raise ValueError(f"{exact_ids.shape[0]} exact rows vs {approx_ids.shape[0]} approximate rows")
    shares = []
    for exact, approx in zip(exact_ids, approx_ids):
        truth = set(int(i) for i in exact if i >= 0)
        if truth:
            shares.append(len(truth & set(int(i) for i in approx if i >= 0)) / len(truth))
    return float(np.mean(shares)) if shares else float("nan")


def build(args, out: str, split: str, factory: str) -> str:
    if not os.path.exists(os.path.join(out, "datastore.json")):
        build_datastore.main(build_datastore.get_parser().parse_args(
            ["--path", args.path, "--data", args.data, "--gen-subset", split, "--output", out, "--index-factory",
             factory, "--metric", "l2", "--nprobe", str(args.nprobes[0]), "--ntrain", str(args.ntrain),
             "--no-progress-bar"] + (["--cpu"] if not args.knn_gpu else []) + args.build_args.split()))
    return out


def recall_table(stores: Dict[str, str], queries_store: str, k: int, n: int, nprobes: List[int]) -> List[dict]:
    from trime_fairseq.memory.datastore import Datastore

    keys = Datastore.load(queries_store).keys
    rows = np.random.default_rng(0).choice(len(keys), size=min(n, len(keys)), replace=False)
    queries = np.asarray(keys[np.sort(rows)], dtype=np.float32)
    exact = Datastore.load(stores["Flat"])
    kk = min(k, exact.size)
    _, exact_ids = exact.search_ids(queries, kk)
    out = []
    for name, path in stores.items():
        if name == "Flat":
            continue
        for nprobe in (nprobes if "IVF" in name else [None]):
            store = Datastore.load(path, nprobe=nprobe)
            _, ids = store.search_ids(queries, kk)
            out.append(dict(index=name, nprobe=nprobe, recall=recall_at_k(exact_ids, ids),
                            disk_mb=os.path.getsize(os.path.join(path, "index.faiss")) / 2 ** 20))
    return out


def settings(args, stores, skip_file) -> Dict[str, List[str]]:
    """setting name -> memory flags (plain first, exact kNN second)."""
    out = {"plain": []}
    knn = ["--eval-memory", "knn", "--knn-k", str(args.k)] + args.knn_args.split() + (
        ["--knn-gpu"] if args.knn_gpu else [])
    skip = ["--knn-skip-predictor", skip_file]
    out[EXACT] = knn + ["--datastore", stores["Flat"]]
    approximate = []
    for name, path in stores.items():
        if name == "Flat":
            continue
        for nprobe in (args.nprobes if "IVF" in name else [None]):
            label = f"kNN {name}" + (f" nprobe {nprobe}" if nprobe is not None and len(args.nprobes) > 1 else "")
            out[label] = knn + ["--datastore", path] + (["--knn-nprobe", str(nprobe)] if nprobe is not None else [])
            approximate.append(label)
    if args.rescore:  # the same hits, re-ranked (and their weights computed) with the exact float16 keys
        for label in approximate:
            out[f"{label} + rescore"] = out[label] + ["--knn-rescore"]
    if skip_file:
        out["kNN exact + skip"] = out[EXACT] + skip
        for label in approximate:
            out[f"{label} + skip"] = out[label] + skip
    return out


# -- language models ------------------------------------------------------------------------------------------------

def lm_runs(args, flags: Dict[str, List[str]]):
    from fairseq.sequence_scorer import SequenceScorer

    from trime_fairseq.cli.loading import eval_batches, eval_lm_config, load_eval_models

    runs = {}
    for name, extra in flags.items():
        argv = [args.data, "--user-dir", "trime_fairseq", "--task", "trime_lm", "--path", args.path, "--gen-subset",
                args.split, "--no-progress-bar", *args.eval_args.split(), *extra] + (
            ["--cpu"] if not args.knn_gpu else [])
        cfg, _ = eval_lm_config(argv)
        models, task = load_eval_models(cfg)
        batches = [b for _, b in zip(range(args.batches), eval_batches(cfg, task, models))]
        runs[name] = (models, SequenceScorer(task.target_dictionary), batches)
    return runs


def lm_measure(args, runs):
    scores = {name: [] for name in runs}

    def score(name, i):
        models, scorer, batches = runs[name]
        return scorer.generate(models, batches[i]) if i < len(batches) else None

    def record(name, hypos):
        scores[name] += [h[0]["positional_scores"].float().cpu() for h in hypos]

    with torch.no_grad():
        for models, scorer, batches in runs.values():  # warm-up (first search checks the model), untimed
            scorer.generate(models, batches[0])
        reset(runs)
        seconds = interleaved(list(runs), max(len(b) for _, _, b in runs.values()), args.repeats, score, record)
    out = {}
    for name in runs:
        lp = torch.cat(scores[name])
        out[name] = dict(rate=lp.numel() * len(seconds[name]) / sum(seconds[name]),
                         quality=math.exp(-float(lp.double().mean())), skipped=skipped_share(runs[name][0][0]),
                         ratios=ratios(seconds, name))
    return out, "scored tokens/s", "perplexity"


def lm_profile(runs, top: int) -> None:
    """cProfile of one pass over every setting's batches (after the timed passes), the ``top`` functions by own
    time per setting: where a setting's time goes (docs/results_datastore.md)."""
    import cProfile
    import pstats

    reset(runs)
    with torch.no_grad():
        for name, (models, scorer, batches) in runs.items():
            profiler = cProfile.Profile()
            start = time.perf_counter()
            profiler.enable()
            for batch in batches:
                scorer.generate(models, batch)
            profiler.disable()
            print(f"\n## profile: {name} ({len(batches)} batches, {time.perf_counter() - start:.2f} s)")
            pstats.Stats(profiler, stream=sys.stdout).sort_stats("tottime").print_stats(top)


# -- translation ------------------------------------------------------------------------------------------------------

def mt_runs(args, flags: Dict[str, List[str]]):
    from fairseq import checkpoint_utils, options, tasks
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf

    runs = {}
    for name, extra in flags.items():
        argv = [args.data, "--user-dir", "trime_fairseq", "--task", "trime_translation", "--path", args.path,
                "--beam", str(args.beam), *args.eval_args.split(), *extra] + (["--cpu"] if not args.knn_gpu else [])
        cfg = convert_namespace_to_omegaconf(options.parse_args_and_arch(options.get_generation_parser(), argv))
        task = tasks.setup_task(cfg.task)
        models, _ = checkpoint_utils.load_model_ensemble([args.path], task=task)
        model = models[0].eval()
        if args.knn_gpu:
            model.cuda()
        runs[name] = (cfg, task, model, task.build_generator(models, cfg.generation))
    return runs


def mt_measure(args, runs):
    from bench_knn_mt import decoding_samples
    from fairseq import utils

    from trime_fairseq.cli.tune_mt import bleu

    samples = decoding_samples(runs["plain"][1], args.split, args.sentences, args.max_tokens)
    if args.knn_gpu:
        samples = [utils.move_to_cuda(s) for s in samples]

    def decode(name, i):
        _, t, model, generator = runs[name]
        return t.inference_step(generator, [model], samples[i])

    with torch.no_grad():
        for _, t, model, generator in runs.values():  # warm-up, untimed
            t.inference_step(generator, [model], samples[0])
        reset(runs)
        seconds = interleaved(list(runs), len(samples), args.repeats, decode, lambda name, out: None)
    n = sum(len(s["id"]) for s in samples)
    out = {}
    for name, (c, t, model, generator) in runs.items():
        skipped = skipped_share(model)  # of the timed passes (BLEU decodes once more)
        out[name] = dict(rate=n * len(seconds[name]) / sum(seconds[name]),
                         quality=bleu(c, t, model, samples, generator), skipped=skipped, ratios=ratios(seconds, name))
    return out, "sentences/s", "BLEU"


# -- both ---------------------------------------------------------------------------------------------------------------

def interleaved(names: List[str], count: int, repeats: int, call, record,
                once: Tuple[str, ...] = (EXACT,)) -> Dict[str, List[float]]:
    """Seconds of every setting in each of ``repeats`` timed passes over items 0..count-1, the settings alternated
    item by item (load hits them alike). ``call(name, i)`` runs item i (None: the setting has no item i, untimed);
    ``record(name, result)`` keeps the first pass's results. The settings in ``once`` are timed in the first pass
    only (exact search: its rate is no target and it is the slowest by far)."""
    seconds = {name: [] for name in names}
    for r in range(repeats):
        timed = [name for name in names if r == 0 or name not in once]
        for name in timed:
            seconds[name].append(0.0)
        for i in range(count):
            for name in timed:
                start = time.perf_counter()
                result = call(name, i)
                if result is None:
                    continue
                seconds[name][r] += time.perf_counter() - start
                if r == 0:
                    record(name, result)
    return seconds


def ratios(seconds: Dict[str, List[float]], name: str) -> List[float]:
    """The setting's rate over plain's in each timed pass it took part in."""
    return [plain / own for plain, own in zip(seconds["plain"], seconds[name])]


def external_of(model_or_run):
    memory = getattr(model_or_run, "trime_eval_memory", None)
    return None if memory is None else memory.external


def reset(runs):
    for run in runs.values():
        model = run[0][0] if isinstance(run[0], list) else run[2]
        external = external_of(model)
        if external is not None:
            external.searched = external.skipped = 0


def skipped_share(model):
    external = external_of(model)
    if external is None or external.skip is None:
        return None
    total = external.searched + external.skipped
    return external.skipped / total if total else float("nan")


def report(args, results, rate_name, quality_name, recalls, translation: bool):
    base = results["plain"]["rate"]
    exact = results[EXACT]["quality"]
    unit = "ΔBLEU vs exact" if translation else "vs exact"
    print(f"{'translation' if translation else 'language model'} {args.path}; {args.split}; K = {args.k}; "
          f"nprobe {args.nprobe}; datastore of {args.datastore_split} (float16 keys); skip predictor trained on "
          f"{args.skip_split}; torch threads {torch.get_num_threads()}; settings alternated batch by batch; "
          f"{args.repeats} timed pass(es), vs plain: over all passes (min-max of the passes)")
    print()
    print(f"| setting | {rate_name} | vs plain | {quality_name} | {unit} | skipped |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, r in results.items():
        diff = r["quality"] - exact if translation else r["quality"] / exact - 1
        shown = f"{diff:+.2f}" if translation else f"{diff:+.2%}"
        skipped = "—" if r["skipped"] is None else f"{r['skipped']:.3f}"
        spread = f" ({min(r['ratios']):.3f}-{max(r['ratios']):.3f})" if len(r["ratios"]) > 1 else ""
        print(f"| {name} | {r['rate']:,.1f} | {r['rate'] / base:.3f}{spread} | {r['quality']:.3f} | {shown} | "
              f"{skipped} |")
    print()
    print(f"| index (vs exact Flat) | recall@{args.k} | index file (MiB) |")
    print("|---|---:|---:|")
    for row in recalls:
        probe = f" nprobe {row['nprobe']}" if row["nprobe"] else ""
        print(f"| {row['index']}{probe} | {row['recall']:.3f} | {row['disk_mb']:.1f} |")


def translation_checkpoint(path: str) -> bool:
    from fairseq import checkpoint_utils

    state = checkpoint_utils.load_checkpoint_to_cpu(path)
    return state["cfg"].task._name in build_datastore.MT_TASKS


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("data")
    p.add_argument("--path", required=True, help="a language-model or translation checkpoint")
    p.add_argument("--split", default="test", help="the split evaluated (and the recall queries)")
    p.add_argument("--skip-split", default="valid", help="the split the skip predictor is trained on")
    p.add_argument("--datastore-split", default="train")
    p.add_argument("--indexes", default=DEFAULT_INDEXES, help="';'-separated FAISS factories of the approximate "
                   "(compressed) datastores")
    p.add_argument("--nprobe", default="8", help="inverted lists probed by the IVF indexes; a comma-separated list "
                   "evaluates each (the datastores are built with the first)")
    p.add_argument("--rescore", action="store_true", help="also evaluate every approximate index with --knn-rescore "
                   "(its hits re-ranked and weighted with the exact stored keys)")
    p.add_argument("--ntrain", type=int, default=100_000)
    p.add_argument("--k", type=int, default=16)
    p.add_argument("--knn-args", default="", help="further kNN flags, e.g. '--knn-temperature 10 --knn-lambda 0.5'")
    p.add_argument("--eval-args", default="", help="LM: fairseq-eval-lm flags (--tokens-per-sample, --context-window, "
                   "--batch-size); MT: fairseq-generate flags (--remove-bpe ...)")
    p.add_argument("--build-args", default="", help="further trime-build-datastore flags (--max-tokens ...)")
    p.add_argument("--skip-args", default="", help="further trime-train-skip-predictor flags")
    p.add_argument("--no-skip", action="store_true", help="leave out the skip predictor settings")
    p.add_argument("--recall-queries", type=int, default=500)
    p.add_argument("--batches", type=int, default=20, help="LM: batches of --split evaluated")
    p.add_argument("--sentences", type=int, default=300, help="MT: sentences of --split decoded")
    p.add_argument("--beam", type=int, default=5)
    p.add_argument("--max-tokens", type=int, default=4000, help="MT: tokens per decoding batch")
    p.add_argument("--knn-gpu", action="store_true", help="run the model on CUDA and search with faiss-gpu")
    p.add_argument("--work", default=None, help="keep the datastores and the predictor here (default: a temp dir)")
    p.add_argument("--json", default=None, help="also write the results to this file")
    p.add_argument("--repeats", type=int, default=1, help="timed passes over the batches / sentences (scores from "
                   "the first); exact search is timed in the first only")
    p.add_argument("--profile", type=int, default=0, metavar="N", help="LM: after the measurement, cProfile one "
                   "pass of every setting and print its N most expensive functions (own time)")
    return p


def main(argv=None):
    args = get_parser().parse_args(argv)
    args.nprobes = [int(p) for p in args.nprobe.split(",") if p]
    if not args.nprobes or min(args.nprobes) < 1:
        raise SystemExit(f"--nprobe: one or more positive integers, got {args.nprobe!r}")
    translation = translation_checkpoint(args.path)
    if args.repeats < 1:
        raise SystemExit(f"--repeats: a positive integer, got {args.repeats}")
    if args.profile and translation:
        raise SystemExit("--profile: language models only")
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or tmp
        stores = {"Flat": build(args, os.path.join(work, "flat"), args.datastore_split, "Flat")}
        for i, factory in enumerate(f for f in args.indexes.split(";") if f):
            stores[factory] = build(args, os.path.join(work, f"index{i}"), args.datastore_split, factory)
        queries = build(args, os.path.join(work, f"queries-{args.split}"), args.split, "Flat")
        recalls = recall_table(stores, queries, args.k, args.recall_queries, args.nprobes)
        skip_file = None
        if not args.no_skip:
            from trime_fairseq.cli import train_skip_predictor

            skip_file = os.path.join(work, "skip.json")
            train_skip_predictor.main(
                [args.data, "--user-dir", "trime_fairseq", "--task",
                 "trime_translation" if translation else "trime_lm", "--path", args.path, "--gen-subset",
                 args.skip_split, "--eval-memory", "knn", "--datastore", stores["Flat"], "--knn-k", str(args.k),
                 "--output", skip_file, "--no-progress-bar", *args.knn_args.split(), *args.skip_args.split()]
                + ([] if translation else args.eval_args.split()) + (["--cpu"] if not args.knn_gpu else []))
        flags = settings(args, stores, skip_file)
        if translation:
            results, rate_name, quality_name = mt_measure(args, mt_runs(args, flags))
        else:
            runs = lm_runs(args, flags)
            results, rate_name, quality_name = lm_measure(args, runs)
            if args.profile:
                lm_profile(runs, args.profile)
    report(args, results, rate_name, quality_name, recalls, translation)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(results=results, recall=recalls, args=vars(args)), f, indent=2)
    return results, recalls


if __name__ == "__main__":
    main()
