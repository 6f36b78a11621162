#!/usr/bin/env bash
# Mixture of experts on one GPU (~8 min): a random checkpoint shaped like Qwen3-30B-A3B with LAYERS of its 48
# layers (default 24, ~30 GB; all 48 take 61 GB), the fused-MoE tile tuning for its expert shape, W1 and W3, and
# benchmarks/moe.py (batch-1 decode roofline, the layer alone). vLLM on the same checkpoint:
# ../shared/tools/vllm-anchor/run.sh --model-dir $MODEL --workloads W1,W3 (carried with MOE=1).
# Device tool: carry a folder of the pydantic wheels (WHEELS, default .whl), then:
#   STRATA_COMMIT=<commit> OUT=$OUT bash benchmarks/gpu_moe.sh
# LAYERS=48 MODEL=/dev/shm/qwen3-30b-a3b-48l: the whole model, kept in memory where the disk (64 GB) cannot hold
# it; WORKLOADS="W1 W2 W3". TUNE_GEMV=1: the non-expert projections' batch-1 gemv tiles first (quant_tuning.py).
set -euo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "${WHEELS:-.whl}"/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 STRATA_CACHE_DIR=/tmp/strata-cache
OUT=${OUT:-benchmarks/results}
LAYERS=${LAYERS:-24}
MODEL=${MODEL:-/root/qwen3-30b-a3b-${LAYERS}l}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
[ -f "$MODEL/config.json" ] || python3 benchmarks/make_random_model.py --shape qwen3-30b-a3b --layers "$LAYERS" \
  --out "$MODEL" 2>&1 | tail -1
if [ -n "${TUNE_GEMV:-}" ]; then  # the attention projections' and LM head's batch-1 gemv tiles (gpu_gemma.sh's TUNE)
  python3 benchmarks/quant_tuning.py --dtypes bf16 --rows 1 --gemv-seconds "${TUNE_GEMV_SECONDS:-10}" --model "$MODEL" \
    --out-dir "$OUT" 2>&1 | grep -v "^  "
  mkdir -p "$OUT/configs" && cp engine/kernels/configs/*dtype=bf16.json "$OUT/configs/"
fi
python3 benchmarks/moe_tuning.py --seconds-per-count "${TUNE_SECONDS:-12}" --out-dir "$OUT"
cp engine/kernels/configs/*.json "$OUT/" 2>/dev/null || true
python3 benchmarks/throughput.py --model "$MODEL" --workloads ${WORKLOADS:-W1 W3} --hf-baseline 0 --out-dir "$OUT"
python3 benchmarks/moe.py --model "$MODEL" --out-dir "$OUT"
