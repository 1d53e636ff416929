#!/usr/bin/env bash
# The long-range recall benchmark (docs/results_recall.md), resumable: every step is skipped when its output
# exists, so rerun to resume. Trainings run in the background, JOBS at a time, logs in $OUT/train_NAME.log.
#   1. the recall corpus from WikiText-2 (trime-recall make) and its binarisation (scripts/prepare_recall.sh)
#   2. small models trained briefly (UPDATES) on the recall training split, with the configs of
#      scripts/wikitext2_{compare,long,external,spalm,longmem}.sh: vanilla, TRIMELM, TRIMELM_long, TRIMELM_ext
#      (BM25 order), Transformer-XL, LaMemo, SPALM (neighbours from a datastore of the vanilla LM's training
#      split), LongMem (ALiBi backbone, then the SideNet; bank reset never: episodes cross articles)
#   3. datastores of the memory split ({split}_memory: the first occurrences alone): the vanilla LM's g (L2,
#      kNN-LM), TRIMELM_ext's g (ip), the vanilla LM's f (ip, SPALM's neighbours of the scored split)
#   4. every system x memory and its no-memory control scored on $SPLIT (trime-recall score)
#   5. the report (verdicts) and the plot: $OUT/report.md, $OUT/recall.png (DOCS=1: also into docs/)
#
#   scripts/recall_benchmark.sh                                    # UPDATES=1200, OUT=runs/recall-$UPDATES
#   UPDATES=3 OUT=/tmp/recall-smoke SMOKE=1 scripts/recall_benchmark.sh   # minutes: tiny corpus and memories
#
# Environment: UPDATES (1200; LongMem's backbone BACKBONE_UPDATES, default UPDATES), OUT, RAW (WikiText-2
# folder, default $TRIME_DATA/wikitext-2 or ../shared/data/wikitext-2), SEED (1), MAKE_ARGS (extra trime-recall
# make options), SPLIT (test), LONG_SIZES (long-term memories of cache / TRIMELM_long, "4096 16384"),
# BANK_SIZES (LongMem, "4096 16384"), TXL_MEMS (Transformer-XL / LaMemo memory at evaluation, "64 1024"),
# K (datastore neighbours, 64), SPALM_K (4), INDEX (the training datastore's FAISS factory, IVF1024,PQ32),
# CACHE_FLAGS, TRIME_FLAGS, KNN_FLAGS, EXT_FLAGS (fixed memory options, not tuned), JOBS (2), DOCS (0),
# SMOKE (0; 1: the first 300 / 200 lines, gaps 0,8,64,300, memories 512/1024, one-layer-sized runs),
# SYSTEMS (all; a subset of "vanilla trime trime_long trime_ext transformer_xl lamemo spalm longmem" trains and
# scores only those -- spalm needs vanilla; the report then covers them alone and DOCS=1 is refused),
# TXL_TRAIN_FLAGS (extra hydra overrides of the transformer_xl / lamemo trainings, e.g. model.mem_len=512),
# MODEL_SEED (1: every training's common.seed, the configs' own value; SEED seeds the corpus only, so seeds of the
# models on one corpus are MODEL_SEED=2, 3 with OUT defaulting to runs/recall-$UPDATES-seedN).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
SMOKE=${SMOKE:-0}
UPDATES=${UPDATES:-1200}
BACKBONE_UPDATES=${BACKBONE_UPDATES:-$UPDATES}
MODEL_SEED=${MODEL_SEED:-1}
if [ "$MODEL_SEED" = 1 ]; then OUT=${OUT:-runs/recall-$UPDATES}; else OUT=${OUT:-runs/recall-$UPDATES-seed$MODEL_SEED}; fi
RAW=${RAW:-${TRIME_DATA:-../shared/data}/wikitext-2}
SEED=${SEED:-1}
SPLIT=${SPLIT:-test}
JOBS=${JOBS:-2}
DOCS=${DOCS:-0}
SYSTEMS=${SYSTEMS:-}
TXL_TRAIN_FLAGS=${TXL_TRAIN_FLAGS:-}
want() { [ -z "$SYSTEMS" ] || [[ " $SYSTEMS " == *" $1 "* ]]; }
for name in $SYSTEMS; do
  case "$name" in vanilla|trime|trime_long|trime_ext|transformer_xl|lamemo|spalm|longmem) ;;
    *) echo "SYSTEMS: unknown system '$name'" >&2; exit 2 ;; esac
