#!/usr/bin/env bash
# SPALM on WikiText-2 (docs/results_spalm.md): the whole pipeline on CPU, resumable (finished steps are skipped).
#   1. vanilla LM, the separate key encoder              (fairseq-hydra-train, configs/trime + adaptive_loss)
#   2. datastore of the training split, key = its final hidden state f, inner product
#                                                         (trime-build-datastore --key-type trime_feature)
#   3. k = 4 neighbours of every train / valid / test token (trime-neighbours; train: own document excluded)
#   4. Transformer-XL and SPALM, the same architecture and budget (configs/transformer_xl, configs/spalm);
#      SPALM in the VARIANTS asked for: spalm (neighbour embeddings as the paper writes them, y_k = the
#      embedding row), spalm_scaled (scaled by √d like the model's own input embeddings,
#      model.spalm_scale_values=true), spalm_detached (no gradient through y_k, model.spalm_detach_values=true)
#   5. kNN-LM (Transformer-XL + p_kNN over the same neighbours) and SPALM + kNN: T x λ tuned on valid
#      (trime-tune --eval-memory neighbour_knn)
#   6. fairseq-eval-lm of every model in stream order (the training memory of 64), valid and test
#   7. SPALM's gate on valid: mean and histogram (python -m trime_fairseq.cli.spalm_gates)
# Table in $OUT/results.md (with the neighbour encoder's top-1 / any-of-k hit rates); figures in
# $OUT/gates_valid_<variant>.png.
#
#   UPDATES=1500 scripts/wikitext2_spalm.sh
#
# Environment: UPDATES (1500: Transformer-XL and SPALM), VANILLA_UPDATES (1500), VANILLA (a trained key encoder's
# checkpoint instead of training one, e.g. a longer run's checkpoint_*_3000.pt: a neighbour-encoder quality point),
# VARIANTS ("spalm spalm_scaled spalm_detached"), OUT (runs/wikitext2-spalm-$UPDATES), DATA (data-bin/wikitext-2),
# RAW (as in wikitext2_compare.sh), K (4), INDEX (FAISS factory, IVF1024,PQ32), NPROBE (16), NTRAIN (200000).
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
VARIANTS=${VARIANTS:-spalm spalm_scaled spalm_detached}
for v in $VARIANTS; do
  case $v in spalm|spalm_scaled|spalm_detached) ;; *) echo "unknown SPALM variant '$v' (spalm spalm_scaled spalm_detached)" >&2; exit 2;; esac
done
if [ -n "${VANILLA:-}" ] && [ ! -f "$VANILLA" ]; then echo "VANILLA=$VANILLA: no such checkpoint" >&2; exit 2; fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
mkdir -p "$OUT"
source scripts/lib.sh

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

# 1. the key encoder (or the one given)
if [ -n "${VANILLA:-}" ]; then
  vanilla="$VANILLA"
else
  hydra_train vanilla configs/trime "$VANILLA_UPDATES" criterion._name=adaptive_loss
  vanilla="$OUT/vanilla/checkpoint_last.pt"
fi

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
overrides() {  # variant -> its hydra overrides
  case $1 in
    spalm) ;;
    spalm_scaled) echo model.spalm_scale_values=true ;;
    spalm_detached) echo model.spalm_detach_values=true ;;
  esac
}
hydra_train transformer_xl configs/transformer_xl "$UPDATES"
txl="$OUT/transformer_xl/checkpoint_last.pt"
for v in $VARIANTS; do
  hydra_train "$v" configs/spalm "$UPDATES" task.neighbours="$neighbours" $(overrides "$v")
done

EVAL=(--batching stream --tokens-per-sample 64 --batch-size 8 --cpu)

# 5. the interpolation with p_kNN over the same k neighbours, tuned on valid
best_flags() {  # name checkpoint -> best flags
  [ -s "$OUT/best_$1.flags" ] || python -m trime_fairseq.cli.tune "$DATA" --user-dir trime_fairseq --task trime_lm \
    --path "$2" --gen-subset valid --neighbours "$neighbours" "${EVAL[@]}" --no-progress-bar \
    --eval-memory neighbour_knn --knn-temperatures 0.5,1,2,5,10 --knn-lambdas 0.05,0.1,0.2,0.3,0.4 \
    --results-json "$OUT/tune_$1.json" 2> "$OUT/tune_$1.err" | tee "$OUT/tune_$1.txt" \
    | best_flags_of > "$OUT/best_$1.flags"
  [ -s "$OUT/best_$1.flags" ] || { echo "tuning $1 failed: see $OUT/tune_$1.err" >&2; exit 1; }
}
best_flags knn_lm "$txl"
for v in $VARIANTS; do best_flags "${v}_knn" "$OUT/$v/checkpoint_last.pt"; done

