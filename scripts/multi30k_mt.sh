#!/usr/bin/env bash
# kNN-MT and TRIME-MT on Multi30k de->en, on CPU (docs/results_mt.md); every step is skipped when its output exists.
#   1. data: scripts/prepare_multi30k.sh; BM25 chain of the training target sentences     (trime-bm25-batches)
#   2-5. one chain per model, the two side by side (a model's chain goes on as soon as its own training is done):
#   2. train, same budget: Transformer (cross-entropy, fairseq's batches) and TRIME-MT (trime_mt_loss, BM25
#      batches)                                                                              (fairseq-hydra-train)
#   3. datastores of Multi30k train: the Transformer's decoder g, L2 (kNN-MT, Khandelwal et al. 2021);
#      TRIME-MT's g, inner product (Eq. 6)                                                   (trime-build-datastore)
#   4. tune K x T x λ (kNN-MT) and K x τ' x λ (TRIME-MT) by BLEU on valid (first TUNE_SENTENCES) (trime-tune-mt)
#   5. test2016: BLEU of Transformer, kNN-MT, TRIME-MT without and with its memory          (fairseq-generate)
#   6. domain adaptation: IWSLT'14 (TED) mapped into the Multi30k vocabulary
#      (scripts/prepare_iwslt14.sh --tokenized ... --codes ... --dict ...): datastore = IWSLT'14 valid minus its
#      last 1,000 pairs (tuning), test = the first IWSLT_TEST pairs of IWSLT'14 test; with vs without datastore
#   BLEU: detokenised sacreBLEU with its signature (scripts/sacrebleu_from_generate.py)
#
#   scripts/multi30k_mt.sh                 # UPDATES=1000
#
#   CONFIG=multi30k_d256 UPDATES=2200 SEED=2 FLAGS_FROM=runs/multi30k-mt-multi30k_d256-2200-seed1 TRIME="task.bm25_fill=real dataset.max_tokens=3880 \
#     criterion.train_memory_topk=8 criterion.train_memory_temperature=10 +criterion.forward_chunks=4" scripts/multi30k_mt.sh   # one seed of item 4
#
# Environment: UPDATES (1000), CONFIG (configs/trime_mt/CONFIG.yaml: multi30k_small), SEED (1), TRIME (extra hydra
# overrides of the TRIME-MT run), OUT (runs/multi30k-mt-$UPDATES for multi30k_small seed 1, else
# runs/multi30k-mt-$CONFIG-$UPDATES-seed$SEED), FLAGS_FROM (a finished run's folder: its Multi30k settings, tuned on
# its valid, instead of tuning here: the seeds of a row share seed 1's setting), DATA (data-bin/multi30k), BEAM (5), TUNE_SENTENCES (300),
# IWSLT (../shared/data/iwslt14.tokenized.de-en; skipped when absent), IWSLT_TEST (1000), TED_TUNE_SENTENCES (1000), KS (K grid,
# 1,2,4,8,16,32,64 as the paper after Zheng et al. 2021), TEMPERATURES (TRIME-MT's τ grid: 1 and the
# criterion.train_memory_temperature of TRIME when given), INDEX (FAISS factory of the datastores, IVF1024,Flat:
# nprobe 32 finds 0.973 of the exact top 64 and the nearest entry for 0.991 of the queries, at 4.2x the queries per
# CPU second of IVF256,Flat (0.990, 1.000) on the d256 Transformer's keys: docs/results_mt.md).
set -euo pipefail
cd "$(dirname "$0")/.."
UPDATES=${UPDATES:-1000}
CONFIG=${CONFIG:-multi30k_small}
SEED=${SEED:-1}
TRIME=${TRIME:-}
FLAGS_FROM=${FLAGS_FROM:-}
if [ "$CONFIG" = multi30k_small ] && [ "$SEED" = 1 ]; then OUT=${OUT:-runs/multi30k-mt-$UPDATES}
else OUT=${OUT:-runs/multi30k-mt-$CONFIG-$UPDATES-seed$SEED}; fi
DATA=${DATA:-data-bin/multi30k}
BEAM=${BEAM:-5}
TUNE_SENTENCES=${TUNE_SENTENCES:-300}
KS=${KS:-1,2,4,8,16,32,64}
IWSLT=${IWSLT:-${TRIME_DATA:-../shared/data}/iwslt14.tokenized.de-en}
IWSLT_TEST=${IWSLT_TEST:-1000}
TED_TUNE_SENTENCES=${TED_TUNE_SENTENCES:-1000}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
mkdir -p "$OUT"
source scripts/lib.sh

# 1. data
order=$(multi30k_data "$DATA" "$OUT")
[ -z "$FLAGS_FROM" ] || flags_from "$FLAGS_FROM" tune_knn.flags tune_trime_ext.flags  # seed 1's settings

