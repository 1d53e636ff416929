#!/usr/bin/env bash
# External memory on WikiText-2 (docs/results.md): the TRIMELM_ext / kNN-LM pipeline on CPU.
#   1. BM25 order of the 256-token training segments                  (trime-bm25-batches)
#   2. train TRIMELM_ext: trime_ext_loss on the BM25 chain              (fairseq-hydra-train, configs/trime_ext)
#      and the vanilla LM (the one of scripts/wikitext2_compare.sh, trained here if missing)
#   3. a datastore of the training split for each model                 (trime-build-datastore)
#      vanilla: g keys, L2 (kNN-LM); TRIMELM_ext: g keys, inner product (TRIME's sim)
#   4. tune on valid                                                     (trime-tune, grids widened off their edges)
#      kNN-LM: T x λ; kNN-LM + cache: T x λ with the vanilla LM's tuned cache (scripts/wikitext2_compare.sh's,
#      tuned here when absent); TRIMELM_ext: τ x τ' x λ, without and with the long-term memory;
#      kNN-LM + cache with the same long-term memory as TRIMELM_ext (the cache also over the LONG stream tokens
#      before each row, its λ_c x θ tuned with them, then T x λ): the matched comparison of TRIME's Table 2
#   3b. top-K retrieval accuracy of each datastore on valid (TRIME's Table 9)  (trime-retrieval-accuracy)
#   5. fairseq-eval-lm on valid and test with the best options; table in $OUT/results.md
#
#   scripts/wikitext2_external.sh                 # UPDATES=200, as scripts/wikitext2_compare.sh
#   UPDATES=2000 SEED=2 FLAGS_FROM=runs/wikitext2-ext-2000 scripts/wikitext2_external.sh   # another seed, seed 1's flags
#
# Environment: UPDATES (200), SEED (1: both models' common.seed), OUT (runs/wikitext2-ext-$UPDATES, with -seed$SEED
# for SEED != 1), DATA (data-bin/wikitext-2), RAW (as in wikitext2_compare.sh), VANILLA (checkpoint of the vanilla LM;
# default: scripts/wikitext2_compare.sh's of the same UPDATES and SEED, runs/wikitext2-$UPDATES[-seed$SEED]/vanilla/
# checkpoint_last.pt; trained into $OUT/vanilla when absent), FLAGS_FROM (a finished run's folder: its tuned
# best_*.flags are used instead of tuning here, so that the seeds of a row share one setting chosen on seed 1's valid),
# K (neighbours, 1024), INDEX (FAISS factory, IVF1024,PQ32),
# NPROBE (16), NTRAIN (keys to train the index, 200000), LONG (long-term memory of TRIMELM_ext, 1024),
# EVAL_ARGS (256-token rows scored with 128 tokens of context, batch 8).
set -euo pipefail
cd "$(dirname "$0")/.."
UPDATES=${UPDATES:-200}
SEED=${SEED:-1}
suffix=$([ "$SEED" = 1 ] || echo "-seed$SEED")
OUT=${OUT:-runs/wikitext2-ext-$UPDATES$suffix}
VANILLA=${VANILLA:-runs/wikitext2-$UPDATES$suffix/vanilla/checkpoint_last.pt}
DATA=${DATA:-data-bin/wikitext-2}
RAW=${RAW:-${TRIME_DATA:-../shared/data}/wikitext-2}
FLAGS_FROM=${FLAGS_FROM:-}
K=${K:-1024}
INDEX=${INDEX:-IVF1024,PQ32}
NPROBE=${NPROBE:-16}
NTRAIN=${NTRAIN:-200000}
LONG=${LONG:-1024}
EVAL_ARGS=${EVAL_ARGS:---tokens-per-sample 256 --context-window 128 --batch-size 8}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
mkdir -p "$OUT"
source scripts/lib.sh

scripts/ensure_wikitext2.sh "$DATA" "$RAW"

# 1. BM25 chain of the training segments (L = 256, the config's tokens_per_sample)
order="$OUT/bm25-256.order"
[ -f "$order" ] || say "BM25 order of the training segments -> $order"
[ -f "$order" ] || trime-bm25-batches --data "$DATA" --tokens-per-sample 256 --output "$order" \
  --workers 2 --no-progress-bar > "$OUT/bm25.log" 2>&1

# 2. training (train_runs of scripts/lib.sh: skipped when done, resumed when interrupted)
overrides() {  # run name -> its hydra overrides
  case $1 in
    vanilla) echo "criterion._name=adaptive_loss common.seed=$SEED" ;;
    trime_ext) echo "task.bm25_order=$order common.seed=$SEED" ;;
    *) echo "unknown run $1" >&2; return 1 ;;
  esac
}
vanilla_log="$(dirname "$(dirname "$VANILLA")")/train_vanilla.log"  # a pipeline's training log, when it has one
if [ -f "$VANILLA" ] && [ "$VANILLA" != "$OUT/vanilla/checkpoint_last.pt" ] && [ -f "$vanilla_log" ] \
    && ! grep -q "done training" "$vanilla_log"; then
  echo "$VANILLA is still training (no 'done training' in $vanilla_log): finish it first" >&2; exit 1
