#!/usr/bin/env bash
# The checks that need a CUDA GPU, in one short run (about 5 minutes on one H100/H200-class GPU):
#   1. fp16 training steps of adaptive_loss / trime_loss / trime_long_loss / trime_ext_loss with fairseq's
#      Trainer (--fp16) on the paper's 150M setting (240 x 150 tokens per update, one TRIMELM_long run of
#      36,000 positions): no NaN/inf, step-time ratios to the plain criterion;
#   2. LaMemo vs Transformer-XL step time (benchmarks/bench_lamemo_vs_txl.py, WT103 base, tgt = mem = 150);
#   3. faiss-gpu: IVF4096,PQ64 datastore build of 1M synthetic d = 1024 keys + search vs nprobe;
#   4. --knn-gpu: GPU search = CPU search on a flat datastore, kNN-LM log-probs equal;
#   5. fast retrieval: OPQ / PCA-compressed datastores searched with CUDA queries (transforms in torch) vs the
#      CPU search, and kNN-LM with the retrieval-skip predictor under --knn-gpu = the CPU run;
#   6. translation modes knn / adaptive_knn / sk_mt: beam search on the GPU (--knn-gpu) = the CPU's (tiny corpus).
# On a machine without a CUDA GPU (or without faiss-gpu) the GPU parts are skipped with a message and
# part 1 runs 2 fp32 CPU steps per criterion at a tiny size (checks the script). Results: $OUT
# (default runs/gpu_check): results.json, results.md, lamemo_vs_txl.md, gpu_check.log.
#
#   benchmarks/gpu_check.sh            # then copy results.md into docs/ with the date and the GPU model
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu_check}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
START=$(date +%s)

python - <<'PY' | tee "$OUT/environment.txt"
import torch, faiss
gpu = torch.cuda.is_available()
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, GPU: {torch.cuda.get_device_name(0) if gpu else 'none'}")
print(f"faiss {faiss.__version__}, faiss GPUs: {faiss.get_num_gpus() if hasattr(faiss, 'get_num_gpus') else 0}")
PY

status=0
python benchmarks/gpu_check.py --out "$OUT" 2>&1 | tee "$OUT/gpu_check.log" || status=$?

if python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  python benchmarks/bench_lamemo_vs_txl.py --device cuda --size wt103_base --tgt 150 --mem 150 --batch 16 \
      --vocab 267735 --steps 5 --runs 3 2>&1 | tee "$OUT/lamemo_vs_txl.md" || status=$?
else
  echo "SKIPPED: LaMemo vs Transformer-XL step time on a GPU (no CUDA GPU; CPU figures in docs/results_models.md)" \
      | tee "$OUT/lamemo_vs_txl.md"
fi

echo "gpu_check: $(( $(date +%s) - START )) s, exit status $status, results in $OUT"
exit $status