# 2-5. one chain per model, the two side by side (one core each): train -> datastore -> tune on valid -> test2016
overrides() {  # run name -> its hydra overrides (train_runs of scripts/lib.sh)
  case $1 in
    transformer) echo "common.seed=$SEED criterion._name=cross_entropy ~criterion.ce_warmup_ratio" \
                      "~criterion.memory_block_size ~criterion.train_memory_temperature ~criterion.train_memory_topk" \
                      "task.batching=shuffled task.bm25_order=null" ;;
    trime_mt) echo "common.seed=$SEED task.bm25_order=$order $TRIME" ;;
    *) echo "unknown run $1" >&2; return 1 ;;
  esac
}
transformer="$OUT/transformer/checkpoint_last.pt"
trime="$OUT/trime_mt/checkpoint_last.pt"

datastore() {  # checkpoint data split output metric
  build_datastore "$1" "$2" "$3" "$4" "$5" "${INDEX:-IVF1024,Flat}" 32
}

GEN="--user-dir trime_fairseq --task trime_translation --cpu --beam $BEAM --max-tokens 8000 --remove-bpe"
tune() {  # name checkpoint data mode datastore grid... -> best flags (by BLEU on the first TUNE_SENTENCES of valid)
  local out="$OUT/tune_$1"
  if [ ! -s "$out.flags" ]; then
    say "tuning $1 by BLEU on the first $TUNE_SENTENCES sentences of $3 valid"
    trime-tune-mt "$3" $GEN --path "$2" --gen-subset valid --eval-memory "$4" --datastore "$5" \
      --max-sentences-for-tuning "$TUNE_SENTENCES" --ks "$KS" --results-json "$out.json" "${@:6}" \
      > "$out.txt" 2> "$out.err"
    best_flags_of "$out.txt" > "$out.flags"
  fi
  [ -s "$out.flags" ] || { say "tuning $1 failed: see $out.err"; return 1; }
  cat "$out.flags"
}

bleu() {  # name checkpoint data split refs args... -> BLEU line
  local out="$OUT/gen_$1"
  if [ ! -s "$out.bleu" ]; then
    say "  decoding $1"
    fairseq-generate "$3" $GEN --path "$2" --gen-subset "$4" "${@:6}" > "$out.txt" 2> "$out.err"
    python scripts/sacrebleu_from_generate.py "$out.txt" ${5:+--refs "$5"} > "$out.bleu"
  fi
  cat "$out.bleu"
}
refs="$DATA/bpe/test.raw.en"

transformer_chain() {  # the Transformer and kNN-MT (its decoder g, L2: Khandelwal et al. 2021)
  train_runs configs/trime_mt "$CONFIG" 1 transformer
  datastore "$transformer" "$DATA" train "$OUT/dstore_transformer" l2
  tune knn "$transformer" "$DATA" knn "$OUT/dstore_transformer" --knn-temperatures 1,10,100 \
    --knn-lambdas 0.1,0.3,0.5 > /dev/null
  say "decoding Multi30k test2016 (beam $BEAM): Transformer, kNN-MT"
  bleu transformer "$transformer" "$DATA" test "$refs" > /dev/null
  # shellcheck disable=SC2046
  bleu knn "$transformer" "$DATA" test "$refs" $(cat "$OUT/tune_knn.flags") --datastore "$OUT/dstore_transformer" \
    > /dev/null
}
# TRIME-MT's memory temperatures τ: the paper's 1 and, when it differs, the one the model was trained with
# (criterion.train_memory_temperature in TRIME: the released objective's 10 makes its sims 10x sharper at τ 1)
train_tau=$(sed -n 's/.*criterion\.train_memory_temperature=\([0-9.]*\).*/\1/p' <<< "$TRIME")
if [ -z "$train_tau" ] || [ "$train_tau" = 1 ]; then TEMPERATURES=${TEMPERATURES:-1}
else TEMPERATURES=${TEMPERATURES:-1,$train_tau}; fi
trime_chain() {  # TRIME-MT without memory and with its own (g, inner product: Eq. 6)
  train_runs configs/trime_mt "$CONFIG" 1 trime_mt
  datastore "$trime" "$DATA" train "$OUT/dstore_trime_mt" ip
  tune trime_ext "$trime" "$DATA" trime_ext "$OUT/dstore_trime_mt" --temperatures "$TEMPERATURES" \
    --interpolation-temperatures 1,10 --interpolation-lambdas 0.1,0.3,0.5 > /dev/null
  say "decoding Multi30k test2016 (beam $BEAM): TRIME-MT"
  bleu trime_none "$trime" "$DATA" test "$refs" > /dev/null
  # shellcheck disable=SC2046
  bleu trime_ext "$trime" "$DATA" test "$refs" $(cat "$OUT/tune_trime_ext.flags") --datastore "$OUT/dstore_trime_mt" \
    > /dev/null
}
watch_training "$UPDATES" "$OUT/train_transformer.log" "$OUT/train_trime_mt.log" & watch_pid=$!
transformer_chain & p1=$!
trime_chain & p2=$!
wait $p1; wait $p2
kill $watch_pid 2>/dev/null || true
knn_flags=$(cat "$OUT/tune_knn.flags")
trime_flags=$(cat "$OUT/tune_trime_ext.flags")
say "tuned: kNN-MT $knn_flags; TRIME-MT $trime_flags"

