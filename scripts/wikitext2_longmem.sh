#!/usr/bin/env bash
# LongMem on WikiText-2 (docs/results_longmem.md): pre-train the ALiBi backbone, adapt LongMem on it (two
# learning rates, the better one on valid is kept), then valid/test perplexity of 256-token segments for
#   the backbone alone; the backbone + continuous cache over the same M previous tokens (λ, θ tuned on valid
#   with trime-tune at M = 4,096); LongMem with M = 0, 1k, 2k, 4k (one model, the bank size overridden),
# the SideNet adapted the same way without a bank (control), and a plot. Every step is skipped when its
# output exists: rerun to resume.
#
#   scripts/wikitext2_longmem.sh                  # OUT=runs/longmem_wt2
#
# Environment: OUT (runs/longmem_wt2), DATA (data-bin/wikitext-2; binarized when missing from
# ../shared/data/wikitext-2), BACKBONE_UPDATES (3000), ADAPT_UPDATES (1020 = one epoch of 8 streams),
# LRS (adaptation learning rates, "0.0002 0.001"), SIZES (memory sizes, "0 1024 2048 4096").
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/longmem_wt2}
DATA=${DATA:-data-bin/wikitext-2}
BACKBONE_UPDATES=${BACKBONE_UPDATES:-3000}
ADAPT_UPDATES=${ADAPT_UPDATES:-1020}
LRS=${LRS:-0.0002 0.001}
SIZES=${SIZES:-0 1024 2048 4096}
TUNE_SIZE=4096
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
mkdir -p "$OUT"
source scripts/lib.sh
scripts/ensure_wikitext2.sh "$DATA" "${RAW:-${TRIME_DATA:-../shared/data}/wikitext-2}"
EVAL="--user-dir trime_fairseq --task trime_lm --tokens-per-sample 256 --cpu --no-progress-bar"

train() {  # name config hydra-overrides...
  local log="$OUT/train_$1.log"
  if [ ! -f "$OUT/$1/checkpoint_last.pt" ] || ! grep -q "done training" "$log" 2>/dev/null; then
    echo "training $1 -> $log" >&2
    fairseq-hydra-train --config-dir configs/longmem --config-name "$2" task.data="$DATA" \
      checkpoint.save_dir="$OUT/$1" hydra.run.dir="$OUT/hydra_$1" "${@:3}" > "$log" 2>&1
  fi
}

ppl() {  # result-file fairseq-eval-lm-args... -> perplexity, computed once and kept in $OUT/ppl/
  local file="$OUT/ppl/$1"
  mkdir -p "$OUT/ppl"
  if [ ! -s "$file" ]; then
    fairseq-eval-lm "$DATA" $EVAL "${@:2}" > "$OUT/ppl/$1.log" 2>&1
    perplexity "$OUT/ppl/$1.log" > "$file"
  fi
  cat "$file"
}

# 1. the backbone, 2. LongMem adaptation (one run per learning rate)
train backbone alibi_wikitext2_small optimization.max_update="$BACKBONE_UPDATES"
BACKBONE="$OUT/backbone/checkpoint_last.pt"
for lr in $LRS; do
  train "longmem_lr$lr" wikitext2_small model.backbone_path="$BACKBONE" optimization.lr="[$lr]" \
    optimization.max_update="$ADAPT_UPDATES" checkpoint.save_interval_updates="$ADAPT_UPDATES"
done

longmem() {  # tag checkpoint split size
  ppl "longmem_$1_$3_M$4" --path "$2" --gen-subset "$3" --batching stream --batch-size 1 \
    --model-overrides "{'memory_size': $4}"
}

# the learning rate: best valid perplexity with the training memory size
best_lr="" best=""
for lr in $LRS; do
  value=$(longmem "lr$lr" "$OUT/longmem_lr$lr/checkpoint_last.pt" valid "$TUNE_SIZE")
  if [ -z "$best" ] || python -c "import sys; sys.exit(not $value < $best)"; then best=$value best_lr=$lr; fi
