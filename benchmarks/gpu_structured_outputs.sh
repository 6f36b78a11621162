#!/usr/bin/env bash
# Structured outputs on one GPU (~4 min): a Llama-3-8B-shaped random checkpoint with a real tokenizer (TOKENIZER,
# default .bench-tokenizer: SmolLM2's tokenizer.json and tokenizer_config.json), then structured_outputs.py.
# Device tool: carry [".whl", ".bench-tokenizer"], then: STRATA_COMMIT=<commit> OUT=$OUT bash benchmarks/gpu_structured_outputs.sh
set -euo pipefail
. .whl/device-install.sh >/dev/null
export PYTHONUNBUFFERED=1 STRATA_CACHE_DIR=/tmp/strata-cache
OUT=${OUT:-benchmarks/results}
MODEL=/root/llama3-8b-realtok
nvidia-smi --query-gpu=name --format=csv,noheader
[ -f "$MODEL/config.json" ] || python3 benchmarks/make_random_model.py --shape llama3-8b \
  --tokenizer "${TOKENIZER:-.bench-tokenizer}" --out "$MODEL" 2>&1 | tail -1
python3 benchmarks/structured_outputs.py --model "$MODEL" --batch "${BATCH:-64}" --out-dir "$OUT" 2>"$OUT/stderr-so.log"
