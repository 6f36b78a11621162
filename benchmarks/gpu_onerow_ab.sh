#!/usr/bin/env bash
# Batch-1 (one-row) FP8 and INT4 kernels of this checkout against another's, one GPU (device kind
# nvidia-h100-x1): first each kernel alone (benchmarks/quant_tuning.py --rows 1: the other checkout's current
# tiles timed, then this checkout's tile sweep, whose files land in engine/kernels/configs/ for the runs after
# it), then W1 and a batch-1 decode step at 512 tokens of context (throughput.py --decode-roofline) for each
# checkpoint, this checkout and the other back to back. Writes onerow-ab-<gpu>-<commit>.json under $OUT.
# Device tool: carry the pydantic wheels (WHEELS, default .whl) and the other checkout's engine/ and benchmarks/
# (OLD, default .ab-old), then: STRATA_COMMIT=<commit> OLD_COMMIT=<its commit> bash benchmarks/gpu_onerow_ab.sh
#   env: VARIANTS=bf16,fp8,w4a16 (bf16 first: the others are quantized from it)  TUNE_GEMV_SECONDS=12
#        TUNE_DTYPES="fp8_w8a8 int4_w4a16" (the formats whose one-row tiles are timed and swept)
#        OLD_TUNE=0: the other checkout keeps its committed tiles (its current ones are not timed alone)
#        TESTS="pytest paths": run last, in what is left of BUDGET_S (default 570)
set -uo pipefail
export PYTHONUNBUFFERED=1 STRATA_CACHE_DIR=/tmp/strata-cache
OUT=${OUT:-benchmarks/results}
ROOT=${ROOT:-/root}
OLD=${OLD:-.ab-old}
VARIANTS=${VARIANTS:-bf16,fp8,w4a16}
BUDGET_S=${BUDGET_S:-570}
TUNE_DTYPES=${TUNE_DTYPES:-fp8_w8a8 int4_w4a16}
RESULTS=$ROOT/onerow-results
mkdir -p "$OUT" "$RESULTS"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || echo "no nvidia-smi"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "${WHEELS:-.whl}"/*.whl || exit 2
HERE=$PWD
left() { echo $((BUDGET_S - SECONDS)); }

if [ ! -f "$RESULTS/tuned" ]; then
  [ "${OLD_TUNE:-1}" = 0 ] || (cd "$OLD" && PYTHONPATH=/tmp/site:$PWD STRATA_COMMIT=${OLD_COMMIT:-old} timeout -k 10 120 python3 \
     benchmarks/quant_tuning.py --dtypes $TUNE_DTYPES --rows 1 --gemv-seconds 0.5 --out-dir "$RESULTS/old" \
     2>&1 | grep -v "^  ")
  PYTHONPATH=/tmp/site:$HERE timeout -k 10 "$(left)" python3 benchmarks/quant_tuning.py --dtypes $TUNE_DTYPES \
    --rows 1 --gemv-seconds "${TUNE_GEMV_SECONDS:-12}" --out-dir "$RESULTS/new" 2>&1 | grep -v "^  "
  mkdir -p "$OUT/configs" && cp engine/kernels/configs/N=*dtype=*.json "$OUT/configs/" 2>/dev/null
  touch "$RESULTS/tuned"
fi

declare -A CKPT=([bf16]=$ROOT/llama3-8b-random [fp8]=$ROOT/llama3-8b-fp8 [w4a16]=$ROOT/llama3-8b-w4a16)
declare -A FORMAT=([fp8]=fp8-dynamic [w4a16]=w4a16)
export PYTHONPATH=/tmp/site:$HERE
for v in ${VARIANTS//,/ }; do
  ckpt=${CKPT[$v]}
  if [ ! -f "$ckpt/config.json" ]; then
    t=$SECONDS
    if [ "$v" = bf16 ]; then
      python3 -m benchmarks.make_random_model --shape llama3-8b --out "$ckpt" 2>&1 | tail -1
    else
      python3 -m benchmarks.quantize_checkpoint "${CKPT[bf16]}" "$ckpt" --format "${FORMAT[$v]}" 2>&1 | tail -1
    fi
    echo "made $ckpt in $((SECONDS - t)) s"
  fi
  trees=(new); [ "$v" != bf16 ] && trees=(new old)
  for tree in "${trees[@]}"; do
    dir=$RESULTS/$v-$tree
    [ -f "$dir/done" ] && continue
    [ "$(left)" -lt 40 ] && { echo "SKIPPED $v $tree: $(left) s left, run again"; continue; }
    t=$SECONDS; rm -rf "$dir"
    src=$HERE; commit=${STRATA_COMMIT:-new}; [ "$tree" = old ] && src=$HERE/$OLD && commit=${OLD_COMMIT:-old}
    if (cd "$src" && PYTHONPATH=/tmp/site:$src STRATA_COMMIT=$commit timeout -k 10 "$(left)" python3 -m benchmarks.throughput \
          --model "$ckpt" --workloads W1 --hf-baseline 0 --max-num-seqs 1 --decode-roofline --decode-batch 1 \
          --decode-context 512 --out-dir "$dir" 2>"$OUT/stderr-onerow-$v-$tree.log" | grep -E "tok/s|per step"); then
      touch "$dir/done"; echo "$v $tree: done in $((SECONDS - t)) s"
    else
      echo "$v $tree failed after $((SECONDS - t)) s:"; tail -8 "$OUT/stderr-onerow-$v-$tree.log"
    fi
  done
done

if [ -n "${TESTS:-}" ]; then  # shellcheck disable=SC2086  # TESTS splits into paths on purpose
  TRITON_INTERPRET=0 timeout -k 10 "$(left)" python3 -m pytest -q -p no:cacheprovider $TESTS 2>&1 | tail -12
fi
python3 - "$RESULTS" "$OUT" <<'EOF'
"""Each kernel alone (old tiles, new sweep's best) and W1 / the batch-1 step of each variant and tree."""
import json, sys
from pathlib import Path
from benchmarks.report import write_result

results, out = Path(sys.argv[1]), Path(sys.argv[2])
kernels = {}
for tree in ("old", "new"):
    for f in sorted((results / tree).glob("quant-tuning-*.json")):
        kernels[tree] = json.loads(f.read_text())["figures"]
w1, device = {}, "?"
for done in sorted(results.glob("*/done")):
    record = json.loads(max(done.parent.glob("throughput-*.json")).read_text())
    device = record["device"]
    fig = record["figures"]
    w1[done.parent.name] = {"W1_output_tok_s": fig["W1"]["output_tok_s"], "commit": record["commit"],
                            "decode_b1_ctx512": fig.get("decode_b1_ctx512")}
for name, v in sorted(w1.items()):
    print(f"{name:14s} W1 {v['W1_output_tok_s']:.1f} tok/s  ({v['commit']})")
path = write_result("onerow-ab", {"device": device, "old": "the other checkout (OLD)", "new": "this checkout"},
                    {"kernels_alone": kernels, "w1": w1}, out)
print("wrote", path)
EOF
