#!/usr/bin/env bash
# Train a vanilla LM and TRIMELM on WikiText-2 with the same budget (CPU), tune the
# evaluation memory on valid with trime-tune, and print valid/test perplexities of
#   vanilla | vanilla + continuous cache | TRIMELM without memory | TRIMELM (local memory, Eq. 6)
#
#   scripts/wikitext2_compare.sh        # README quickstart and docs/results.md (UPDATES=200)
#   UPDATES=2000 scripts/wikitext2_compare.sh
#
# Environment: UPDATES (default 200), OUT (runs/wikitext2-$UPDATES), DATA (data-bin/wikitext-2),
# RAW (folder with wiki.*.tokens; default $TRIME_DATA/wikitext-2 or ../shared/data/wikitext-2;
# downloaded when absent), EVAL_ARGS (extra fairseq-eval-lm options, default: 256-token blocks
# scored with 128 tokens of context).
set -euo pipefail
cd "$(dirname "$0")/.."
UPDATES=${UPDATES:-200}
OUT=${OUT:-runs/wikitext2-$UPDATES}
DATA=${DATA:-data-bin/wikitext-2}
RAW=${RAW:-${TRIME_DATA:-../shared/data}/wikitext-2}
EVAL_ARGS=${EVAL_ARGS:---tokens-per-sample 256 --context-window 128 --batch-size 8}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
mkdir -p "$OUT"

scripts/ensure_wikitext2.sh "$DATA" "$RAW"

train() {  # name criterion
  local log="$OUT/train_$1.log"
  if [ ! -f "$OUT/$1/checkpoint_last.pt" ] || ! grep -q "done training" "$log" 2>/dev/null; then
    echo "training $1 ($2, $UPDATES updates) -> $log" >&2
    fairseq-hydra-train --config-dir configs/trime --config-name wikitext2_small \
      task.data="$DATA" criterion._name="$2" optimization.max_update="$UPDATES" \
      checkpoint.save_dir="$OUT/$1" hydra.run.dir="$OUT/hydra_$1" > "$log" 2>&1
  fi
}

eval_ppl() {  # checkpoint split extra-args... -> perplexity
  fairseq-eval-lm "$DATA" --user-dir trime_fairseq --task trime_lm --path "$1" --gen-subset "$2" \
    --cpu $EVAL_ARGS "${@:3}" 2>&1 | grep -o "Perplexity: [0-9.]*" | cut -d' ' -f2
}

best_flags() {  # checkpoint mode grid-args... -> best eval-memory flags on valid
  trime-tune "$DATA" --user-dir trime_fairseq --task trime_lm --path "$1" --gen-subset valid \
    --cpu --no-progress-bar $EVAL_ARGS --eval-memory "$2" "${@:3}" 2>"$OUT/tune_$2.err" \
    | tee "$OUT/tune_$(basename "$(dirname "$1")")_$2.txt" | sed -n 's/^best: \(.*\)  (.*/\1/p'
}

train vanilla adaptive_loss & vanilla_pid=$!  # the two runs in parallel, one core each
train trime trime_loss & trime_pid=$!
wait $vanilla_pid
wait $trime_pid
vanilla="$OUT/vanilla/checkpoint_last.pt"
trime="$OUT/trime/checkpoint_last.pt"

best_flags "$vanilla" cache > "$OUT/best_cache.flags" & cache_pid=$!
best_flags "$trime" trime > "$OUT/best_trime.flags" & trime_pid=$!
wait $cache_pid
wait $trime_pid
cache_flags=$(cat "$OUT/best_cache.flags")
trime_flags=$(cat "$OUT/best_trime.flags")
[ -n "$cache_flags" ] && [ -n "$trime_flags" ] || { echo "tuning failed: see $OUT/tune_*.err" >&2; exit 1; }

# the eight evaluations run in parallel; each writes its perplexity to a file
pids=()
for split in valid test; do
  eval_ppl "$vanilla" $split > "$OUT/ppl_vanilla_$split" & pids+=($!)
  eval_ppl "$vanilla" $split $cache_flags > "$OUT/ppl_cache_$split" & pids+=($!)
  eval_ppl "$trime" $split > "$OUT/ppl_trime_none_$split" & pids+=($!)
  eval_ppl "$trime" $split $trime_flags > "$OUT/ppl_trime_$split" & pids+=($!)
done
for pid in "${pids[@]}"; do wait "$pid"; done
ppl() { cat "$OUT/ppl_$1_$2"; }

{
  echo "WikiText-2, $UPDATES updates x 2048 tokens, architecture trime_lm_wikitext2_small; eval: $EVAL_ARGS"
  echo
  echo "| model | evaluation memory | valid ppl | test ppl |"
  echo "|---|---|---|---|"
  echo "| vanilla | none | $(ppl vanilla valid) | $(ppl vanilla test) |"
  echo "| vanilla + continuous cache | \`$cache_flags\` | $(ppl cache valid) | $(ppl cache test) |"
  echo "| TRIMELM | none | $(ppl trime_none valid) | $(ppl trime_none test) |"
  echo "| TRIMELM | \`$trime_flags\` | $(ppl trime valid) | $(ppl trime test) |"
} | tee "$OUT/results.md"
