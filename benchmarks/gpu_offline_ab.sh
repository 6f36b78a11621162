#!/usr/bin/env bash
# Offline W1 and W3 at a base commit and at this tree, back to back on one GPU, alternating (base, this, base,
# this) so drift falls on both; each run reports the median of W1_REPEATS W1 runs (~4 min in all).
# Device tool: carry [".whl", ".base"] (.base: see gpu_stack_gap.sh), then:
#   BASE_COMMIT=8f9f418 STRATA_COMMIT=<this commit> OUT=$OUT bash benchmarks/gpu_offline_ab.sh
set -euo pipefail
. .whl/device-install.sh >/dev/null
export PYTHONUNBUFFERED=1 STRATA_CACHE_DIR=/tmp/strata-cache
OUT=${OUT:-benchmarks/results}
MODEL=/root/llama3-8b-random
ROUNDS=${ROUNDS:-2}
nvidia-smi --query-gpu=name --format=csv,noheader
[ -f "$MODEL/config.json" ] || python3 benchmarks/make_random_model.py --shape llama3-8b --out "$MODEL" 2>&1 | tail -1
for round in $(seq "$ROUNDS"); do
  (cd .base && STRATA_COMMIT=$BASE_COMMIT python3 benchmarks/stack_gap.py --model "$MODEL" --stages offline \
     --w1-repeats "${W1_REPEATS:-5}" --out-dir "$OUT" --label "ab-base-$BASE_COMMIT-r$round" 2>>"$OUT/stderr-ab.log")
  python3 benchmarks/stack_gap.py --model "$MODEL" --stages offline --w1-repeats "${W1_REPEATS:-5}" \
    --out-dir "$OUT" --label "ab-r$round" 2>>"$OUT/stderr-ab.log"
done
