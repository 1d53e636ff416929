#!/usr/bin/env bash
# TRIME §6 ablations of TRIMELM_ext on WikiText-2 (docs/results.md, "TRIME §6's ablations"): the batching (BM25 vs
# random vs consecutive, TRIME Table 6) and the local-memory drop p (Table 13), each variant trained with the budget and config of
# scripts/wikitext2_external.sh's TRIMELM_ext (configs/trime_ext/wikitext2_small.yaml, UPDATES updates) and scored
# on valid only (never on test: these are ablations, no row of them is reported on test).
# Every step is skipped when its output exists; an interrupted training resumes from its checkpoint_last.pt.
#   1. train the variants of RUNS, two at a time, one thread each                 (fairseq-hydra-train)
#   2. per variant (and the reference, REF: wikitext2_external.sh's TRIMELM_ext, BM25 batches, p = 0.9):
#      a datastore of the training split (g keys, inner product)                   (trime-build-datastore)
#      top-K retrieval accuracy of that datastore on valid (TRIME Table 9)         (trime-retrieval-accuracy)
#      valid ppl: the token distribution alone                                     (fairseq-eval-lm)
#                 the local memory (Eq. 6), τ tuned                                 (trime-tune --eval-memory trime)
#                 local + external memory, τ × τ' × λ tuned                        (trime-tune --eval-memory trime_ext)
#                 the same with LONG tokens of long-term memory                    (... --long-memory-size LONG)
#      every tune starts from one fixed grid and widens an axis whose best lies on its edge (WIDEN rounds)
#   2b. control (variants of CONTROL): the same model and memories combined as kNN-LM + cache instead of Eq. 6-8:
#      the continuous cache over the row + LONG tokens (λ_c × θ tuned), then kNN-LM's T × λ over the variant's
#      datastore with that cache                                                   (trime-tune --eval-memory cache / knn)
#   3. table -> $OUT/results.md
#
#   UPDATES=2000 scripts/wikitext2_ext_ablations.sh
#
# Variants: shuffled  random batches (task.batching=shuffled): the other 7 segments of a batch are unrelated text
#           consecutive  runs of 4 consecutive segments of one document, 2 runs per batch (TRIMELM_long's batching,
#                     Table 6's middle row; same objective: the other 7 segments are the memory)
#           p0        BM25 batches, the local memory never dropped (criterion.local_drop_prob=0)
#           p05       BM25 batches, p = 0.5
# Environment: UPDATES (2000), OUT (runs/wikitext2-ext-ablations-$UPDATES), EXT_OUT (runs/wikitext2-ext-$UPDATES:
# the BM25 order and the reference run), DATA (data-bin/wikitext-2), RUNS ("shuffled p0"), K (1024), INDEX
# (IVF1024,PQ32), NPROBE (16), NTRAIN (200000), LONG (1024), WIDEN (trime-tune's --widen-edges, 2), CONTROL
# ("shuffled ref"), EVAL_ARGS (as wikitext2_external.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
UPDATES=${UPDATES:-2000}
OUT=${OUT:-runs/wikitext2-ext-ablations-$UPDATES}
EXT_OUT=${EXT_OUT:-runs/wikitext2-ext-$UPDATES}
DATA=${DATA:-data-bin/wikitext-2}
RUNS=${RUNS:-shuffled p0}
K=${K:-1024}
INDEX=${INDEX:-IVF1024,PQ32}
NPROBE=${NPROBE:-16}
NTRAIN=${NTRAIN:-200000}
LONG=${LONG:-1024}
WIDEN=${WIDEN:-2}
CONTROL=${CONTROL-shuffled ref}  # set and empty: no control
EVAL_ARGS=${EVAL_ARGS:---tokens-per-sample 256 --context-window 128 --batch-size 8}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
mkdir -p "$OUT"
source scripts/lib.sh

