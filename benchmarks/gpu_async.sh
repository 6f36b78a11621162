#!/usr/bin/env bash
# Async scheduling on one GPU (device kind nvidia-h100-x1): the Llama-3-8B-shaped random bf16 model on W1, W3 and
# W2 with the default engine (async scheduling on), then W1 with it off, each with the decode roofline at batch 64
# and 1k context and a torch.profiler breakdown of 8 of those decode steps.
# Device tool: carry [".whl"], then: bash benchmarks/gpu_async.sh  (JSON to $OUT, default benchmarks/results)
set -euo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 STRATA_CACHE_DIR=/tmp/strata-cache
OUT=${OUT:-benchmarks/results}
MODEL=/tmp/llama3-8b-random
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
[ -f "$MODEL/config.json" ] || python3 benchmarks/make_random_model.py --shape llama3-8b --out "$MODEL" 2>&1 | tail -1
python3 benchmarks/throughput.py --model "$MODEL" --workloads W1 W3 W2 --hf-baseline 0 --decode-roofline --profile \
  --out-dir "$OUT"
python3 benchmarks/throughput.py --model "$MODEL" --workloads W1 --hf-baseline 0 --decode-roofline --profile \
  --async-scheduling off --out-dir "$OUT"
