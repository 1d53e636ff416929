"""The shell pipelines' shared helpers (scripts/lib.sh): one parser of fairseq-eval-lm's perplexity for every script."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PIPELINES = sorted((ROOT / "scripts").glob("wikitext2_*.sh"))
EVAL_LM_LOG = """2026-12-06 03:00:00 | INFO | fairseq_cli.eval_lm | num. model params: 1,513,344
2026-12-06 03:01:00 | INFO | fairseq_cli.eval_lm | Evaluated 217,646 tokens in 60.0s (3627.43 tokens/s)
2026-12-06 03:01:00 | INFO | fairseq_cli.eval_lm | Loss (base 2): 8.1955, Perplexity: 293.18
"""


def helper(call: str, stdin: str = "") -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", f"set -euo pipefail; source scripts/lib.sh; {call}"], cwd=ROOT,
                          input=stdin, capture_output=True, text=True)


def test_perplexity_reads_a_log_file_or_stdin(tmp_path):
    log = tmp_path / "eval.log"
    log.write_text(EVAL_LM_LOG)
    assert helper(f"perplexity {log}").stdout == "293.18\n"
    assert helper("perplexity", EVAL_LM_LOG).stdout == "293.18\n"
    # two evaluations in one log (a resumed run): the last one counts
    assert helper("perplexity", EVAL_LM_LOG + EVAL_LM_LOG.replace("293.18", "290.5")).stdout == "290.5\n"


def test_best_flags_of_reads_the_tuners_best_line(tmp_path):
    out = tmp_path / "tune.txt"
    out.write_text("  212.10  --eval-memory cache --cache-lambda 0.1\nbest: --eval-memory cache --cache-lambda 0.2 "
                   "--cache-theta 0.05  (valid perplexity 213.22; without memory 287.61)\n")
    assert helper(f"best_flags_of {out}").stdout == "--eval-memory cache --cache-lambda 0.2 --cache-theta 0.05\n"
    assert helper("best_flags_of", "no best line: the tune was interrupted\n").stdout == ""


def test_perplexity_fails_on_a_log_without_one():
    """Under the pipelines' ``set -o pipefail`` a crashed evaluation is an error, not an empty number."""
    done = helper("perplexity", "Traceback (most recent call last):\n")
    assert done.returncode != 0 and done.stdout == ""


@pytest.mark.parametrize("script", PIPELINES, ids=lambda p: p.name)
def test_pipelines_parse_and_share_the_perplexity_parser(script):
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    text = script.read_text()
    if "fairseq-eval-lm" in text:
        assert 'grep -o "Perplexity' not in text, f"{script.name}: use perplexity from scripts/lib.sh"


STUBS = {  # fake CLIs for a dry run of a pipeline: each logs its call and writes the output the script checks for
    "fairseq-hydra-train": 'for a in "$@"; do case $a in checkpoint.save_dir=*) d=${a#*=};; esac; done\n'
                           'mkdir -p "$d"; touch "$d/checkpoint_last.pt"; echo "done training in 1.0 seconds"',
    "trime-bm25-batches": 'while [ $# -gt 0 ]; do [ "$1" = --output ] && echo 0 > "$2"; shift; done',
    "trime-build-datastore": 'while [ $# -gt 0 ]; do [ "$1" = --output ] && { mkdir -p "$2"; echo {} > "$2/datastore.json"; }; '
                             'shift; done',
    "trime-retrieval-accuracy": 'while [ $# -gt 0 ]; do [ "$1" = --output-json ] && echo \'{"accuracy": {"1": 0.1, '
                                '"8": 0.2, "64": 0.3, "1024": 0.4}, "metric": "l2", "positions": 5}\' > "$2"; shift; done',
    "fairseq-eval-lm": 'echo "Loss (base 2): 8.0, Perplexity: 256.00"',
    "trime-tune": "exit 1",  # a seed run with FLAGS_FROM must not tune
    "trime-tune-mt": 'case "$*" in *"--eval-memory knn"*) f="--eval-memory knn --knn-k 8 --knn-temperature 10 '
                     '--knn-lambda 0.3";; *) f="--eval-memory trime_ext --knn-k 16 --memory-temperature 1";; esac\n'
                     'echo "best: $f  (valid BLEU 30.00; without memory 27.00)"',
    "fairseq-generate": 'echo "H-0\t-0.1\ta hypothesis"',
    "python": 'if [ "$1" = scripts/sacrebleu_from_generate.py ]; then echo "BLEU = 31.25 60.0/40.0/30.0/20.0 '
              '(BP = 1.000) | nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:2.4.0 |"; '
              'else exec "$REAL_PYTHON" "$@"; fi',
}
FLAGS = {"cache": "--eval-memory cache --cache-lambda 0.2 --cache-theta 0.05",
         "cache_long": "--eval-memory cache --cache-lambda 0.3 --cache-theta 0.1",
         "knn": "--eval-memory knn --knn-temperature 5 --knn-lambda 0.25",
         "knn_cache": "--eval-memory knn --knn-temperature 5 --knn-lambda 0.4 --cache-lambda 0.2 --cache-theta 0.05",
         "knn_cache_long": "--eval-memory knn --knn-temperature 5 --knn-lambda 0.4 --cache-lambda 0.3 --cache-theta 0.1",
         "trime_ext": "--eval-memory trime_ext --memory-temperature 4 --interpolation-temperature 0.25",
         "trime_ext_long": "--eval-memory trime_ext --memory-temperature 4 --interpolation-temperature 0.25"}


