#!/usr/bin/env bash
# The request path's targets on one GPU (device kind nvidia-h100-x1 or nvidia-h200), in one call (~9 min):
# W3 offline at a base commit (BASE_DIR, a `git archive` of it, for "offline not lower than before"), then this
# tree's stack_gap.py stages. Ray travels as wheels (../shared/tools/device-bundle.sh writes .whl).
# Device tool: carry [".whl", ".base"], then: BASE_COMMIT=8f9f418 STRATA_COMMIT=<this commit> bash benchmarks/gpu_stack_gap.sh
#   here first: rm -rf .base && mkdir .base && git archive $BASE_COMMIT | tar -x -C .base && \
#               cp benchmarks/stack_gap.py .base/benchmarks/   (.base/ in .git/info/exclude)
set -euo pipefail
. .whl/device-install.sh >/dev/null
export PYTHONUNBUFFERED=1 STRATA_CACHE_DIR=/tmp/strata-cache
OUT=${OUT:-benchmarks/results}
MODEL=/root/llama3-8b-random
STAGES=${STAGES:-offline,in_process,cluster,cluster+proxy,cluster+process}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
[ -f "$MODEL/config.json" ] || python3 benchmarks/make_random_model.py --shape llama3-8b --out "$MODEL" 2>&1 | tail -1
if [ -n "${BASE_COMMIT:-}" ] && [ -d "${BASE_DIR:-.base}" ]; then
  (cd "${BASE_DIR:-.base}" && STRATA_COMMIT=$BASE_COMMIT python3 benchmarks/stack_gap.py --model "$MODEL" \
     --stages offline --out-dir "$OUT" --label "base-$BASE_COMMIT" 2>"$OUT/stderr-base.log")
fi
python3 benchmarks/stack_gap.py --model "$MODEL" --ttft-prompts 16 --stages "$STAGES" --out-dir "$OUT" \
  2>"$OUT/stderr.log"