done
if [ -n "$SYSTEMS" ] && [ "$DOCS" = 1 ]; then echo "DOCS=1 writes the full report: unset SYSTEMS" >&2; exit 2; fi
if want spalm && ! want vanilla; then echo "SYSTEMS: spalm needs vanilla (its neighbours' datastore)" >&2; exit 2; fi
K=${K:-64}
SPALM_K=${SPALM_K:-4}
INDEX=${INDEX:-IVF1024,PQ32}
CACHE_FLAGS=${CACHE_FLAGS:---cache-lambda 0.1 --cache-theta 0.3}
TRIME_FLAGS=${TRIME_FLAGS:---memory-temperature 1}
KNN_FLAGS=${KNN_FLAGS:---knn-temperature 1 --knn-lambda 0.25}
EXT_FLAGS=${EXT_FLAGS:---memory-temperature 1 --interpolation-temperature 1 --interpolation-lambda 0.25}
if [ "$SMOKE" = 1 ]; then
  MAKE_ARGS=${MAKE_ARGS:---train-lines 300 --eval-lines 200 --gaps 0,8,64,300 --episodes 2 --train-gaps 8,64 --train-rate 2}
  LONG_SIZES=${LONG_SIZES:-512 1024}
  BANK_SIZES=${BANK_SIZES:-512 1024}
  TXL_MEMS=${TXL_MEMS:-64 256}
  INDEX=Flat
else
  MAKE_ARGS=${MAKE_ARGS:-}
  LONG_SIZES=${LONG_SIZES:-4096 16384}
  BANK_SIZES=${BANK_SIZES:-4096 16384}
  TXL_MEMS=${TXL_MEMS:-64 1024}
fi
RECALL="python -m trime_fairseq.cli.recall"
mkdir -p "$OUT"
source scripts/lib.sh
DATA="$OUT/data-bin"
LOCAL=128        # --context-window: every scored token sees >= 128 earlier tokens of its row ...
LOCAL_HI=255     # ... and at most 255 (256-token rows)
EVAL=(--user-dir trime_fairseq --task trime_lm --cpu --no-progress-bar)
ROWS=(--tokens-per-sample 256 --context-window $LOCAL --batch-size 8)

# 1. corpus and binarisation
if [ ! -f "$OUT/raw/recall.json" ]; then
  say "recall corpus from $RAW -> $OUT/raw"
  $RECALL make --source "$RAW" --output "$OUT/raw" --seed "$SEED" $MAKE_ARGS > "$OUT/make.log" 2>&1
fi
if [ ! -f "$DATA/test_memory.idx" ]; then
  say "binarising -> $DATA"
  rm -rf "$DATA"
  scripts/prepare_recall.sh "$OUT/raw" "$DATA" > "$OUT/prepare.log" 2>&1
fi

# 2. training (background, $JOBS at a time)
trained() { [ -f "$OUT/$1/checkpoint_last.pt" ] && grep -q "done training" "$OUT/train_$1.log" 2>/dev/null; }
small_vocabulary() {  # config-dir config-name: SMOKE's corpus has < 10k words, the configs' adaptive cutoffs 2k/10k
  [ "$SMOKE" = 1 ] || return 0
  case "$1/$2" in
    configs/longmem/wikitext2_small) ;;  # the backbone's output layer
    configs/longmem/alibi_wikitext2_small) echo "model.adaptive_softmax_cutoff='200,1000'" ;;
    *) echo "model.adaptive_input_cutoff='200,1000' model.adaptive_softmax_cutoff='200,1000'" ;;
  esac
}
train() {  # name config-dir config-name overrides...
  trained "$1" && return 0
  want "${1/backbone/longmem}" || return 0
  say "training $1 ($3, $UPDATES updates) -> $OUT/train_$1.log"
  fairseq-hydra-train --config-dir "$2" --config-name "$3" task.data="$DATA" checkpoint.save_dir="$OUT/$1" \
    hydra.run.dir="$OUT/hydra_$1" optimization.max_update="$UPDATES" common.seed="$MODEL_SEED" \
    $(small_vocabulary "$2" "$3") "${@:4}" \
    > "$OUT/train_$1.log" 2>&1
}
background() {  # command...: run in the background, at most $JOBS at a time
  while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do wait -n || true; done
  "$@" &
}
finish() {  # wait for the background jobs, then check that the named runs finished
  wait || true
  for name in "$@"; do want "${name/backbone/longmem}" || continue; trained "$name" || { echo "training $name failed: see $OUT/train_$name.log" >&2; exit 1; }; done
}
NOVALID=(dataset.validate_interval_updates=0 checkpoint.save_interval_updates=0)
SHUFFLED=(task.batching=shuffled task.consecutive_segments=1 '~criterion.memory_block_size')

order="$OUT/bm25-256.order"
! want trime_ext || [ -f "$order" ] || python -m trime_fairseq.cli.bm25_batches --data "$DATA" --tokens-per-sample 256 --output "$order" \
  --workers 1 --no-progress-bar > "$OUT/bm25.log" 2>&1
