#!/usr/bin/env bash
# Several checkouts' batch-1 kernels side by side in one lease (device kind nvidia-h100-x1): for each tree, its
# one-row tiles swept (benchmarks/quant_tuning.py --rows 1, written into that tree's configs) and then W1 and a
# batch-1 decode step at 512 tokens of context on one quantized checkpoint with those tiles; bf16 once, from this
# checkout, as the yardstick. Writes tree-ab-<gpu>-<commit>.json under $OUT.
# Device tool: carry the pydantic wheels (WHEELS, default .whl) and each other tree's engine/ and benchmarks/
# (`git archive <commit> engine benchmarks`), then:
#   TREES=".ab-old:ace3a7e .v1:b630735 .:$(git rev-parse --short HEAD)" bash benchmarks/gpu_tree_ab.sh
#   env: DTYPE=int4_w4a16 (or fp8_w8a8)  TUNE_GEMV_SECONDS=16
set -uo pipefail
export PYTHONUNBUFFERED=1 STRATA_CACHE_DIR=/tmp/strata-cache
OUT=${OUT:-benchmarks/results}
ROOT=${ROOT:-/root}
DTYPE=${DTYPE:-int4_w4a16}
declare -A FORMAT=([int4_w4a16]=w4a16 [fp8_w8a8]=fp8-dynamic)
RESULTS=$ROOT/tree-ab
mkdir -p "$OUT" "$RESULTS"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "${WHEELS:-.whl}"/*.whl || exit 2
HERE=$PWD
for tree in $TREES; do
  (cd "${tree%%:*}" && PYTHONPATH=/tmp/site:$PWD STRATA_COMMIT=${tree##*:} timeout 110 python3 benchmarks/quant_tuning.py \
     --dtypes "$DTYPE" --rows 1 --gemv-seconds "${TUNE_GEMV_SECONDS:-16}" --out-dir "$RESULTS/tune-${tree##*:}" 2>&1 | grep "m=1")
done
export PYTHONPATH=/tmp/site:$HERE
[ -f "$ROOT/bf16/config.json" ] || python3 -m benchmarks.make_random_model --shape llama3-8b --out "$ROOT/bf16" 2>&1 | tail -1
quantized=$ROOT/${FORMAT[$DTYPE]}
[ -f "$quantized/config.json" ] || python3 -m benchmarks.quantize_checkpoint "$ROOT/bf16" "$quantized" \
  --format "${FORMAT[$DTYPE]}" 2>&1 | tail -1
w1() {  # tree commit model name
  (cd "$1" && PYTHONPATH=/tmp/site:$PWD STRATA_COMMIT=$2 timeout 60 python3 -m benchmarks.throughput --model "$3" \
     --workloads W1 --hf-baseline 0 --max-num-seqs 1 --decode-roofline --decode-batch 1 --decode-context 512 \
     --out-dir "$RESULTS/w1-$4" 2>/dev/null | grep -E "tok/s|per step")
}
for tree in $TREES; do w1 "${tree%%:*}" "${tree##*:}" "$quantized" "${tree##*:}"; done
w1 . "${TREES##*:}" "$ROOT/bf16" bf16
first=${TREES%% *}
w1 "${first%%:*}" "${first##*:}" "$quantized" "${first##*:}-again"
python3 - "$RESULTS" "$OUT" "$DTYPE" <<'PY'
"""Each tree's kernels alone (its sweep's best) and W1 / the batch-1 step."""
import json, sys
from pathlib import Path
from benchmarks.report import write_result

results, out, dtype = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
kernels, w1, device = {}, {}, "?"
for f in sorted(results.glob("tune-*/quant-tuning-*.json")):
    record = json.loads(f.read_text())
    kernels[f.parent.name[5:]] = {name: {"best": v["per_row_count"]["1"]["best"],
                                         "us": round(v["per_row_count"]["1"]["best_ms"] * 1000, 1),
                                         "tb_per_s": round(v["per_row_count"]["1"]["best_tb_per_s"], 2)}
                                  for name, v in record["figures"].items()}
for f in sorted(results.glob("w1-*/throughput-*.json")):
    record = json.loads(f.read_text())
    device = record["device"]
    step = record["figures"].get("decode_b1_ctx512", {})
    w1[f.parent.name[3:]] = {"commit": record["commit"], "W1_tok_s": round(record["figures"]["W1"]["output_tok_s"], 1),
                             "step_ms": round(step.get("ms_per_step", 0), 3)}
for name, v in w1.items():
    print(f"{name:24s} W1 {v['W1_tok_s']:7.1f} tok/s  step {v['step_ms']:.3f} ms")
print("wrote", write_result("tree-ab", {"device": device, "dtype": dtype}, {"kernels_alone": kernels, "w1": w1}, out))
PY