fi
if [ ! -f "$VANILLA" ] || [ "$VANILLA" = "$OUT/vanilla/checkpoint_last.pt" ]; then  # this run's own: train / resume
  VANILLA="$OUT/vanilla/checkpoint_last.pt"
  train_runs configs/trime wikitext2_small 1 vanilla & vanilla_pid=$!
fi
watch_training "$UPDATES" "$OUT/train_trime_ext.log" & watch_pid=$!
train_runs configs/trime_ext wikitext2_small 1 trime_ext
[ -z "${vanilla_pid:-}" ] || wait "$vanilla_pid"  # (a bare wait would also wait for the watcher)
kill $watch_pid 2>/dev/null || true
ext="$OUT/trime_ext/checkpoint_last.pt"

# 3. datastores over the training split (the evaluation's rows: 256 tokens, 128 of context)
datastore() {  # checkpoint output metric
  build_datastore "$1" "$DATA" train "$2" "$3" "$INDEX" "$NPROBE" --ntrain "$NTRAIN" $WT2_DSTORE_ROWS
}
datastore "$VANILLA" "$OUT/dstore_vanilla" l2 & pids=($!)
datastore "$ext" "$OUT/dstore_trime_ext" ip & pids+=($!)
for pid in "${pids[@]}"; do wait "$pid"; done

# 3b. top-K retrieval accuracy of each datastore on valid (TRIME's Table 9)
retrieval() {  # datastore name
  [ -s "$OUT/retrieval_$2.json" ] || say "top-K retrieval accuracy of $1 on valid -> $OUT/retrieval_$2.json"
  [ -s "$OUT/retrieval_$2.json" ] || trime-retrieval-accuracy --datastore "$1" --gen-subset valid \
    --ks 1,8,64,1024 --nprobe "$NPROBE" --cpu --no-progress-bar --output-json "$OUT/retrieval_$2.json" \
    > "$OUT/retrieval_$2.log" 2>&1
}
retrieval "$OUT/dstore_vanilla" vanilla & pids=($!)
retrieval "$OUT/dstore_trime_ext" trime_ext & pids+=($!)
for pid in "${pids[@]}"; do wait "$pid"; done

# 4. tuning on valid (one forward pass and one search per batch for the whole grid), or FLAGS_FROM's settings
[ -z "$FLAGS_FROM" ] || flags_from "$FLAGS_FROM" best_{cache,cache_long,knn,knn_cache,knn_cache_long,trime_ext,trime_ext_long}.flags
best_flags() {  # name checkpoint args... -> best flags (grids widened until no best value is on an edge)
  say "tuning $1 on valid"
  trime-tune "$DATA" --user-dir trime_fairseq --task trime_lm --path "$2" --gen-subset valid --cpu \
    --no-progress-bar $EVAL_ARGS --widen-edges 3 --results-json "$OUT/tune_$1.json" "${@:3}" \
    2> >(tune_progress "$OUT/tune_$1") | tee "$OUT/tune_$1.txt" | best_flags_of
}
knn="--datastore $OUT/dstore_vanilla --knn-k $K"
trime_ext="--datastore $OUT/dstore_trime_ext --knn-k $K"
# the vanilla LM's continuous cache, tuned on valid (scripts/wikitext2_compare.sh's when it ran, else here)
cache_flags=${CACHE_FLAGS:-$(cat "$OUT/best_cache.flags" 2>/dev/null || \
  cat "runs/wikitext2-$UPDATES/best_cache.flags" 2>/dev/null || true)}
if [ -z "$cache_flags" ]; then
  [ -s "$OUT/best_cache.flags" ] || best_flags cache "$VANILLA" --eval-memory cache > "$OUT/best_cache.flags"
  cache_flags=$(cat "$OUT/best_cache.flags")
