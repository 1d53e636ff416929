#!/usr/bin/env bash
# TRIMELM_long on WikiText-2 (docs/results_long.md): train TRIMELM_long, TRIMELM and a vanilla LM with
# the same small architecture and budget, tune the memories on valid with trime-tune (local memory), and
# sweep the long-term memory size on valid and test with trime-sweep-memory (TRIMELM_long and the vanilla
# LM's continuous cache extended to the long-term memory; TRIMELM with a long memory for comparison).
#
#   scripts/wikitext2_long.sh                      # UPDATES=300, OUT=runs/trime_long_wt2
#   SEED=2 RESETS=document SIZES=0,16384 scripts/wikitext2_long.sh   # another seed (tuned on its own valid)
#
# Environment: UPDATES (300), SEED (1: the three models' common.seed), OUT (runs/trime_long_wt2, with -seed$SEED
# for SEED != 1), DATA (data-bin/wikitext-2; binarized when missing, as
# scripts/prepare_wikitext.sh wikitext-2 data-bin/wikitext-2 ../shared/data/wikitext-2), SIZES
# (0,1024,4096,16384), EVAL_ARGS (256-token rows, 128 scored with 128 tokens of context, batch 8), RESETS (the
# --memory-reset settings swept, "never document"; RESETS=document reruns only the reset-at-articles sweeps),
# SWEEP_SUFFIX (empty; e.g. _mid: a further sweep of the same models and tunings into sweep_[trime_][reset_]SPLIT_mid,
# its table in results_mid.md: a finished sweep folder is never rerun, and one that lacks a size of SIZES is an error).
set -euo pipefail
cd "$(dirname "$0")/.."
UPDATES=${UPDATES:-300}
SEED=${SEED:-1}
OUT=${OUT:-runs/trime_long_wt2$([ "$SEED" = 1 ] || echo "-seed$SEED")}
DATA=${DATA:-data-bin/wikitext-2}
SIZES=${SIZES:-0,1024,4096,16384}
SWEEP_SUFFIX=${SWEEP_SUFFIX:-}
RESETS=${RESETS:-never document}
EVAL_ARGS=${EVAL_ARGS:---tokens-per-sample 256 --context-window 128 --batch-size 8}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
mkdir -p "$OUT"
source scripts/lib.sh
scripts/ensure_wikitext2.sh "$DATA" "${RAW:-${TRIME_DATA:-../shared/data}/wikitext-2}"
CONFIG="--config-dir configs/trime_long --config-name wikitext2_small task.data=$DATA optimization.max_update=$UPDATES dataset.validate_interval_updates=0 common.seed=$SEED"
SHUFFLED="task.batching=shuffled task.consecutive_segments=1 ~criterion.memory_block_size"

train() {  # name hydra-overrides...
  local log="$OUT/train_$1.log"
  if [ ! -f "$OUT/$1/checkpoint_last.pt" ] || ! grep -q "done training" "$log" 2>/dev/null; then
    say "training $1 ($UPDATES updates) -> $log"
    fairseq-hydra-train $CONFIG checkpoint.save_dir="$OUT/$1" hydra.run.dir="$OUT/hydra_$1" "${@:2}" > "$log" 2>&1
  fi
}

train trime_long &  # configs/trime_long/wikitext2_small.yaml as it is
train trime $SHUFFLED criterion._name=trime_loss &
wait
train vanilla $SHUFFLED criterion._name=adaptive_loss '~criterion.ce_warmup_ratio' distributed_training.ddp_backend=legacy_ddp

tune() {  # name mode -> best eval-memory flags on valid (local memory)
  local out="$OUT/tune_$1.txt"
  [ -s "$out" ] || say "tuning $1 ($2) on valid"
  [ -s "$out" ] || trime-tune "$DATA" --user-dir trime_fairseq --task trime_lm \
    --path "$OUT/$1/checkpoint_last.pt" --gen-subset valid --cpu --no-progress-bar $EVAL_ARGS \
    --eval-memory "$2" --widen-edges 3 --results-json "$OUT/tune_$1.json" > "$out" 2> >(tune_progress "$OUT/tune_$1")
  best_flags_of "$out"
}

trime_long_flags=$(tune trime_long trime)
trime_flags=$(tune trime trime)
cache_flags=$(tune vanilla cache)
tau_long=$(echo "$trime_long_flags" | sed -n 's/.*--memory-temperature \([0-9.]*\).*/\1/p')
tau=$(echo "$trime_flags" | sed -n 's/.*--memory-temperature \([0-9.]*\).*/\1/p')
lam=$(echo "$cache_flags" | sed -n 's/.*--cache-lambda \([0-9.]*\).*/\1/p')
theta=$(echo "$cache_flags" | sed -n 's/.*--cache-theta \([0-9.]*\).*/\1/p')