order="$EXT_OUT/bm25-256.order"
ref="$EXT_OUT/trime_ext/checkpoint_last.pt"
for f in "$order" "$ref"; do
  [ -f "$f" ] || { echo "missing $f: run UPDATES=$UPDATES scripts/wikitext2_external.sh first" >&2; exit 1; }
done

overrides() {  # variant -> its hydra overrides
  case $1 in
    shuffled) echo "task.batching=shuffled task.bm25_order=null" ;;
    consecutive) echo "task.batching=consecutive +task.consecutive_segments=4 task.bm25_order=null" ;;
    p0) echo "task.bm25_order=$order criterion.local_drop_prob=0" ;;
    p05) echo "task.bm25_order=$order criterion.local_drop_prob=0.5" ;;
    *) echo "unknown variant $1" >&2; return 1 ;;
  esac
}

# 1. training, two at a time
# shellcheck disable=SC2086
train_runs configs/trime_ext wikitext2_small 2 $RUNS

tuned() { grep -q "^best: " "$1" 2>/dev/null; }  # a tune's output is complete (an interrupted one is redone)
ckpt() { if [ "$1" = ref ]; then echo "$ref"; else echo "$OUT/$1/checkpoint_last.pt"; fi; }
tune_on_valid() {  # variant args... : trime-tune over valid with the variant's checkpoint
  trime-tune "$DATA" --user-dir trime_fairseq --task trime_lm --path "$(ckpt "$1")" --gen-subset valid --cpu \
    --no-progress-bar $EVAL_ARGS --widen-edges "$WIDEN" "${@:2}"
}
dstore_of() { if [ "$1" = ref ]; then echo "$EXT_OUT/dstore_trime_ext"; else echo "$OUT/dstore_$1"; fi; }
# 2. per variant: datastore, retrieval accuracy, valid perplexities (two variants at a time)
score() {  # variant
  local c dstore
  c=$(ckpt "$1")
  dstore=$(dstore_of "$1")
  build_datastore "$c" "$DATA" train "$dstore" ip "$INDEX" "$NPROBE" --ntrain "$NTRAIN" $WT2_DSTORE_ROWS
  [ -s "$OUT/retrieval_$1.json" ] || trime-retrieval-accuracy --datastore "$dstore" --gen-subset valid \
    --ks 1,8,64,1024 --nprobe "$NPROBE" --cpu --no-progress-bar --output-json "$OUT/retrieval_$1.json" \
    > "$OUT/retrieval_$1.log" 2>&1
  [ -s "$OUT/ppl_none_$1" ] || fairseq-eval-lm "$DATA" --user-dir trime_fairseq --task trime_lm --path "$c" \
    --gen-subset valid --cpu $EVAL_ARGS 2>&1 | tee "$OUT/eval_none_$1.log" | perplexity > "$OUT/ppl_none_$1"
  tuned "$OUT/tune_local_$1.txt" || tune_on_valid "$1" --eval-memory trime --temperatures 0.5,1,2,4,8 \
    --results-json "$OUT/tune_local_$1.json" > "$OUT/tune_local_$1.txt" 2> "$OUT/tune_local_$1.err"
  local ext="--eval-memory trime_ext --datastore $dstore --knn-k $K --temperatures 2,4,8
    --interpolation-temperatures 0.125,0.25,0.5,1 --interpolation-lambdas 0.1,0.25,0.4"
  tuned "$OUT/tune_ext_$1.txt" || tune_on_valid "$1" $ext --results-json "$OUT/tune_ext_$1.json" > "$OUT/tune_ext_$1.txt" \
    2> "$OUT/tune_ext_$1.err"
  tuned "$OUT/tune_long_$1.txt" || tune_on_valid "$1" $ext --long-memory-size "$LONG" --results-json "$OUT/tune_long_$1.json" \
    > "$OUT/tune_long_$1.txt" 2> "$OUT/tune_long_$1.err"
  say "scored $1"
}
pids=()
for run in ref $RUNS; do
  score "$run" & pids+=($!)
  while [ "$(jobs -rp | wc -l)" -ge 2 ]; do sleep 10; done
