#!/usr/bin/env bash
# GPU throughput run: the Llama-3-8B-shaped random bf16 model on W1/W3/W2 (ATTENTION=torch|triton|auto), plus
# transformers on the first HF_PROMPTS prompts of each workload (HF_PROMPTS=0 skips it).
# Device tool: carry [".whl"] (pydantic wheels for Python 3.12), then: bash benchmarks/gpu_throughput.sh
set -euo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 STRATA_CACHE_DIR=/tmp/strata-cache
OUT=${OUT:-benchmarks/results}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 benchmarks/make_random_model.py --shape llama3-8b --out /tmp/llama3-8b-random
python3 benchmarks/throughput.py --model /tmp/llama3-8b-random --attention-backend "${ATTENTION:-auto}" \
  --hf-baseline "${HF_PROMPTS:-16}" --hf-batch-size 16 --out-dir "$OUT" --workloads ${WORKLOADS:-W1 W3 W2} "$@"
