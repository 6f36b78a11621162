#!/usr/bin/env bash
# Batch-1 decode with and without programmatic dependent launch (kernels/_triton.pdl_args), one Hopper GPU (device
# kind nvidia-h100-x1): W1 and a batch-1 decode step at 512 tokens of context (throughput.py --decode-roofline) for
# each checkpoint, with STRATA_PDL=0, with it on, and with it on plus STRATA_PDL_PREFETCH bytes of each weight row
# asked into L2 ahead. Writes pdl-ab-<gpu>-<commit>.json under $OUT.
# Device tool: carry the pydantic wheels (WHEELS, default .whl), then: STRATA_COMMIT=<commit> bash benchmarks/gpu_pdl.sh
#   env: VARIANTS=bf16,fp8,w4a16 (checkpoints as benchmarks/gpu_quant.sh makes them under $ROOT; moe48: a random
#        Qwen3-30B-A3B, 48 layers, under /dev/shm)  SETTINGS="0:0 default:0 all:0 all:4096" (STRATA_PDL:
#        STRATA_PDL_PREFETCH bytes; STRATA_PDL 0: none, default: unset (kernels/_triton.PDL_FAMILIES), all: every
#        family, else a comma list of families)
#        TESTS=1: first the GPU tests that run with it on (needs pytest; TESTS=pdl: test_pdl.py only)  BUDGET_S=540
set -uo pipefail
export PYTHONUNBUFFERED=1 STRATA_CACHE_DIR=/tmp/strata-cache
OUT=${OUT:-benchmarks/results}
ROOT=${ROOT:-/root}
VARIANTS=${VARIANTS:-bf16,fp8,w4a16}
SETTINGS=${SETTINGS:-0:0 default:0 all:0 all:4096}
BUDGET_S=${BUDGET_S:-540}
RESULTS=$ROOT/pdl-results
mkdir -p "$OUT" "$RESULTS"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || echo "no nvidia-smi"
if [ "${WHEELS:-}" != none ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "${WHEELS:-.whl}"/*.whl || exit 2
fi
export PYTHONPATH=/tmp/site:$PWD
if [ -n "${TESTS:-}" ]; then
  more=(); [ "$TESTS" = 1 ] && more=(tests/engine/test_triton_gpu.py tests/engine/kernels/test_model_triton.py)
  TRITON_INTERPRET=0 timeout 400 python3 -m pytest -q -p no:cacheprovider tests/engine/kernels/test_pdl.py \
    "${more[@]}" 2>&1 | tail -8
fi
declare -A CKPT=([bf16]=$ROOT/llama3-8b-random [fp8]=$ROOT/llama3-8b-fp8 [w4a16]=$ROOT/llama3-8b-w4a16
                 [moe48]=/dev/shm/q48)
declare -A FORMAT=([fp8]=fp8-dynamic [w4a16]=w4a16)
left() { echo $((BUDGET_S - SECONDS)); }
for v in ${VARIANTS//,/ }; do
  ckpt=${CKPT[$v]}
  if [ ! -f "$ckpt/config.json" ]; then
    t=$SECONDS
    if [ "$v" = moe48 ]; then
      python3 -m benchmarks.make_random_model --shape qwen3-30b-a3b --layers 48 --out "$ckpt" 2>&1 | tail -1
    elif [ "$v" = bf16 ]; then
      python3 -m benchmarks.make_random_model --shape llama3-8b --out "$ckpt" 2>&1 | tail -1
    else
      python3 -m benchmarks.quantize_checkpoint "${CKPT[bf16]}" "$ckpt" --format "${FORMAT[$v]}" 2>&1 | tail -1
    fi
    echo "made $ckpt in $((SECONDS - t)) s"
  fi
  for s in $SETTINGS; do
    dir=$RESULTS/$v-pdl${s%%:*}-prefetch${s##*:}
    [ -f "$dir/done" ] && continue
    [ "$(left)" -lt 40 ] && { echo "SKIPPED $v $s: $(left) s left, run again"; continue; }
    t=$SECONDS; rm -rf "$dir"
    pdl=${s%%:*}; pdl=${pdl/#all/gemv,int4,mm,moe,small}
    if [ "$pdl" = default ]; then unset STRATA_PDL; else export STRATA_PDL=$pdl; fi
    if STRATA_PDL_PREFETCH=${s##*:} timeout -k 10 "$(left)" python3 -m benchmarks.throughput \
         --model "$ckpt" --workloads W1 --hf-baseline 0 --max-num-seqs 1 --decode-roofline --decode-batch 1 \
         --decode-context 512 --out-dir "$dir" 2>"$OUT/stderr-pdl-$v.log" | grep -E "tok/s|per step"; then
      touch "$dir/done"; echo "$v PDL ${s%%:*} prefetch ${s##*:}: done in $((SECONDS - t)) s"
    else
      echo "$v $s failed after $((SECONDS - t)) s:"; tail -8 "$OUT/stderr-pdl-$v.log"
    fi
  done
done
python3 - "$RESULTS" "$OUT" <<'EOF'
"""Every variant and setting run so far: W1 output tok/s and the batch-1 decode step against its bytes."""
import json, sys
from pathlib import Path
from benchmarks.report import write_result

results, out = Path(sys.argv[1]), Path(sys.argv[2])
rows, device = {}, None
for done in sorted(results.glob("*/done")):
    record = json.loads(max(done.parent.glob("throughput-*.json")).read_text())
    device = record["device"]
    step = record["figures"].get("decode_b1_ctx512", {})
    rows[done.parent.name] = {"commit": record["commit"], "W1_tok_s": round(record["figures"]["W1"]["output_tok_s"], 1),
                              "step_ms": round(step.get("ms_per_step", 0), 3),
                              "roofline_ms": round(step.get("roofline_ms", 0), 3),
                              "fraction_of_roofline": round(step.get("fraction_of_roofline", 0), 3)}
for name, r in rows.items():
    print(f"{name:28s} W1 {r['W1_tok_s']:7.1f} tok/s  step {r['step_ms']:.3f} ms  roofline {r['roofline_ms']:.3f} ms"
          f"  ({r['fraction_of_roofline']:.0%})")
print("wrote", write_result("pdl-ab", {"device": device, "results_dir": str(results)}, {"runs": rows}, out))
EOF