background train vanilla configs/trime wikitext2_small criterion._name=adaptive_loss "${NOVALID[@]}"
background train trime configs/trime wikitext2_small criterion._name=trime_loss "${NOVALID[@]}"
background train trime_long configs/trime_long wikitext2_small "${NOVALID[@]}"
background train trime_ext configs/trime_ext wikitext2_small task.bm25_order="$order" "${NOVALID[@]}"
background train transformer_xl configs/transformer_xl wikitext2_small "${NOVALID[@]}" $TXL_TRAIN_FLAGS
background train lamemo configs/lamemo wikitext2_small "${NOVALID[@]}" $TXL_TRAIN_FLAGS
UPDATES=$BACKBONE_UPDATES background train backbone configs/longmem alibi_wikitext2_small
finish vanilla trime trime_long trime_ext transformer_xl lamemo backbone
background train longmem configs/longmem wikitext2_small model.backbone_path="$OUT/backbone/checkpoint_last.pt" \
  model.bank_reset=never checkpoint.save_interval_updates="$UPDATES"
ckpt() { echo "$OUT/$1/checkpoint_last.pt"; }

# 3. datastores (a complete one has datastore.json) and SPALM's neighbours
datastore() {  # name checkpoint split metric key-type index
  [ -f "$OUT/$1/datastore.json" ] && return 0
  say "datastore $1 ($3) -> $OUT/$1"
  python -m trime_fairseq.cli.build_datastore --path "$2" --data "$DATA" --gen-subset "$3" --tokens-per-sample 256 \
    --context-window $LOCAL --batch-size 8 --output "$OUT/$1" --metric "$4" --key-type "$5" --index-factory "$6" \
    --ntrain 200000 --nprobe 16 --cpu --no-progress-bar > "$OUT/$1.log" 2>&1
}
neighbours() {  # datastore output split
  [ -f "$OUT/$2/$3/neighbours.json" ] && return 0
  python -m trime_fairseq.cli.neighbours --datastore "$OUT/$1" --gen-subset "$3" --output "$OUT/$2" --k "$SPALM_K" \
    --cpu --no-progress-bar > "$OUT/$2_$3.log" 2>&1
}
if want vanilla; then datastore dstore_knn "$(ckpt vanilla)" "${SPLIT}_memory" l2 trime_key Flat; fi
if want trime_ext; then datastore dstore_ext "$(ckpt trime_ext)" "${SPLIT}_memory" ip trime_key Flat; fi
if want spalm; then
  datastore dstore_spalm_memory "$(ckpt vanilla)" "${SPLIT}_memory" ip trime_feature Flat
  datastore dstore_spalm_train "$(ckpt vanilla)" train ip trime_feature "$INDEX"
  for split in train valid "$SPLIT"; do neighbours dstore_spalm_train neighbours_train "$split"; done
  neighbours dstore_spalm_memory neighbours_memory "$SPLIT"
fi
background train spalm configs/spalm wikitext2_small task.neighbours="$OUT/neighbours_train" "${NOVALID[@]}"
finish longmem spalm

# 4. scoring: label control reach checkpoint fairseq-eval-lm-args...
SCORES="$OUT/scores_$SPLIT"
mkdir -p "$SCORES"
FAILED=0
score() {  # skipped unless $SYSTEM (set before each system's rows) is wanted
  local out="$SCORES/$1.json"
  want "$SYSTEM" || return 0
  [ -s "$out" ] && return 0
  say "scoring $1"
  $RECALL score "$DATA" "${EVAL[@]}" --path "$4" --gen-subset "$SPLIT" --recall-index "$DATA/$SPLIT.recall.json" \
    --label "$1" ${2:+--control "$2"} --reach "$3" --output "$out" "${@:5}" > "$SCORES/$1.log" 2>&1 \
    || { say "  scoring $1 failed: see $SCORES/$1.log"; FAILED=1; }
}
# transformer LMs: 256-token rows, 128 of context
SYSTEM=vanilla
score vanilla "" "$LOCAL:$LOCAL_HI" "$(ckpt vanilla)" "${ROWS[@]}"
score vanilla+cache vanilla "$LOCAL:$LOCAL_HI" "$(ckpt vanilla)" "${ROWS[@]}" --eval-memory cache $CACHE_FLAGS
for n in $LONG_SIZES; do
  score "vanilla+cache-$n" vanilla "$n:$((n + LOCAL_HI))" "$(ckpt vanilla)" "${ROWS[@]}" --eval-memory cache \
    $CACHE_FLAGS --long-memory-size "$n"
done
score kNN-LM vanilla inf "$(ckpt vanilla)" "${ROWS[@]}" --eval-memory knn --datastore "$OUT/dstore_knn" \
  --knn-k "$K" $KNN_FLAGS