def stubbed_run(tmp_path, script: str, env: dict, stubs: dict = None) -> tuple[subprocess.CompletedProcess, list[str]]:
    """Run scripts/SCRIPT with the STUBS (updated by ``stubs``) in front of PATH; returns its result and the calls."""
    import os
    bin_dir, log = tmp_path / "bin", tmp_path / "calls.log"
    bin_dir.mkdir(exist_ok=True)
    for name, body in {**STUBS, **(stubs or {})}.items():
        stub = bin_dir / name
        logged = "" if name == "python" else f'echo "{name} $*" >> "{log}"\n'  # python: only the stubbed script
        stub.write_text(f'#!/usr/bin/env bash\n{logged}{body}\n')
        stub.chmod(0o755)
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    (data / "dict.txt").write_text("a 1\n")
    (data / "dict.en.txt").write_text("a 1\n")
    (data / "bm25-target.order").write_text("0\n")
    full_env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "DATA": str(data),
                "REAL_PYTHON": sys.executable, **env}
    done = subprocess.run(["bash", f"scripts/{script}"], cwd=ROOT, env=full_env, capture_output=True, text=True)
    return done, log.read_text().splitlines() if log.exists() else []


def test_pipelines_run_another_seed_with_seed_1s_flags(tmp_path):
    """SEED trains the models with that seed in their own folder; FLAGS_FROM replaces every tuning by seed 1's
    settings (no trime-tune call); the external-memory pipeline reuses the comparison's vanilla LM of the same seed
    (refusing one that is still training); a run whose own flags disagree with FLAGS_FROM's stops."""
    ref = tmp_path / "seed1"
    ref.mkdir()
    for name, flags in {**FLAGS, "trime": "--eval-memory trime --memory-temperature 1"}.items():
        (ref / f"best_{name}.flags").write_text(flags + "\n")
    compare = tmp_path / "compare_seed2"
    done, calls = stubbed_run(tmp_path, "wikitext2_compare.sh",
                              {"UPDATES": "20", "SEED": "2", "OUT": str(compare), "FLAGS_FROM": str(ref)})
    assert done.returncode == 0, done.stderr
    trainings = [c for c in calls if c.startswith("fairseq-hydra-train")]
    assert len(trainings) == 2 and all("common.seed=2" in c for c in trainings)
    assert {"criterion._name=adaptive_loss", "criterion._name=trime_loss"} <= {w for c in trainings for w in c.split()}
    assert not [c for c in calls if c.startswith("trime-tune")]
    assert "| TRIMELM | `--eval-memory trime --memory-temperature 1` | 256.00 | 256.00 |" in \
        (compare / "results.md").read_text()

    compare_calls = calls
    vanilla = compare / "vanilla" / "checkpoint_last.pt"
    out = tmp_path / "seed2"
    env = {"UPDATES": "20", "SEED": "2", "OUT": str(out), "FLAGS_FROM": str(ref), "VANILLA": str(vanilla)}
    log = (compare / "train_vanilla.log").read_text()
    (compare / "train_vanilla.log").write_text("epoch 001\n")  # the comparison's vanilla LM still training
    done, _ = stubbed_run(tmp_path, "wikitext2_external.sh", env)
    assert done.returncode != 0 and "still training" in done.stderr
    (compare / "train_vanilla.log").write_text(log)
    done, calls = stubbed_run(tmp_path, "wikitext2_external.sh", env)
    assert done.returncode == 0, done.stderr
    calls = calls[len(compare_calls):]  # the external pipeline's own
    trainings = [c for c in calls if c.startswith("fairseq-hydra-train")]
    assert len(trainings) == 1 and "common.seed=2" in trainings[0] and "configs/trime_ext" in trainings[0]
    assert f"checkpoint.save_dir={out}/trime_ext" in trainings[0]
    assert not [c for c in calls if c.startswith("trime-tune")]
    dstores = [c for c in calls if c.startswith("trime-build-datastore")]  # the evaluation's rows (lib.sh)
    assert len(dstores) == 2 and all("--tokens-per-sample 256 --context-window 128 --batch-size 8" in c
                                     and "--gen-subset train" in c for c in dstores)
    assert {c.split("--metric ")[1].split()[0] for c in dstores} == {"l2", "ip"}
    evals = [c for c in calls if c.startswith("fairseq-eval-lm")]
    assert len(evals) == 14  # 7 rows x valid, test
    assert any(FLAGS["knn_cache_long"] in c and "--long-memory-size 1024" in c and f"--path {vanilla}" in c
               for c in evals)
    assert "| TRIMELM_ext (long memory 1024) |" in (out / "results.md").read_text()
    # a second run skips everything that is done
    done, calls_again = stubbed_run(tmp_path, "wikitext2_external.sh", env)
    assert done.returncode == 0 and calls_again == compare_calls + calls
    # flags that disagree with FLAGS_FROM's are an error, not silently replaced
    (out / "best_knn.flags").write_text("--eval-memory knn --knn-temperature 9 --knn-lambda 0.25\n")
    done, _ = stubbed_run(tmp_path, "wikitext2_external.sh", env)
    assert done.returncode != 0 and "differs from FLAGS_FROM" in done.stderr