# 6. domain adaptation: IWSLT'14 (TED talks) in the Multi30k vocabulary
domain=""
if [ -f "$IWSLT/valid.de" ]; then
  ted="$OUT/iwslt14-in-multi30k"
  if [ ! -f "$ted/dict.en.txt" ]; then
    say "IWSLT'14 valid (datastore / last 1,000 pairs: tuning) and test (first $IWSLT_TEST pairs) -> $ted"
    split="$OUT/iwslt14-split"
    mkdir -p "$split"
    for l in de en; do
      n=$(wc -l < "$IWSLT/valid.$l")
      head -n $((n - 1000)) "$IWSLT/valid.$l" > "$split/train.$l"  # the datastore
      tail -n 1000 "$IWSLT/valid.$l" > "$split/valid.$l"           # tuning
      head -n "$IWSLT_TEST" "$IWSLT/test.$l" > "$split/test.$l"
    done
    scripts/prepare_iwslt14.sh "$ted" --tokenized "$split" --codes "$DATA/bpe/code" --dict "$DATA/dict.en.txt" \
      > "$OUT/iwslt14-prepare.log" 2>&1
  fi
  datastore "$transformer" "$ted" train "$OUT/dstore_ted_transformer" l2 & p1=$!
  datastore "$trime" "$ted" train "$OUT/dstore_ted_trime_mt" ip & p2=$!
  wait $p1; wait $p2
  ted_knn=$(TUNE_SENTENCES=$TED_TUNE_SENTENCES tune ted_knn "$transformer" "$ted" knn "$OUT/dstore_ted_transformer" \
    --knn-temperatures 1,10,100 --knn-lambdas 0.1,0.3,0.5)
  ted_trime=$(TUNE_SENTENCES=$TED_TUNE_SENTENCES tune ted_trime_ext "$trime" "$ted" trime_ext "$OUT/dstore_ted_trime_mt" \
    --temperatures 1 --interpolation-temperatures 1,10 --interpolation-lambdas 0.1,0.3,0.5)
  say "decoding IWSLT'14 test (first $IWSLT_TEST pairs)"
  bleu ted_transformer "$transformer" "$ted" test "" > /dev/null & p1=$!
  bleu ted_knn "$transformer" "$ted" test "" $ted_knn --datastore "$OUT/dstore_ted_transformer" > /dev/null & p2=$!
  wait $p1; wait $p2
  bleu ted_trime_none "$trime" "$ted" test "" > /dev/null & p1=$!
  bleu ted_trime_ext "$trime" "$ted" test "" $ted_trime --datastore "$OUT/dstore_ted_trime_mt" > /dev/null & p2=$!
  wait $p1; wait $p2
  domain=1
fi

score() { sed -n 's/^BLEU = \([0-9.]*\) .*/\1/p' "$OUT/gen_$1.bleu"; }
{
  echo "Multi30k de->en, configs/trime_mt/$CONFIG.yaml, seed $SEED, $UPDATES updates; TRIME-MT overrides: ${TRIME:-none}; beam $BEAM;"
  [ -z "$FLAGS_FROM" ] || echo "Multi30k settings tuned on $FLAGS_FROM's valid (FLAGS_FROM), not on this seed's;"
  echo "detokenised sacreBLEU: $(sed -n 's/.* | \(nrefs[^|]*|[^|]*|[^|]*|[^|]*|[^|]*|[^|]*\) | .*/\1/p' "$OUT/gen_transformer.bleu")"
  echo
  echo "| model | evaluation memory (tuned on valid) | test2016 BLEU |$([ -n "$domain" ] && echo " IWSLT'14 test BLEU (memory: IWSLT'14 valid) |")"
  echo "|---|---|---|$([ -n "$domain" ] && echo "---|")"
  echo "| Transformer | none | $(score transformer) |$([ -n "$domain" ] && echo " $(score ted_transformer) |")"
  echo "| Transformer: kNN-MT | \`$knn_flags\` (Multi30k train)$([ -n "$domain" ] && echo "; \`$ted_knn\` (TED)") | $(score knn) |$([ -n "$domain" ] && echo " $(score ted_knn) |")"
  echo "| TRIME-MT | none | $(score trime_none) |$([ -n "$domain" ] && echo " $(score ted_trime_none) |")"
  echo "| TRIME-MT | \`$trime_flags\` (Multi30k train)$([ -n "$domain" ] && echo "; \`$ted_trime\` (TED)") | $(score trime_ext) |$([ -n "$domain" ] && echo " $(score ted_trime_ext) |")"
} | tee "$OUT/results.md"
