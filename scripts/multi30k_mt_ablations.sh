#!/usr/bin/env bash
# TRIME-MT ablations on Multi30k de->en at equal target-token budgets (docs/results_mt.md, "Why TRIME-MT collapsed").
# Every step is skipped when its output exists; an interrupted training resumes from its checkpoint_last.pt.
#   1. train the runs of RUNS (JOBS at a time, one thread each)                              (fairseq-hydra-train)
#   2. per run: valid Eq. 5 / token-only perplexity over all of valid                        (fairseq-validate)
#   3. per TRIME run: datastore of Multi30k train (g, inner product), a small trime_ext grid by BLEU on the first
#      TUNE_SENTENCES valid sentences; every run: BLEU of its token distribution on the same sentences (trime-tune-mt)
#   4. table -> $OUT/results.md
#
#   scripts/multi30k_mt_ablations.sh                       # UPDATES=1000, every run
#   RUNS="eq5_bm25 top8_bm25" scripts/multi30k_mt_ablations.sh
#
# Runs (all: configs/trime_mt/multi30k_small.yaml, UPDATES updates; about 3,600 real target tokens per update each):
#   transformer     cross_entropy, fairseq's length-sorted shuffled batches (--max-tokens 4096)
#   eq5_bm25        trime_mt_loss as the paper writes Eq. 5 (every entry of the other sentences, τ_train 1), BM25
#                   batches filled with real tokens (--bm25-fill real --max-tokens 3880)
#   eq5_shuffled    the same objective on fairseq's shuffled batches (random batches)
#   eq5_bm25_warm30 eq5_bm25 with 30% cross-entropy warm-up instead of 5%
#   top8_bm25       TRIME's released MT objective: the top-8 entries per position, τ_train 10
#   top8_shuffled   top8_bm25 on fairseq's shuffled batches
# Environment: UPDATES (1000), OUT (runs/multi30k-mt-ablations-$UPDATES), DATA (data-bin/multi30k), RUNS, JOBS (2),
# TUNE_SENTENCES (300), BEAM (5), WIDEN (rounds of trime-tune-mt's --widen-edges, 2; 0 stops after the first grid,
# about 9 decodes of TUNE_SENTENCES sentences per run).
set -euo pipefail
cd "$(dirname "$0")/.."
UPDATES=${UPDATES:-1000}
OUT=${OUT:-runs/multi30k-mt-ablations-$UPDATES}
DATA=${DATA:-data-bin/multi30k}
RUNS=${RUNS:-transformer eq5_bm25 top8_bm25 eq5_shuffled top8_shuffled eq5_bm25_warm30}
JOBS=${JOBS:-2}
TUNE_SENTENCES=${TUNE_SENTENCES:-300}
BEAM=${BEAM:-5}
WIDEN=${WIDEN:-2}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
mkdir -p "$OUT"
source scripts/lib.sh

order=$(multi30k_data "$DATA" "$OUT")

overrides() {  # run name -> its hydra overrides
  local bm25="task.bm25_order=$order task.bm25_fill=real dataset.max_tokens=3880"
  local shuffled="task.batching=shuffled task.bm25_order=null"
  local top8="criterion.train_memory_topk=8 criterion.train_memory_temperature=10"
  local eq5="criterion.train_memory_topk=0 criterion.train_memory_temperature=1"
  case $1 in
    transformer) echo "criterion._name=cross_entropy ~criterion.ce_warmup_ratio ~criterion.memory_block_size" \
                      "~criterion.train_memory_temperature ~criterion.train_memory_topk $shuffled" ;;
    eq5_bm25) echo "$bm25 $eq5" ;;
    eq5_shuffled) echo "$shuffled $eq5" ;;
    eq5_bm25_warm30) echo "$bm25 $eq5 criterion.ce_warmup_ratio=0.3" ;;
    top8_bm25) echo "$bm25 $top8" ;;
    top8_shuffled) echo "$shuffled $top8" ;;
    *) echo "unknown run $1" >&2; return 1 ;;
  esac
}

# 1. training, JOBS at a time
# shellcheck disable=SC2086
train_runs configs/trime_mt multi30k_small "$JOBS" $RUNS

GEN="--user-dir trime_fairseq --task trime_translation --cpu --beam $BEAM --max-tokens 8000 --remove-bpe"
for run in $RUNS; do
  ckpt="$OUT/$run/checkpoint_last.pt"
  # 2. valid perplexities over the whole of valid (memory: the other sentences of fairseq's valid batches)
  [ -s "$OUT/valid_$run.log" ] || fairseq-validate "$DATA" --user-dir trime_fairseq --task trime_translation \
      --path "$ckpt" --valid-subset valid --cpu --max-tokens 4096 > "$OUT/valid_$run.log" 2>&1
  # 3. BLEU on the first TUNE_SENTENCES valid sentences: the token distribution alone, and (TRIME runs) trime_ext
  # (the Transformer's BLEU on the same sentences: the plain point of scripts/multi30k_mt.sh's kNN-MT tuning)
  [ "$run" = transformer ] && continue
  dstore="$OUT/dstore_$run"
  build_datastore "$ckpt" "$DATA" train "$dstore" ip IVF256,Flat 32
  [ -s "$OUT/tune_$run.txt" ] || trime-tune-mt "$DATA" $GEN --path "$ckpt" --gen-subset valid --eval-memory trime_ext \
      --datastore "$dstore" --max-sentences-for-tuning "$TUNE_SENTENCES" --ks 8,16 --temperatures 0.5,1 \
      --interpolation-temperatures 1 --interpolation-lambdas 0.1,0.3 --widen-edges "$WIDEN" --results-json "$OUT/tune_$run.json" \
      > "$OUT/tune_$run.txt" 2> "$OUT/tune_$run.err"
done

# 4. table
{
  echo "Multi30k de->en, $UPDATES updates; valid: whole split; BLEU: beam $BEAM, first $TUNE_SENTENCES valid sentences"
  echo
  echo "| run | target tokens / update | valid Eq. 5 ppl | valid token-only ppl | BLEU, token distribution | BLEU, trime_ext (best of its grid) |"
  echo "|---|---:|---:|---:|---:|---:|"
  for run in $RUNS; do
    tok=$(grep -o "wpb=[0-9.]*" "$OUT/train_$run.log" | tail -20 | cut -d= -f2 | awk '{s+=$1} END {if (NR) printf "%.0f", s/NR}')
    ppl=$(grep -o "| ppl [0-9.]*" "$OUT/valid_$run.log" | tail -1 | awk '{print $3}')
    ce=$(grep -o "| ce_ppl [0-9.]*" "$OUT/valid_$run.log" | tail -1 | awk '{print $3}')
    # trime-tune-mt's last line: "best: FLAGS  (valid BLEU X; without memory Y)"
    plain=$(sed -n 's/^best: .*without memory \([0-9.]*\)).*/\1/p' "$OUT/tune_$run.txt")
    best=$(sed -n 's/^best: .*BLEU \([0-9.]*\);.*/\1/p' "$OUT/tune_$run.txt")
    echo "| $run | $tok | $ppl | ${ce:-$ppl} | $plain | ${best:--} |"
  done
} | tee "$OUT/results.md"