def test_seed_table_means_and_refuses_missing_seeds(tmp_path):
    for seed, (a, b) in {"1": (300.0, 200.0), "2": (310.0, 205.0), "3": (290.0, 195.0)}.items():
        for split in ("valid", "test"):
            (tmp_path / f"vanilla_s{seed}.{split}").write_text(f"{a}\n")
            (tmp_path / f"memory_s{seed}.{split}").write_text(f"{b}\n")
    args = ["python", "scripts/seed_table.py", "--ppl", f"{tmp_path}/{{row}}_s{{seed}}.{{split}}", "--seeds", "1", "2",
            "3", "--row", "vanilla=vanilla", "--row", "memory=with memory", "--paired", "memory-vanilla"]
    done = subprocess.run(args, cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "| vanilla | 300.00 / 300.00 | 310.00 / 310.00 | 290.00 / 290.00 | 300.00 ± 10.00 | 300.00 ± 10.00 |" \
        in done.stdout
    assert "with memory − vanilla, test, paired by seed: -100.00, -105.00, -95.00; mean -100.00 ± 5.00" in done.stdout
    (tmp_path / "memory_s2.test").unlink()
    done = subprocess.run(args, cwd=ROOT, capture_output=True, text=True)
    assert done.returncode != 0 and "memory_s2.test is missing" in done.stderr and not done.stdout


def test_seed_table_reads_a_bleu_line(tmp_path):
    """--number: the score is a regex group of the file (the BLEU line multi30k_mt.sh writes per row)."""
    for seed, bleu in {"1": 36.1, "2": 35.7}.items():
        (tmp_path / f"gen_knn_s{seed}.bleu").write_text(f"BLEU = {bleu} 70.1/45.0/30.2/20.9 (BP = 1.000) | nrefs:1 |\n")
    args = ["python", "scripts/seed_table.py", "--file", f"{tmp_path}/gen_{{row}}_s{{seed}}.bleu", "--number",
            "^BLEU = ([0-9.]+)", "--splits", "test", "--seeds", "1", "2", "--row", "knn=kNN-MT"]
    done = subprocess.run(args, cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "| kNN-MT | 36.10 | 35.70 | 35.90 ± 0.28 |" in done.stdout
    (tmp_path / "gen_knn_s2.bleu").write_text("Traceback: sacrebleu failed\n")
    done = subprocess.run(args, cwd=ROOT, capture_output=True, text=True)
    assert done.returncode != 0 and "gen_knn_s2.bleu has no match" in done.stderr and not done.stdout


def test_seed_table_scales_fractions_to_percent(tmp_path):
    """--scale 100: the retrieval accuracies of trime-retrieval-accuracy's JSON (fractions) as percent, paired too."""
    for seed, (a, b) in {"1": (0.1008, 0.0881), "2": (0.1004, 0.0870)}.items():
        for row, acc in (("vanilla", a), ("trime_ext", b)):
            (tmp_path / f"retrieval_{row}_s{seed}.json").write_text(json.dumps({"accuracy": {"1": acc, "8": 0.3}}))
    done = subprocess.run(["python", "scripts/seed_table.py", "--file", f"{tmp_path}/retrieval_{{row}}_s{{seed}}.json",
                           "--number", '"1": ([0-9.]+)', "--scale", "100", "--splits", "valid", "--seeds", "1", "2",
                           "--row", "vanilla=vanilla", "--row", "trime_ext=TRIMELM_ext", "--paired", "trime_ext-vanilla"],
                          cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "| vanilla | 10.08 | 10.04 | 10.06 ± 0.03 |" in done.stdout
    assert "paired by seed: -1.27, -1.34; mean -1.31 ± 0.05" in done.stdout


def test_mt_pipeline_runs_one_chain_per_model(tmp_path):
    """scripts/multi30k_mt.sh: each model's chain (training, datastore, tuning, test2016) follows its own training;
    the table holds every row with the tuned flags; a second run redoes nothing."""
    out = tmp_path / "mt"
    env = {"UPDATES": "20", "SEED": "2", "OUT": str(out), "IWSLT": "/nonexistent",
           "TRIME": "criterion.train_memory_topk=8"}
    done, calls = stubbed_run(tmp_path, "multi30k_mt.sh", env)
    assert done.returncode == 0, done.stderr
    trainings = [c for c in calls if c.startswith("fairseq-hydra-train")]
    assert len(trainings) == 2 and all("common.seed=2" in c for c in trainings)
    assert any("criterion._name=cross_entropy" in c and "task.batching=shuffled" in c for c in trainings)
    assert any("criterion.train_memory_topk=8" in c and "task.bm25_order=" in c for c in trainings)
    for model, memory in (("transformer", "knn"), ("trime_mt", "trime_ext")):
        chain = [c for c in calls if f"{out}/{model}/" in c or f"checkpoint.save_dir={out}/{model}" in c]
        kinds = [c.split()[0] for c in chain]
        assert kinds == ["fairseq-hydra-train", "trime-build-datastore", "trime-tune-mt", "fairseq-generate",
                         "fairseq-generate"], kinds
        assert f"--eval-memory {memory}" in chain[2] and f"--results-json {out}/tune_" in chain[2]
        metric = "l2" if model == "transformer" else "ip"
        if model == "trime_mt":  # τ: the paper's 1 and none other (TRIME sets no training temperature here)
            assert "--temperatures 1 " in chain[2], chain[2]
        assert f"--metric {metric} --index-factory IVF1024,Flat --nprobe 32" in chain[1], chain[1]
    table = (out / "results.md").read_text()
    assert "| Transformer: kNN-MT | `--eval-memory knn --knn-k 8 --knn-temperature 10 --knn-lambda 0.3` " \
           "(Multi30k train) | 31.25 |" in table
    assert table.count("| 31.25 |") == 4
    done, again = stubbed_run(tmp_path, "multi30k_mt.sh", env)
    assert done.returncode == 0 and again == calls


def test_mt_pipeline_runs_another_seed_with_seed_1s_flags(tmp_path):
    """scripts/multi30k_mt.sh with FLAGS_FROM: both models are trained with the seed, their datastores built and
    test2016 decoded with the first run's tuned flags; nothing is tuned; disagreeing flags stop the run."""
    first = tmp_path / "seed1"
    done, _ = stubbed_run(tmp_path, "multi30k_mt.sh", {"UPDATES": "20", "OUT": str(first), "IWSLT": "/nonexistent"})
    assert done.returncode == 0, done.stderr
    (first / "tune_knn.flags").write_text("--eval-memory knn --knn-k 4 --knn-temperature 100 --knn-lambda 0.5\n")
    (tmp_path / "calls.log").unlink()
    out = tmp_path / "seed2"
    env = {"UPDATES": "20", "SEED": "2", "OUT": str(out), "IWSLT": "/nonexistent", "FLAGS_FROM": str(first)}
    done, calls = stubbed_run(tmp_path, "multi30k_mt.sh", env)
    assert done.returncode == 0, done.stderr
    assert not [c for c in calls if c.startswith("trime-tune-mt")]
    assert [c.split()[0] for c in calls].count("trime-build-datastore") == 2
    assert all("common.seed=2" in c for c in calls if c.startswith("fairseq-hydra-train"))
    assert any("--eval-memory knn --knn-k 4 --knn-temperature 100 --knn-lambda 0.5" in c and "gen-subset test" in c
               for c in calls if c.startswith("fairseq-generate"))
    assert f"tuned on {first}'s valid" in (out / "results.md").read_text()
    (out / "tune_trime_ext.flags").write_text("--eval-memory trime_ext --knn-k 64\n")
    done, _ = stubbed_run(tmp_path, "multi30k_mt.sh", env)
    assert done.returncode != 0 and "differs from FLAGS_FROM" in done.stderr


def test_mt_pipeline_tunes_trime_at_its_training_temperature_too(tmp_path):
    """TRIME-MT trained with criterion.train_memory_temperature=10 (the released objective) has sims scaled for τ 10:
    its evaluation grid holds the paper's τ 1 and 10."""
    env = {"UPDATES": "20", "OUT": str(tmp_path / "mt"), "IWSLT": "/nonexistent",
           "TRIME": "criterion.train_memory_topk=8 criterion.train_memory_temperature=10 +criterion.forward_chunks=4"}
    done, calls = stubbed_run(tmp_path, "multi30k_mt.sh", env)
    assert done.returncode == 0, done.stderr
    tunes = [c for c in calls if c.startswith("trime-tune-mt") and "trime_ext" in c]
    assert len(tunes) == 1 and "--temperatures 1,10 " in tunes[0], tunes


LONG_STUBS = {  # scripts/wikitext2_long.sh's tuner and sweep: a best line; a sweep.csv with one row per size and model
    "trime-tune": 'case "$*" in *"--eval-memory cache"*) f="--eval-memory cache --cache-lambda 0.2 --cache-theta 0.05";; '
                  '*) f="--eval-memory trime --memory-temperature 1";; esac\n'
                  'echo "best: $f  (valid perplexity 300.00; without memory 500.00)"',
    "trime-sweep-memory": 'base=""; label=TRIMELM_long\n'
                          'while [ $# -gt 0 ]; do case $1 in --out-dir) d=$2;; --sizes) sizes=$2;; --label) label=$2;; '
                          '--baseline-path) base=1;; esac; shift; done\n'
                          'mkdir -p "$d"; echo "model,long_memory_size,perplexity,loss_base2,tokens,tokens_per_second" '
                          '> "$d/sweep.csv"\n'
                          'for n in ${sizes//,/ }; do echo "$label,$n,$((400 - n / 100)).5000,8.6,10,1.0" >> "$d/sweep.csv"; '
                          '[ -z "$base" ] || echo "Transformer + cache,$n,$((450 - n / 200)).2500,8.8,10,1.0" >> "$d/sweep.csv"; '
                          'done\nprintf "x\\n\\n| N | %s |\\n" "$label" > "$d/sweep.md"',
}


def test_long_pipeline_runs_another_seed_and_keeps_one_file_per_sweep_row(tmp_path):
    """SEED trains the three models with that seed in their own folder; each sweep row (model, reset, N, split) and
    each plain perplexity lands in a file of its own, which scripts/seed_table.py reads back across seeds."""
    outs, seen = {}, 0
    for seed in ("1", "2"):
        outs[seed] = tmp_path / f"long_seed{seed}"
        done, calls = stubbed_run(tmp_path, "wikitext2_long.sh", {
            "UPDATES": "20", "SEED": seed, "OUT": str(outs[seed]), "RESETS": "document", "SIZES": "0,16384"},
            LONG_STUBS)
        assert done.returncode == 0, done.stderr
        calls, seen = calls[seen:], len(calls)  # the log accumulates over runs: this seed's calls only
    trainings = [c for c in calls if c.startswith("fairseq-hydra-train")]
    assert len(trainings) == 3 and all("common.seed=2" in c for c in trainings)
    sweeps = [c for c in calls if c.startswith("trime-sweep-memory")]
    assert len(sweeps) == 4 and all("--memory-reset document" in c and "--sizes 0,16384" in c for c in sweeps)
    out = outs["2"]
    assert (out / "ppl_trime_long_reset_N16384_test").read_text() == "237.5000\n"
    assert (out / "ppl_cache_reset_N16384_valid").read_text() == "369.2500\n"
    assert (out / "ppl_trime_reset_N0_valid").read_text() == "400.5000\n"
    assert (out / "ppl_vanilla_none_test").read_text() == "256.00\n"
    table = subprocess.run(
        [sys.executable, "scripts/seed_table.py", "--ppl", "{dir}/ppl_{row}_{split}", "--seeds", "1", "2",
         "--dir", f"1={outs['1']}", "--dir", f"2={outs['2']}", "--row", "trime_long_reset_N16384=TRIMELM_long",
         "--row", "cache_reset_N16384=cache", "--paired", "trime_long_reset_N16384-cache_reset_N16384"],
        cwd=ROOT, capture_output=True, text=True)
    assert table.returncode == 0, table.stderr
    assert "237.50 ± 0.00" in table.stdout


def test_long_pipeline_sweeps_other_sizes_into_suffixed_folders(tmp_path):
    """SWEEP_SUFFIX sweeps the finished models again with other SIZES into folders of their own (the finished sweep
    folders are never rerun, and asking one for a size it lacks is an error, not a skip), one file per new row, and
    its table in results_SUFFIX.md, leaving the first sweep's results.md as it was."""
    out = tmp_path / "long"
    env = {"UPDATES": "20", "OUT": str(out), "RESETS": "document", "SIZES": "0,16384"}
    done, calls = stubbed_run(tmp_path, "wikitext2_long.sh", env, LONG_STUBS)
    assert done.returncode == 0, done.stderr
    first_table = (out / "results.md").read_text()
    refused, calls = stubbed_run(tmp_path, "wikitext2_long.sh", {**env, "SIZES": "0,1024"}, LONG_STUBS)
    assert refused.returncode != 0 and "holds no N = 1024 of SIZES=0,1024" in refused.stderr  # not a silent skip
    assert (out / "results.md").read_text() == first_table
    seen = len(calls)
    done, calls = stubbed_run(tmp_path, "wikitext2_long.sh", {**env, "SIZES": "1024,4096", "SWEEP_SUFFIX": "_mid"},
                              LONG_STUBS)
    assert done.returncode == 0, done.stderr
    calls = calls[seen:]
    assert not [c for c in calls if c.startswith(("fairseq-hydra-train", "trime-tune "))]  # same models, same tuning
    sweeps = [c for c in calls if c.startswith("trime-sweep-memory")]
    assert len(sweeps) == 4 and all("--sizes 1024,4096" in c and "_mid" in c for c in sweeps)
    assert (out / "ppl_trime_long_reset_N1024_valid").read_text() == "390.5000\n"
    assert (out / "ppl_cache_reset_N4096_test").read_text() == "430.2500\n"
    assert (out / "ppl_trime_reset_N16384_test").exists()  # the first sweep's rows stay
    assert (out / "results.md").read_text() == first_table
    assert "valid, long-term memory sweep, memory reset at article ends" in (out / "results_mid.md").read_text()


def test_ext_ablations_train_the_consecutive_variant_with_trimelm_longs_batching(tmp_path):
    """RUNS=consecutive trains TRIMELM_ext's config on runs of 4 consecutive segments (TRIME Table 6's middle row),
    scores it beside the reference like every variant, and names it in the table; an unknown variant stops."""
    ext = tmp_path / "ext"
    (ext / "trime_ext").mkdir(parents=True)
    (ext / "bm25-256.order").write_text("0\n")
    (ext / "trime_ext" / "checkpoint_last.pt").write_text("")
    out = tmp_path / "ablations"
    env = {"UPDATES": "20", "OUT": str(out), "EXT_OUT": str(ext), "RUNS": "consecutive", "CONTROL": "", "WIDEN": "0"}
    done, calls = stubbed_run(tmp_path, "wikitext2_ext_ablations.sh", env, {"trime-tune": LONG_STUBS["trime-tune"]})
    assert done.returncode == 0, done.stderr
    trainings = [c for c in calls if c.startswith("fairseq-hydra-train")]
    assert len(trainings) == 1 and "--config-dir configs/trime_ext" in trainings[0]
    assert "task.batching=consecutive +task.consecutive_segments=4 task.bm25_order=null" in trainings[0]
    assert f"checkpoint.save_dir={out}/consecutive" in trainings[0]
    tunes = [c for c in calls if c.startswith("trime-tune ")]
    assert sum(f"{out}/consecutive/checkpoint_last.pt" in c for c in tunes) == 3  # local, + external, + long
    assert "| consecutive segments (m = 4), p = 0.9 | 256.00 |" in (out / "results.md").read_text()
    # CONTROL= (empty) runs no control (it ran the default "shuffled ref" control on a model never trained)
    assert not [c for c in tunes if "--eval-memory cache" in c] and "Control" not in (out / "results.md").read_text()
    done, _ = stubbed_run(tmp_path, "wikitext2_ext_ablations.sh", {**env, "RUNS": "sequential"})
    assert done.returncode != 0 and "unknown variant sequential" in done.stderr


def test_recall_benchmark_trains_every_model_with_the_model_seed(tmp_path):
    """MODEL_SEED seeds every training (common.seed; SEED seeds only the corpus), the report names it; without it the
    trainings keep the configs' seed 1. A dry run of the vanilla system: corpus and binarisation present, CLIs stubbed."""
    log = tmp_path / "calls.log"
    python = ('case "$1 $2" in\n'
              f'  "-m trime_fairseq.cli.build_datastore") {STUBS["trime-build-datastore"]};;\n'
              f'  "-m trime_fairseq.cli.recall") echo "recall $*" >> "{log}"; while [ $# -gt 0 ]; do '
              '[ "$1" = --output ] && echo {} > "$2"; shift; done;;\n'
              '  *) exec "$REAL_PYTHON" "$@";;\n'
              'esac')
    for seed in ("2", None):
        out = tmp_path / f"recall-{seed}"
        (out / "raw").mkdir(parents=True)
        (out / "raw" / "recall.json").write_text("{}")
        (out / "data-bin").mkdir()
        (out / "data-bin" / "test_memory.idx").write_text("")
        (out / "data-bin" / "recall.json").write_text(json.dumps(
            {"settings": {"span_length": 30, "key_length": 8, "gaps": [0, 8], "episodes": 8}}))
        env = {"UPDATES": "3", "OUT": str(out), "SYSTEMS": "vanilla", **({"MODEL_SEED": seed} if seed else {})}
        log.unlink(missing_ok=True)
        done, calls = stubbed_run(tmp_path, "recall_benchmark.sh", env, {"python": python})
        assert done.returncode == 0, done.stderr[-3000:]
        trainings = [c for c in calls if c.startswith("fairseq-hydra-train")]
        assert len(trainings) == 1 and f"checkpoint.save_dir={out}/vanilla" in trainings[0]
        assert f"common.seed={seed or 1}" in trainings[0].split()
        assert sum(c.startswith("recall -m trime_fairseq.cli.recall score") for c in calls) == 5  # 1 + cache + 2 long + kNN
        assert f"models trained 3 updates (model seed {seed or 1})" in (out / "results.md").read_text()