# 6. evaluation in stream order, memory 64 as in training
eval_ppl() {  # name checkpoint split args...
  [ -s "$OUT/ppl_$1_$3" ] || fairseq-eval-lm "$DATA" --user-dir trime_fairseq --task trime_lm --path "$2" \
    --gen-subset "$3" "${EVAL[@]}" "${@:4}" 2>&1 | tee "$OUT/eval_$1_$3.log" \
    | perplexity > "$OUT/ppl_$1_$3"
  [ -s "$OUT/ppl_$1_$3" ] || { echo "evaluation $1 $3 failed: see $OUT/eval_$1_$3.log" >&2; exit 1; }
}
for split in valid test; do
  eval_ppl transformer_xl "$txl" $split
  eval_ppl knn_lm "$txl" $split --neighbours "$neighbours" $(cat "$OUT/best_knn_lm.flags")
  for v in $VARIANTS; do
    eval_ppl "$v" "$OUT/$v/checkpoint_last.pt" $split --neighbours "$neighbours"
    eval_ppl "${v}_knn" "$OUT/$v/checkpoint_last.pt" $split --neighbours "$neighbours" $(cat "$OUT/best_${v}_knn.flags")
  done
done

# 7. where SPALM relies on its long-term memory: the gate g on valid (1 = local context only)
for v in $VARIANTS; do
  [ -s "$OUT/gates_valid_$v.md" ] || python -m trime_fairseq.cli.spalm_gates "$DATA" --user-dir trime_fairseq \
    --task trime_lm --path "$OUT/$v/checkpoint_last.pt" --gen-subset valid --neighbours "$neighbours" "${EVAL[@]}" \
    --no-progress-bar --histogram "$OUT/gates_valid_$v.png" > "$OUT/gates_valid_$v.md" 2> "$OUT/gates_valid_$v.err"
done

ppl() { cat "$OUT/ppl_$1_$2"; }
hits() {  # split -> the neighbour encoder's hit rates, from the split's neighbours.json
  python -c "import json, sys; q = json.load(open(sys.argv[1]))['neighbour_quality']
print(f\"{q['top1_hit_rate']} / {q['any_hit_rate']}\")" "$neighbours/$1/neighbours.json"
}
label() {
  case $1 in
    spalm) echo "SPALM" ;;
    spalm_scaled) echo "SPALM, values × √d" ;;
    spalm_detached) echo "SPALM, values detached" ;;
  esac
}
{
  echo "WikiText-2, $UPDATES updates x 512 tokens (8 streams x 64), 4 x 128 Transformer-XL; neighbours: k = $K from"
  echo "the training split's datastore of a vanilla LM ($vanilla; index $INDEX, nprobe $NPROBE);"
  echo "evaluation in stream order, memory 64. The target is the top-1 neighbour's token / among the $K:"
  echo "train $(hits train), valid $(hits valid), test $(hits test)"
  echo
  echo "| model | evaluation | valid ppl | test ppl |"
  echo "|---|---|---|---|"
  echo "| Transformer-XL | — | $(ppl transformer_xl valid) | $(ppl transformer_xl test) |"
  echo "| kNN-LM (Transformer-XL + p_kNN) | \`$(cat "$OUT/best_knn_lm.flags")\` | $(ppl knn_lm valid) | $(ppl knn_lm test) |"
  for v in $VARIANTS; do
    echo "| $(label "$v") | — | $(ppl "$v" valid) | $(ppl "$v" test) |"
    echo "| $(label "$v") + kNN | \`$(cat "$OUT/best_${v}_knn.flags")\` | $(ppl "${v}_knn" valid) | $(ppl "${v}_knn" test) |"
  done
  for v in $VARIANTS; do
    echo
    echo "$(label "$v"):"
    cat "$OUT/gates_valid_$v.md"
  done
} | tee "$OUT/results.md"
