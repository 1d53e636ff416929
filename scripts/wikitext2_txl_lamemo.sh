#!/usr/bin/env bash
# LaMemo vs Transformer-XL on WikiText-2 with seeds (docs/results_models.md), resumable: a finished training or
# evaluation is skipped, so rerun to resume.
#   1. for every seed: Transformer-XL and LaMemo, the same size, data order and budget
#      (configs/transformer_xl, configs/lamemo: 4 layers, d 128, segment 64, memory 64, post-norm as the papers)
#   2. fairseq-eval-lm in stream order with the training memory (64), valid and test
#   3. $OUT/results.md: per-seed perplexities, mean ± sd, and the paired difference LaMemo − Transformer-XL
#
#   UPDATES=2000 SEEDS="1 2 3" scripts/wikitext2_txl_lamemo.sh
#
# Environment: UPDATES (2000), SEEDS ("1 2 3"), OUT (runs/wikitext2-txl-lamemo-$UPDATES), DATA (data-bin/wikitext-2),
# RAW (WikiText-2 folder, default $TRIME_DATA/wikitext-2 or ../shared/data/wikitext-2), JOBS (1: trainings at once).
set -euo pipefail
cd "$(dirname "$0")/.."
UPDATES=${UPDATES:-2000}
SEEDS=${SEEDS:-1 2 3}
OUT=${OUT:-runs/wikitext2-txl-lamemo-$UPDATES}
DATA=${DATA:-data-bin/wikitext-2}
RAW=${RAW:-${TRIME_DATA:-../shared/data}/wikitext-2}
JOBS=${JOBS:-1}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
source scripts/lib.sh
mkdir -p "$OUT"
scripts/ensure_wikitext2.sh "$DATA" "$RAW"

train() {  # model seed
  local name="$1_s$2" log="$OUT/train_$1_s$2.log"
  [ -f "$OUT/$name/checkpoint_last.pt" ] && grep -q "done training" "$log" 2>/dev/null && return 0
  say "training $name ($UPDATES updates) -> $log"
  fairseq-hydra-train --config-dir "configs/$1" --config-name wikitext2_small task.data="$DATA" \
    optimization.max_update="$UPDATES" common.seed="$2" dataset.disable_validation=true \
    checkpoint.save_dir="$OUT/$name" hydra.run.dir="$OUT/hydra_$name" > "$log" 2>&1
}
evaluate() {  # model seed split: the perplexity into $OUT/ppl/<model>_s<seed>.<split>
  local name="$1_s$2" out="$OUT/ppl/$1_s$2.$3"
  [ -s "$out" ] && return 0
  mkdir -p "$OUT/ppl"
  say "evaluating $name on $3"
  fairseq-eval-lm "$DATA" --user-dir trime_fairseq --task trime_lm --path "$OUT/$name/checkpoint_last.pt" \
    --gen-subset "$3" --tokens-per-sample 64 --batch-size 8 --batching stream --cpu --no-progress-bar \
    > "$out.log" 2>&1
  local ppl
  ppl=$(perplexity "$out.log")
  [ -n "$ppl" ] || { say "no perplexity in $out.log"; exit 1; }
  echo "$ppl" > "$out.tmp" && mv "$out.tmp" "$out"
}
run() {  # model seed
  train "$1" "$2"
  evaluate "$1" "$2" valid
  evaluate "$1" "$2" test
}

for seed in $SEEDS; do
  for model in transformer_xl lamemo; do
    while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do wait -n || true; done
    run "$model" "$seed" &
  done
done
wait
for seed in $SEEDS; do for model in transformer_xl lamemo; do for split in valid test; do
  [ -s "$OUT/ppl/${model}_s$seed.$split" ] || { echo "missing $OUT/ppl/${model}_s$seed.$split: rerun" >&2; exit 1; }
done; done; done

{
  echo "WikiText-2, $UPDATES updates × 512 tokens, seeds ${SEEDS// /, }; fairseq-eval-lm in stream order, memory 64"
  echo
  # shellcheck disable=SC2086
  python scripts/seed_table.py --ppl "$OUT/ppl/{row}_s{seed}.{split}" --seeds $SEEDS \
    --row transformer_xl=Transformer-XL --row lamemo=LaMemo --paired lamemo-transformer_xl
} > "$OUT/results.md.tmp"
mv "$OUT/results.md.tmp" "$OUT/results.md"
cat "$OUT/results.md"