done
for pid in "${pids[@]}"; do wait "$pid"; done

# 2b. the control: kNN-LM + cache's combination of the same memories
control() {  # variant
  local cache tune=(tune_on_valid "$1" --long-memory-size "$LONG")
  tuned "$OUT/tune_cache_long_$1.txt" || "${tune[@]}" --eval-memory cache --results-json "$OUT/tune_cache_long_$1.json" \
    > "$OUT/tune_cache_long_$1.txt" 2> "$OUT/tune_cache_long_$1.err"
  cache=$(best_flags_of "$OUT/tune_cache_long_$1.txt" | sed 's/^--eval-memory cache //')
  [ -n "$cache" ] || { echo "tuning the cache of $1 failed: see $OUT/tune_cache_long_$1.err" >&2; return 1; }
  tuned "$OUT/tune_knn_cache_long_$1.txt" || "${tune[@]}" --eval-memory knn --datastore "$(dstore_of "$1")" --knn-k "$K" \
    $cache --knn-temperatures 1,2,5,10,20,50 --knn-lambdas 0.05,0.1,0.25,0.4,0.6 \
    --results-json "$OUT/tune_knn_cache_long_$1.json" > "$OUT/tune_knn_cache_long_$1.txt" \
    2> "$OUT/tune_knn_cache_long_$1.err"
}
for run in $CONTROL; do control "$run"; done

# 3. table
best() {  # tune output -> "ppl (flags)" from trime-tune's last line "best: FLAGS  (valid perplexity X; ...)"
  sed -n 's/^best: --eval-memory [a-z_]* \(.*\)  (valid perplexity \([0-9.]*\);.*/\2 (`\1`)/p' "$1"
}
describe() {
  case $1 in
    ref) echo "BM25 batches, p = 0.9 (the reference: $ref)" ;;
    shuffled) echo "random batches, p = 0.9" ;;
    consecutive) echo "consecutive segments (m = 4), p = 0.9" ;;
    p0) echo "BM25 batches, p = 0" ;;
    p05) echo "BM25 batches, p = 0.5" ;;
  esac
}
{
  echo "TRIMELM_ext ablations, WikiText-2 valid, $UPDATES updates; eval: $EVAL_ARGS; datastore: the training split"
  echo "(index $INDEX, nprobe $NPROBE, K = $K); tuned on valid: τ of the local memory from {0.5, 1, 2, 4, 8};"
  echo "τ × τ' × λ of local + external memory from {2, 4, 8} × {0.125, 0.25, 0.5, 1} × {0.1, 0.25, 0.4};"
  echo "axes whose best lies on an edge widened ($WIDEN rounds)"
  echo
  echo "| training | token distribution | local memory | local + external memory |" \
    "local + long ($LONG) + external memory | retrieval top-1 / 8 / 64 / 1024 (%) |"
  echo "|---|---:|---:|---:|---:|---|"
  for run in ref $RUNS; do
    acc=$(python -c 'import json, sys; a = json.load(open(sys.argv[1]))["accuracy"]
print(" / ".join(f"{100 * a[k]:.2f}" for k in ("1", "8", "64", "1024")))' "$OUT/retrieval_$run.json")
    echo "| $(describe "$run") | $(cat "$OUT/ppl_none_$run") | $(best "$OUT/tune_local_$run.txt") |" \
      "$(best "$OUT/tune_ext_$run.txt") | $(best "$OUT/tune_long_$run.txt") | $acc |"
  done
  for run in $CONTROL; do
    echo
    echo "Control, $(describe "$run"): the same memories combined as kNN-LM + cache (cache over the row + $LONG" \
      "tokens): cache alone $(best "$OUT/tune_cache_long_$run.txt"), kNN-LM + cache" \
      "$(best "$OUT/tune_knn_cache_long_$run.txt")"
  done
} | tee "$OUT/results.md"