SYSTEM=trime
score TRIMELM-none "" "$LOCAL:$LOCAL_HI" "$(ckpt trime)" "${ROWS[@]}"
score TRIMELM TRIMELM-none "$LOCAL:$LOCAL_HI" "$(ckpt trime)" "${ROWS[@]}" --eval-memory trime $TRIME_FLAGS
SYSTEM=trime_long
score TRIMELM_long-none "" "$LOCAL:$LOCAL_HI" "$(ckpt trime_long)" "${ROWS[@]}"
for n in $LONG_SIZES; do
  score "TRIMELM_long-$n" TRIMELM_long-none "$n:$((n + LOCAL_HI))" "$(ckpt trime_long)" "${ROWS[@]}" \
    --eval-memory trime $TRIME_FLAGS --long-memory-size "$n"
done
SYSTEM=trime_ext
score TRIMELM_ext-none "" "$LOCAL:$LOCAL_HI" "$(ckpt trime_ext)" "${ROWS[@]}"
score TRIMELM_ext TRIMELM_ext-none inf "$(ckpt trime_ext)" "${ROWS[@]}" --eval-memory trime_ext \
  --datastore "$OUT/dstore_ext" --knn-k "$K" $EXT_FLAGS
# recurrence models in stream order, one stream (a row per stream would cut episodes at the stream ends)
STREAM=(--batching stream --tokens-per-sample 64 --batch-size 1)
for model in transformer_xl lamemo; do
  SYSTEM=$model
  score "$model-mem0" "" "0:63" "$(ckpt $model)" "${STREAM[@]}" --model-overrides "{'mem_len': 0}"
  for m in $TXL_MEMS; do
    score "$model-mem$m" "$model-mem0" "$m:$((m + 63))" "$(ckpt $model)" "${STREAM[@]}" \
      --model-overrides "{'mem_len': $m}"
  done
done
# SPALM: neighbours from the first occurrences (memory) vs from its training datastore (control)
SYSTEM=spalm
score SPALM-train-neighbours "" "64:127" "$(ckpt spalm)" "${STREAM[@]}" --neighbours "$OUT/neighbours_train"
score SPALM SPALM-train-neighbours inf "$(ckpt spalm)" "${STREAM[@]}" --neighbours "$OUT/neighbours_memory"
# LongMem: bank sizes vs no bank, same model (bank never reset: episodes cross article ends)
LONGMEM=(--batching stream --tokens-per-sample 256 --batch-size 1)
SYSTEM=longmem
score LongMem-M0 "" "0:255" "$(ckpt longmem)" "${LONGMEM[@]}" --model-overrides "{'memory_size': 0}"
for m in $BANK_SIZES; do
  score "LongMem-M$m" LongMem-M0 "$m:$((m + 259))" "$(ckpt longmem)" "${LONGMEM[@]}" \
    --model-overrides "{'memory_size': $m, 'bank_reset': 'never'}"
done
[ "$FAILED" = 0 ] || { echo "some scoring failed (see $SCORES/*.log); rerun to resume" >&2; exit 1; }

# 5. report and plot
files=()
for f in "$SCORES"/*.json; do files+=("$f"); done
$RECALL report "${files[@]}" --output "$OUT/report.md" > /dev/null
$RECALL plot "${files[@]}" --output "$OUT/recall.png" > /dev/null
{
  echo "$SPLIT split of the recall corpus (seed $SEED; $(python -c "import json,sys; s=json.load(open(sys.argv[1]))['settings']; print(f\"S={s['span_length']}, keys={s['key_length']}, gaps={s['gaps']}, {s['episodes']} episodes per bucket\")" "$DATA/recall.json")),"
  echo "models trained $UPDATES updates (model seed $MODEL_SEED); memory flags: cache \`$CACHE_FLAGS\`, TRIME \`$TRIME_FLAGS\`, kNN \`--knn-k $K $KNN_FLAGS\`, TRIMELM_ext \`$EXT_FLAGS\`"
  echo
  cat "$OUT/report.md"
} > "$OUT/results.md"
cat "$OUT/results.md"
if [ "$DOCS" = 1 ]; then
  mkdir -p docs/figures
  cp "$OUT/recall.png" docs/figures/recall.png
  python - "$OUT/results.md" docs/results_recall.md <<'EOF'
import sys
results, doc = open(sys.argv[1]).read(), open(sys.argv[2]).read()
begin, end = "<!-- recall-results:begin -->", "<!-- recall-results:end -->"
head, rest = doc.split(begin)
_, tail = rest.split(end)
open(sys.argv[2], "w").write(head + begin + "\n" + results + "\n![recall](figures/recall.png)\n" + end + tail)
EOF
  say "docs/results_recall.md and docs/figures/recall.png updated"
fi
