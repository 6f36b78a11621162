#!/usr/bin/env bash
# Gemma 2 on one GPU (~4 min): a random checkpoint shaped like Gemma-2-9B (sliding-window and global layers
# alternating, attention and final logit soft-capping), W1 and W3. vLLM on the same checkpoint:
# ../shared/tools/vllm-anchor/run.sh --model-dir $MODEL --workloads W1,W3.
# Device tool: carry a folder of the pydantic wheels (WHEELS, default .whl), then:
#   STRATA_COMMIT=<commit> OUT=$OUT bash benchmarks/gpu_gemma.sh
# WORKLOADS="W1" (default "W1 W3"). PROFILE=1: also decode steps at batch 1 and 256 (512 tokens of context)
# against the bytes they move, with a profile of where the GPU time goes. TUNE=1: first the 16-bit batch-1 gemv
# tiles for the checkpoint's shapes on this GPU (benchmarks/quant_tuning.py --dtypes bf16; TUNE_GEMV_SECONDS a
# shape, TUNE_SHAPES="qkv gate_up" for some of them), used by the runs that follow and copied to $OUT/configs.
set -euo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "${WHEELS:-.whl}"/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 STRATA_CACHE_DIR=/tmp/strata-cache
OUT=${OUT:-benchmarks/results}
MODEL=${MODEL:-/root/gemma2-9b}
[ -f "$MODEL/config.json" ] || python3 benchmarks/make_random_model.py --shape gemma2-9b --out "$MODEL" 2>&1 | tail -1
if [ -n "${TUNE:-}" ]; then
  # shellcheck disable=SC2086  # TUNE_SHAPES (default: all of the model's) splits into words on purpose
  python3 benchmarks/quant_tuning.py --dtypes bf16 --rows 1 --gemv-seconds "${TUNE_GEMV_SECONDS:-12}" --model "$MODEL" \
    ${TUNE_SHAPES:+--shapes $TUNE_SHAPES} --out-dir "$OUT" 2>&1 | grep -v "^  "
  mkdir -p "$OUT/configs" && cp engine/kernels/configs/*dtype=bf16.json "$OUT/configs/"
fi
python3 benchmarks/throughput.py --model "$MODEL" --workloads ${WORKLOADS:-W1 W3} --hf-baseline 0 --out-dir "$OUT" \
  ${PROFILE:+--decode-roofline --profile --decode-batch 1 256 --decode-context 512}
