#!/usr/bin/env bash
# Train a vanilla LM and TRIMELM on WikiText-2 with the same budget (CPU), tune the
# evaluation memory on valid with trime-tune, and print valid/test perplexities of
#   vanilla | vanilla + continuous cache | TRIMELM without memory | TRIMELM (local memory, Eq. 6)
#
#   scripts/wikitext2_compare.sh        # README quickstart and docs/results.md (UPDATES=200)
#   UPDATES=2000 scripts/wikitext2_compare.sh
#   UPDATES=2000 SEED=2 FLAGS_FROM=runs/wikitext2-2000 scripts/wikitext2_compare.sh   # another seed, seed 1's flags
#
# Environment: UPDATES (default 200), SEED (1: both models' common.seed), OUT (runs/wikitext2-$UPDATES, with
# -seed$SEED for SEED != 1), FLAGS_FROM (a finished run's folder: its best_cache.flags and best_trime.flags are used
# instead of tuning here, so that the seeds of a row share one setting chosen on seed 1's valid), DATA (data-bin/wikitext-2),
# RAW (folder with wiki.*.tokens; default $TRIME_DATA/wikitext-2 or ../shared/data/wikitext-2;
# downloaded when absent), EVAL_ARGS (extra fairseq-eval-lm options, default: 256-token blocks
# scored with 128 tokens of context).
set -euo pipefail
cd "$(dirname "$0")/.."
UPDATES=${UPDATES:-200}
SEED=${SEED:-1}
OUT=${OUT:-runs/wikitext2-$UPDATES$([ "$SEED" = 1 ] || echo "-seed$SEED")}
FLAGS_FROM=${FLAGS_FROM:-}
DATA=${DATA:-data-bin/wikitext-2}
RAW=${RAW:-${TRIME_DATA:-../shared/data}/wikitext-2}
EVAL_ARGS=${EVAL_ARGS:---tokens-per-sample 256 --context-window 128 --batch-size 8}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
mkdir -p "$OUT"
source scripts/lib.sh

scripts/ensure_wikitext2.sh "$DATA" "$RAW"

overrides() {  # run name -> its hydra overrides (train_runs of scripts/lib.sh)
  case $1 in
    vanilla) echo "criterion._name=adaptive_loss common.seed=$SEED" ;;
    trime) echo "criterion._name=trime_loss common.seed=$SEED" ;;
    *) echo "unknown run $1" >&2; return 1 ;;
  esac
}

eval_ppl() {  # checkpoint split extra-args... -> perplexity
  fairseq-eval-lm "$DATA" --user-dir trime_fairseq --task trime_lm --path "$1" --gen-subset "$2" \
    --cpu $EVAL_ARGS "${@:3}" 2>&1 | perplexity
}

best_flags() {  # checkpoint mode grid-args... -> best eval-memory flags on valid (grids widened off their edges)
  local name="$OUT/tune_$(basename "$(dirname "$1")")_$2"
  trime-tune "$DATA" --user-dir trime_fairseq --task trime_lm --path "$1" --gen-subset valid \
    --cpu --no-progress-bar $EVAL_ARGS --eval-memory "$2" --widen-edges 3 --results-json "$name.json" "${@:3}" \
    2> >(tune_progress "$name") | tee "$name.txt" | best_flags_of
}

watch_training "$UPDATES" "$OUT/train_vanilla.log" "$OUT/train_trime.log" & watch_pid=$!
train_runs configs/trime wikitext2_small 2 vanilla trime  # the two runs in parallel, one core each
kill $watch_pid 2>/dev/null || true
vanilla="$OUT/vanilla/checkpoint_last.pt"
trime="$OUT/trime/checkpoint_last.pt"

[ -z "$FLAGS_FROM" ] || flags_from "$FLAGS_FROM" best_cache.flags best_trime.flags  # seed 1's settings instead of tuning
say "tuning on valid: the continuous cache of the vanilla LM (λ x θ) and TRIMELM's τ, one pass per grid round"
[ -s "$OUT/best_cache.flags" ] || best_flags "$vanilla" cache > "$OUT/best_cache.flags" & cache_pid=$!
[ -s "$OUT/best_trime.flags" ] || best_flags "$trime" trime > "$OUT/best_trime.flags" & trime_pid=$!
wait $cache_pid
wait $trime_pid
cache_flags=$(cat "$OUT/best_cache.flags")
trime_flags=$(cat "$OUT/best_trime.flags")
[ -n "$cache_flags" ] && [ -n "$trime_flags" ] || { echo "tuning failed: see $OUT/tune_*.err" >&2; exit 1; }

say "tuned: $cache_flags (vanilla); $trime_flags (TRIMELM)"
evaluate() {  # name checkpoint split args... : fairseq-eval-lm -> $OUT/ppl_NAME_SPLIT, reported when done
  [ -s "$OUT/ppl_$1_$3" ] || eval_ppl "$2" "$3" "${@:4}" > "$OUT/ppl_$1_$3" || true
  [ -s "$OUT/ppl_$1_$3" ] || { say "  $1 $3: fairseq-eval-lm failed (rerun: $2 $3 ${*:4})"; return 1; }
  say "  $1 $3: perplexity $(cat "$OUT/ppl_$1_$3")"
}
# the eight evaluations, two at a time (one core each)
say "evaluating 4 models x {valid, test} with fairseq-eval-lm"
for split in valid test; do
  evaluate vanilla "$vanilla" $split & p1=$!
  evaluate cache "$vanilla" $split $cache_flags & p2=$!
  wait $p1; wait $p2
  evaluate trime_none "$trime" $split & p1=$!
  evaluate trime "$trime" $split $trime_flags & p2=$!
  wait $p1; wait $p2
done
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
