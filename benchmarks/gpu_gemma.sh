#!/usr/bin/env bash
# Gemma 2 on one GPU (~4 min): a random checkpoint shaped like Gemma-2-9B (sliding-window and global layers
# alternating, attention and final logit soft-capping), W1 and W3. vLLM on the same checkpoint:
# ../shared/tools/vllm-anchor/run.sh --model-dir $MODEL --workloads W1,W3.
# Device tool: carry a folder of the pydantic wheels (WHEELS, default .whl), then:
#   STRATA_COMMIT=<commit> OUT=$OUT bash benchmarks/gpu_gemma.sh
# PROFILE=1: also decode steps at batch 1 and 256 (512 tokens of context) against the bytes they move, with a
# profile of where the GPU time goes.
set -euo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "${WHEELS:-.whl}"/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 STRATA_CACHE_DIR=/tmp/strata-cache
OUT=${OUT:-benchmarks/results}
MODEL=${MODEL:-/root/gemma2-9b}
[ -f "$MODEL/config.json" ] || python3 benchmarks/make_random_model.py --shape gemma2-9b --out "$MODEL" 2>&1 | tail -1
python3 benchmarks/throughput.py --model "$MODEL" --workloads W1 W3 --hf-baseline 0 --out-dir "$OUT" \
  ${PROFILE:+--decode-roofline --profile --decode-batch 1 256 --decode-context 512}