done
LONGMEM="$OUT/longmem_lr$best_lr/checkpoint_last.pt"
echo "adaptation learning rate (valid, M=$TUNE_SIZE): $best_lr" >&2
# control: the same adaptation without a bank, i.e. what training the SideNet alone gives
train longmem_nomem wikitext2_small model.backbone_path="$BACKBONE" model.memory_size=0 optimization.lr="[$best_lr]" \
  optimization.max_update="$ADAPT_UPDATES" checkpoint.save_interval_updates="$ADAPT_UPDATES"

# the cache baseline: λ, θ on valid at M = 4,096, article resets as LongMem's bank
tune="$OUT/tune_cache.txt"
[ -s "$tune" ] || python -m trime_fairseq.cli.tune "$DATA" $EVAL --path "$BACKBONE" --gen-subset valid \
  --batch-size 8 --eval-memory cache --long-memory-size "$TUNE_SIZE" --memory-reset document \
  --cache-lambdas 0.02,0.05,0.1,0.2 --cache-thetas 0.05,0.1,0.3,0.5 > "$tune" 2> "$OUT/tune_cache.err"
cache_flags=$(best_flags_of "$tune")

{
  echo "| model | M | valid ppl | test ppl |"
  echo "|---|---|---|---|"
  echo "| backbone (alibi_lm_wikitext2_small) | - | $(ppl backbone_valid --path "$BACKBONE" --gen-subset valid --batch-size 8) | $(ppl backbone_test --path "$BACKBONE" --gen-subset test --batch-size 8) |"
  for m in $SIZES; do
    long=$([ "$m" -gt 0 ] && echo "--long-memory-size $m" || echo "")
    echo "| backbone + cache ($cache_flags) | $m | $(ppl "cache_valid_M$m" --path "$BACKBONE" --gen-subset valid --batch-size 8 $cache_flags $long --memory-reset document) | $(ppl "cache_test_M$m" --path "$BACKBONE" --gen-subset test --batch-size 8 $cache_flags $long --memory-reset document) |"
  done
  for m in $SIZES; do
    echo "| LongMem (lr $best_lr) | $m | $(longmem "lr$best_lr" "$LONGMEM" valid "$m") | $(longmem "lr$best_lr" "$LONGMEM" test "$m") |"
  done
  nomem="$OUT/longmem_nomem/checkpoint_last.pt"
  echo "| SideNet adapted without memory (lr $best_lr, M = 0 in training) | - | $(longmem nomem "$nomem" valid 0) | $(longmem nomem "$nomem" test 0) |"
} > "$OUT/results.md"
cat "$OUT/results.md"

python - "$OUT/results.md" "$OUT/longmem_ppl.png" <<'EOF'
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

rows = [line.strip("|\n").split("|") for line in open(sys.argv[1]) if line.startswith("| ") and "model" not in line]
series, references = {}, []
for name, m, valid, test in ([c.strip() for c in row] for row in rows):
    label = name.split(" (")[0]
    if m == "-":  # a model without a memory size: a horizontal line
        references.append((label, float(test)))
    else:
        series.setdefault(label, []).append((int(m), float(test)))
fig, ax = plt.subplots(figsize=(6, 4))
for label, points in series.items():
    ax.plot([m for m, _ in points], [p for _, p in points], marker="o", label=label)
for (label, value), style in zip(references, ["--", ":", "-."]):
    ax.axhline(value, color="gray", linestyle=style, label=label)
ax.set_xlabel("memory size M (tokens)")
ax.set_ylabel("WikiText-2 test perplexity")
ax.set_title("256-token segments")
ax.legend()
fig.tight_layout()
fig.savefig(sys.argv[2], dpi=120)
EOF
echo "plot: $OUT/longmem_ppl.png" >&2