sweep_dir() {  # [trime_][reset_]SPLIT -> the folder of that sweep
  echo "$OUT/sweep_$1$SWEEP_SUFFIX"
}

sweep() {  # split [trime_][reset_]SPLIT path tau [baseline args...]
  local dir missing
  dir=$(sweep_dir "$2")
  if [ -s "$dir/sweep.csv" ]; then  # finished: never rerun, but it must hold every size asked for
    missing=$(comm -23 <(tr , '\n' <<< "$SIZES" | sort -u) <(tail -n +2 "$dir/sweep.csv" | cut -d, -f2 | sort -u))
    [ -z "$missing" ] || { echo "$dir holds no N = $(echo $missing | tr ' ' ,) of SIZES=$SIZES:" \
      "sweep into other folders (SWEEP_SUFFIX) or remove it" >&2; return 1; }
    return 0
  fi
  say "long-memory sweep $(basename "$dir") (sizes $SIZES; log $dir.log)"
  trime-sweep-memory "$DATA" --user-dir trime_fairseq \
    --task trime_lm --path "$3" --eval-memory trime --memory-temperature "$4" --gen-subset "$1" --cpu \
    --no-progress-bar $EVAL_ARGS --sizes "$SIZES" --out-dir "$dir" "${@:5}" > "$dir.log" 2>&1
}

for split in valid test; do
  for reset in $RESETS; do  # memory across article ends or not (docs/results_long.md: both)
    tag=$([ $reset = never ] && echo "" || echo "reset_")
    sweep $split $tag$split "$OUT/trime_long/checkpoint_last.pt" "$tau_long" --memory-reset $reset \
      --baseline-path "$OUT/vanilla/checkpoint_last.pt" --baseline-lambda "$lam" --baseline-theta "$theta"
    sweep $split trime_$tag$split "$OUT/trime/checkpoint_last.pt" "$tau" --memory-reset $reset --label TRIMELM
  done
done

eval_ppl() {  # name split -> perplexity of $OUT/NAME without memory (fairseq-eval-lm), kept in $OUT/ppl_NAME_none_SPLIT
  local file="$OUT/ppl_$1_none_$2"
  [ -s "$file" ] || fairseq-eval-lm "$DATA" --user-dir trime_fairseq --task trime_lm --path "$OUT/$1/checkpoint_last.pt" \
    --gen-subset "$2" --cpu --no-progress-bar $EVAL_ARGS 2>&1 | perplexity > "$file"
  cat "$file"
}

sweep_ppl_files() {  # split tag : one file per sweep row, $OUT/ppl_{trime_long,cache,trime}_{TAG}N<size>_SPLIT, for
  # scripts/seed_table.py (e.g. ppl_trime_long_reset_N16384_test)
  local model size ppl rest
  for csv in "$(sweep_dir "$2$1")/sweep.csv" "$(sweep_dir "trime_$2$1")/sweep.csv"; do
    [ -s "$csv" ] || continue
    tail -n +2 "$csv" | while IFS=, read -r model size ppl rest; do
      case $model in
        TRIMELM_long) model=trime_long ;; TRIMELM) model=trime ;; "Transformer + cache") model=cache ;;
        *) echo "sweep_ppl_files: unknown model '$model' in $csv" >&2; return 1 ;;
      esac
      echo "$ppl" > "$OUT/ppl_${model}_$2N${size}_$1"
    done
  done
}

{
  echo "WikiText-2, $UPDATES updates x 8 segments of 256 tokens, architecture trime_lm_wikitext2_small; eval: $EVAL_ARGS"
  echo "tuned on valid (local memory): TRIMELM_long $trime_long_flags; TRIMELM $trime_flags; vanilla $cache_flags"
  echo
  echo "| model | evaluation memory | valid ppl | test ppl |"
  echo "|---|---|---|---|"
  echo "| vanilla | none | $(eval_ppl vanilla valid) | $(eval_ppl vanilla test) |"
  echo "| TRIMELM | none | $(eval_ppl trime valid) | $(eval_ppl trime test) |"
  echo "| TRIMELM_long | none | $(eval_ppl trime_long valid) | $(eval_ppl trime_long test) |"
  for split in valid test; do
    for tag in "" reset_; do
      [ -s "$(sweep_dir "$tag$split")/sweep.md" ] || continue  # a setting left out of RESETS
      sweep_ppl_files $split "$tag"
      echo
      echo "$split, long-term memory sweep$([ -n "$tag" ] && echo ", memory reset at article ends"):"
      tail -n +3 "$(sweep_dir "$tag$split")/sweep.md"
      echo  # a blank line: two markdown tables, not one
      tail -n +3 "$(sweep_dir "trime_$tag$split")/sweep.md"
    done
  done
} | tee "$OUT/results$SWEEP_SUFFIX.md"