fi
cache_only=${cache_flags#--eval-memory cache }
knn_grid="--knn-temperatures 1,2,5,10,20,50 --knn-lambdas 0.05,0.1,0.25,0.4,0.6"
ext_grid="--temperatures 0.5,1,2 --interpolation-temperatures 1,2,5,10 --interpolation-lambdas 0.1,0.25,0.4"
[ -s "$OUT/best_knn.flags" ] || best_flags knn "$VANILLA" --eval-memory knn $knn $knn_grid > "$OUT/best_knn.flags"
[ -s "$OUT/best_knn_cache.flags" ] || best_flags knn_cache "$VANILLA" --eval-memory knn $knn $cache_only \
  $knn_grid > "$OUT/best_knn_cache.flags"
# the cache over the same memory as TRIMELM_ext's long-term memory: the row plus the LONG stream tokens before it
[ -s "$OUT/best_cache_long.flags" ] || best_flags cache_long "$VANILLA" --eval-memory cache \
  --long-memory-size "$LONG" > "$OUT/best_cache_long.flags"
cache_long_only=$(sed 's/^--eval-memory cache //' "$OUT/best_cache_long.flags")
[ -s "$OUT/best_knn_cache_long.flags" ] || best_flags knn_cache_long "$VANILLA" --eval-memory knn $knn \
  $cache_long_only --long-memory-size "$LONG" $knn_grid > "$OUT/best_knn_cache_long.flags"
[ -s "$OUT/best_trime_ext.flags" ] || best_flags trime_ext "$ext" --eval-memory trime_ext $trime_ext \
  $ext_grid > "$OUT/best_trime_ext.flags"
[ -s "$OUT/best_trime_ext_long.flags" ] || best_flags trime_ext_long "$ext" --eval-memory trime_ext $trime_ext \
  --long-memory-size "$LONG" $ext_grid > "$OUT/best_trime_ext_long.flags"
for f in cache_long knn knn_cache knn_cache_long trime_ext trime_ext_long; do
  [ -s "$OUT/best_$f.flags" ] || { echo "tuning $f failed: see $OUT/tune_$f.err" >&2; exit 1; }
done

# 5. evaluation with the best options
eval_ppl() {  # name checkpoint split args...
  [ -s "$OUT/ppl_$1_$3" ] || say "  evaluating $1 on $3"
  [ -s "$OUT/ppl_$1_$3" ] || fairseq-eval-lm "$DATA" --user-dir trime_fairseq --task trime_lm --path "$2" \
    --gen-subset "$3" --cpu $EVAL_ARGS "${@:4}" 2>&1 | tee "$OUT/eval_$1_$3.log" \
    | perplexity > "$OUT/ppl_$1_$3"
}
# the matched pair first (kNN-LM + cache and TRIMELM_ext, both with the LONG-token long-term memory), then the rest
for split in valid test; do
  eval_ppl knn_cache_long "$VANILLA" $split $(cat "$OUT/best_knn_cache_long.flags") $knn \
    --long-memory-size "$LONG" & p1=$!
  eval_ppl trime_ext_long "$ext" $split $(cat "$OUT/best_trime_ext_long.flags") $trime_ext \
    --long-memory-size "$LONG" & p2=$!
  wait $p1 $p2
done
for split in valid test; do
  eval_ppl vanilla "$VANILLA" $split & p1=$!
  eval_ppl knn "$VANILLA" $split $(cat "$OUT/best_knn.flags") $knn & p2=$!
  wait $p1 $p2
  eval_ppl knn_cache "$VANILLA" $split $(cat "$OUT/best_knn_cache.flags") $knn & p1=$!
  eval_ppl trime_ext_none "$ext" $split & p2=$!
  wait $p1 $p2
  eval_ppl trime_ext "$ext" $split $(cat "$OUT/best_trime_ext.flags") $trime_ext
done
ppl() { cat "$OUT/ppl_$1_$2"; }
row() { echo "| $1 | \`$2\` | $(ppl "$3" valid) | $(ppl "$3" test) |"; }
{
  echo "WikiText-2, $UPDATES updates x 2048 tokens, architecture trime_lm_wikitext2_small; eval: $EVAL_ARGS;"
  echo "datastore: the training split (index $INDEX, nprobe $NPROBE, K = $K)"
  echo
  echo "| model | evaluation memory | valid ppl | test ppl |"
  echo "|---|---|---|---|"
  row "vanilla" "--eval-memory none" vanilla
  row "vanilla: kNN-LM" "$(cat "$OUT/best_knn.flags")" knn
  row "vanilla: kNN-LM + cache" "$(cat "$OUT/best_knn_cache.flags")" knn_cache
  row "vanilla: kNN-LM + cache (long memory $LONG)" \
    "$(cat "$OUT/best_knn_cache_long.flags") --long-memory-size $LONG" knn_cache_long
  row "TRIMELM_ext" "--eval-memory none" trime_ext_none
  row "TRIMELM_ext w/o long memory" "$(cat "$OUT/best_trime_ext.flags")" trime_ext
  row "TRIMELM_ext (long memory $LONG)" "$(cat "$OUT/best_trime_ext_long.flags") --long-memory-size $LONG" \
    trime_ext_long
  echo
  echo "Top-K retrieval accuracy on valid (% of positions whose target is among the first K entries' tokens)"
  echo
  echo "| datastore | K = 1 | K = 8 | K = 64 | K = 1024 |"
  echo "|---|---|---|---|---|"
  for d in vanilla trime_ext; do
    python -c 'import json, sys; r = json.load(open(sys.argv[1])); a, m, n = r["accuracy"], r["metric"], r["positions"]
print(f"| {sys.argv[2]} ({m}, {n} positions) | "
      + " | ".join(f"{100 * a[k]:.2f}" for k in ("1", "8", "64", "1024")) + " |")' "$OUT/retrieval_$d.json" "$d"
  done
} | tee "$OUT/results.md"
