#!/usr/bin/env bash
# SPALM on WikiText-2 (docs/results_spalm.md): the whole pipeline on CPU, resumable (finished steps are skipped).
#   1. vanilla LM, the separate key encoder              (fairseq-hydra-train, configs/trime + adaptive_loss)
#   2. datastore of the training split, key = its final hidden state f, inner product
#                                                         (trime-build-datastore --key-type trime_feature)
#   3. k = 4 neighbours of every train / valid / test token (trime-neighbours; train: own document excluded)
#   4. Transformer-XL and SPALM, the same architecture and budget (configs/transformer_xl, configs/spalm);
#      SPALM twice: neighbour embeddings as the paper writes them (y_k = the embedding row) and scaled by √d
#      like the model's own input embeddings (model.spalm_scale_values=true)
#   5. kNN-LM (Transformer-XL + p_kNN over the same neighbours) and SPALM + kNN: T x λ tuned on valid
#      (trime-tune --eval-memory neighbour_knn)
#   6. fairseq-eval-lm of the four in stream order (the training memory of 64), valid and test
#   7. SPALM's gate on valid: mean and histogram (python -m trime_fairseq.cli.spalm_gates)
# Table in $OUT/results.md; figures in $OUT/gates_valid*.png.
#
#   UPDATES=1500 scripts/wikitext2_spalm.sh
#
# Environment: UPDATES (1500: Transformer-XL and SPALM), VANILLA_UPDATES (1500), OUT (runs/wikitext2-spalm-$UPDATES),
# DATA (data-bin/wikitext-2), RAW (as in wikitext2_compare.sh), K (4), INDEX (FAISS factory, IVF1024,PQ32),
# NPROBE (16), NTRAIN (200000).
set -euo pipefail
cd "$(dirname "$0")/.."
UPDATES=${UPDATES:-1500}
VANILLA_UPDATES=${VANILLA_UPDATES:-1500}
OUT=${OUT:-runs/wikitext2-spalm-$UPDATES}
DATA=${DATA:-data-bin/wikitext-2}
RAW=${RAW:-${TRIME_DATA:-../shared/data}/wikitext-2}
K=${K:-4}
INDEX=${INDEX:-IVF1024,PQ32}
NPROBE=${NPROBE:-16}
NTRAIN=${NTRAIN:-200000}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
mkdir -p "$OUT"

scripts/ensure_wikitext2.sh "$DATA" "$RAW"

hydra_train() {  # name config-dir updates overrides...
  local log="$OUT/train_$1.log"
  if [ ! -f "$OUT/$1/checkpoint_last.pt" ] || ! grep -q "done training" "$log" 2>/dev/null; then
    echo "training $1 ($3 updates) -> $log" >&2
    fairseq-hydra-train --config-dir "$2" --config-name wikitext2_small task.data="$DATA" \
      optimization.max_update="$3" checkpoint.save_dir="$OUT/$1" hydra.run.dir="$OUT/hydra_$1" "${@:4}" \
      > "$log" 2>&1
  fi
}

# 1. the key encoder
hydra_train vanilla configs/trime "$VANILLA_UPDATES" criterion._name=adaptive_loss
vanilla="$OUT/vanilla/checkpoint_last.pt"

# 2. datastore of the training split: 256-token rows, 128 of them context (every token scored once)
dstore="$OUT/dstore"
[ -f "$dstore/datastore.json" ] || python -m trime_fairseq.cli.build_datastore --path "$vanilla" --data "$DATA" \
  --gen-subset train --tokens-per-sample 256 --context-window 128 --batch-size 8 --output "$dstore" \
  --key-type trime_feature --metric ip --index-factory "$INDEX" --ntrain "$NTRAIN" --nprobe "$NPROBE" --cpu \
  --no-progress-bar > "$OUT/dstore.log" 2>&1

# 3. neighbours (the same vanilla LM queries the datastore for every split)
neighbours="$OUT/neighbours"
for split in train valid test; do
  [ -f "$neighbours/$split/neighbours.json" ] || python -m trime_fairseq.cli.neighbours --datastore "$dstore" \
    --gen-subset "$split" --output "$neighbours" --k "$K" --cpu --no-progress-bar > "$OUT/neighbours_$split.log" 2>&1
done

# 4. Transformer-XL and SPALM: same sizes, data order and budget
hydra_train transformer_xl configs/transformer_xl "$UPDATES"
hydra_train spalm configs/spalm "$UPDATES" task.neighbours="$neighbours"
hydra_train spalm_scaled configs/spalm "$UPDATES" task.neighbours="$neighbours" model.spalm_scale_values=true
txl="$OUT/transformer_xl/checkpoint_last.pt"
spalm="$OUT/spalm/checkpoint_last.pt"
scaled="$OUT/spalm_scaled/checkpoint_last.pt"

EVAL=(--batching stream --tokens-per-sample 64 --batch-size 8 --cpu)

# 5. the interpolation with p_kNN over the same k neighbours, tuned on valid
best_flags() {  # name checkpoint -> best flags
  [ -s "$OUT/best_$1.flags" ] || python -m trime_fairseq.cli.tune "$DATA" --user-dir trime_fairseq --task trime_lm \
    --path "$2" --gen-subset valid --neighbours "$neighbours" "${EVAL[@]}" --no-progress-bar \
    --eval-memory neighbour_knn --knn-temperatures 0.5,1,2,5,10 --knn-lambdas 0.05,0.1,0.2,0.3,0.4 \
    --results-json "$OUT/tune_$1.json" 2> "$OUT/tune_$1.err" | tee "$OUT/tune_$1.txt" \
    | sed -n 's/^best: \(.*\)  (.*/\1/p' > "$OUT/best_$1.flags"
  [ -s "$OUT/best_$1.flags" ] || { echo "tuning $1 failed: see $OUT/tune_$1.err" >&2; exit 1; }
}
best_flags knn_lm "$txl"
best_flags spalm_knn "$spalm"
best_flags spalm_scaled_knn "$scaled"

# 6. evaluation in stream order, memory 64 as in training
eval_ppl() {  # name checkpoint split args...
  [ -s "$OUT/ppl_$1_$3" ] || fairseq-eval-lm "$DATA" --user-dir trime_fairseq --task trime_lm --path "$2" \
    --gen-subset "$3" "${EVAL[@]}" "${@:4}" 2>&1 | tee "$OUT/eval_$1_$3.log" \
    | grep -o "Perplexity: [0-9.]*" | cut -d' ' -f2 > "$OUT/ppl_$1_$3"
  [ -s "$OUT/ppl_$1_$3" ] || { echo "evaluation $1 $3 failed: see $OUT/eval_$1_$3.log" >&2; exit 1; }
}
for split in valid test; do
  eval_ppl transformer_xl "$txl" $split
  eval_ppl knn_lm "$txl" $split --neighbours "$neighbours" $(cat "$OUT/best_knn_lm.flags")
  eval_ppl spalm "$spalm" $split --neighbours "$neighbours"
  eval_ppl spalm_knn "$spalm" $split --neighbours "$neighbours" $(cat "$OUT/best_spalm_knn.flags")
  eval_ppl spalm_scaled "$scaled" $split --neighbours "$neighbours"
  eval_ppl spalm_scaled_knn "$scaled" $split --neighbours "$neighbours" $(cat "$OUT/best_spalm_scaled_knn.flags")
done

# 7. where SPALM relies on its long-term memory: the gate g on valid (1 = local context only)
gates() {  # name checkpoint
  [ -s "$OUT/gates_valid$1.md" ] || python -m trime_fairseq.cli.spalm_gates "$DATA" --user-dir trime_fairseq \
    --task trime_lm --path "$2" --gen-subset valid --neighbours "$neighbours" "${EVAL[@]}" --no-progress-bar \
    --histogram "$OUT/gates_valid$1.png" > "$OUT/gates_valid$1.md" 2> "$OUT/gates_valid$1.err"
}
gates "" "$spalm"
gates _scaled "$scaled"

ppl() { cat "$OUT/ppl_$1_$2"; }
{
  echo "WikiText-2, $UPDATES updates x 512 tokens (8 streams x 64), 4 x 128 Transformer-XL; neighbours: k = $K from"
  echo "the training split's datastore of a vanilla LM ($VANILLA_UPDATES updates; index $INDEX, nprobe $NPROBE);"
  echo "evaluation in stream order, memory 64"
  echo
  echo "| model | evaluation | valid ppl | test ppl |"
  echo "|---|---|---|---|"
  echo "| Transformer-XL | — | $(ppl transformer_xl valid) | $(ppl transformer_xl test) |"
  echo "| kNN-LM (Transformer-XL + p_kNN) | \`$(cat "$OUT/best_knn_lm.flags")\` | $(ppl knn_lm valid) | $(ppl knn_lm test) |"
  echo "| SPALM | — | $(ppl spalm valid) | $(ppl spalm test) |"
  echo "| SPALM + kNN | \`$(cat "$OUT/best_spalm_knn.flags")\` | $(ppl spalm_knn valid) | $(ppl spalm_knn test) |"
  echo "| SPALM, values × √d | — | $(ppl spalm_scaled valid) | $(ppl spalm_scaled test) |"
  echo "| SPALM, values × √d + kNN | \`$(cat "$OUT/best_spalm_scaled_knn.flags")\` | $(ppl spalm_scaled_knn valid) |" \
    "$(ppl spalm_scaled_knn test) |"
  echo
  cat "$OUT/gates_valid.md"
  echo
  echo "SPALM, values × √d:"
  cat "$OUT/gates_valid_scaled.md"
} | tee "$OUT/results.md"
