#!/usr/bin/env bash
# Quantized models on one GPU (issue 23; device kind nvidia-h100-x1): the Llama-3-8B-shaped random bf16 checkpoint,
# quantized by benchmarks/quantize_checkpoint.py (round-to-nearest), through benchmarks/throughput.py. Variants:
#   bf16   /root/llama3-8b-random                 fp8kv  the same, with an FP8 KV cache
#   fp8    /root/llama3-8b-fp8 (compressed-tensors FP8 W8A8: per-channel weight scales, per-token activations)
#   w4a16  /root/llama3-8b-w4a16 (compressed-tensors INT4 W4A16, symmetric, group 128)
#   awq    /root/llama3-8b-awq (AutoAWQ GEMM INT4, zero points, group 128)
# Checkpoints and figures stay under /root, which the machine keeps between calls while it is warm: a variant whose
# figures are there is not run again (FORCE=1 reruns it), and one that does not fit in what is left of BUDGET_S
# is left for the next call, so a second call goes on where the first stopped. Every call ends with the summary
# (quant-summary-*.json under $OUT: the issue's ratios), which also reads vLLM's figures from
# /root/quant-results/vllm-<variant>.jsonl (written by .anchor/vllm_bench.py --out).
# Device tool: carry the pydantic wheels (WHEELS, default .whl: pydantic, pydantic_core, annotated_types,
# typing_extensions, typing_inspection; Ray is not needed), then: STRATA_COMMIT=<commit> bash benchmarks/gpu_quant.sh
#   env: VARIANTS=bf16,fp8,w4a16,fp8kv,awq (in this order)  WORKLOADS=W1,W3 (W2 where time allows)
#        BUDGET_S=540  FORCE=1
#        VARIANTS=none: only the summary
#        PROFILE=1: each variant also times decode steps at batch 1 and 256 (512 tokens of context) against the
#          bytes they move, with a profile of where the GPU time goes (throughput.py --decode-roofline --profile)
#        PYSPY=path/to/py-spy: each run under py-spy (100 samples a second, raw collapsed stacks under $OUT:
#          py-spy-<variant>.txt), the host-side profile of a run at full speed
#        TESTS=1: first the quantized kernels' and models' GPU tests (needs pytest among the wheels)
#        TUNE="fp8_w8a8 int4_w4a16" TUNE_ROWS="1 4 16 256 4096" (TUNE_SECONDS=3 a case, TUNE_GEMV_SECONDS=15 for
#          one row): first benchmarks/quant_tuning.py, whose tile
#          files land in engine/kernels/configs/ (for the runs that follow) and under $OUT (to commit)
set -uo pipefail
export PYTHONUNBUFFERED=1 STRATA_CACHE_DIR=/tmp/strata-cache
OUT=${OUT:-benchmarks/results}
ROOT=${ROOT:-/root}  # ROOT=/tmp/q SHAPE=tiny LIMIT=16 WHEELS=none: a CPU smoke run of this script
SHAPE=${SHAPE:-llama3-8b}
RESULTS=$ROOT/quant-results
BF16=$ROOT/$SHAPE-random
VARIANTS=${VARIANTS:-bf16,fp8,w4a16,fp8kv,awq}
WORKLOADS=${WORKLOADS:-W1,W3}
BUDGET_S=${BUDGET_S:-540}
mkdir -p "$OUT" "$RESULTS"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || echo "no nvidia-smi"
[ "$VARIANTS" = none ] && VARIANTS=
if [ -n "$VARIANTS" ] && [ "${WHEELS:-}" != none ]; then
  ls "${WHEELS:-.whl}"/pydantic-*.whl >/dev/null || { echo "no pydantic wheels in ${WHEELS:-.whl}"; exit 2; }
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "${WHEELS:-.whl}"/*.whl || exit 2
fi
export PYTHONPATH=/tmp/site:$PWD
if [ -n "${TESTS:-}" ]; then
  TRITON_INTERPRET=0 timeout 300 python3 -m pytest -q -p no:cacheprovider tests/engine/kernels/test_gemv_quantized.py \
    tests/engine/kernels/test_fused_fp8_quant.py tests/engine/kernels/test_fp8.py tests/engine/kernels/test_int4.py \
    tests/engine/kernels/test_model_triton.py -k "fp8 or w4a16 or awq or quant or int4" 2>&1 | tail -8
fi
if [ -n "${TUNE:-}" ]; then  # shellcheck disable=SC2086  # TUNE and TUNE_ROWS split into words on purpose
  timeout -k 10 "$((BUDGET_S - SECONDS))" python3 benchmarks/quant_tuning.py --dtypes $TUNE \
    --rows ${TUNE_ROWS:-1 4 16 256 4096} --seconds-per-case "${TUNE_SECONDS:-3}" \
    --gemv-seconds "${TUNE_GEMV_SECONDS:-15}" --out-dir "$OUT" 2>&1 | grep -v "^  "
  mkdir -p "$OUT/configs" && cp engine/kernels/configs/N=*dtype=*.json "$OUT/configs/" 2>/dev/null
fi

# Seconds each piece takes on one H100, estimated from benchmarks/results/throughput-h100-llama3-8b-c9b15ca.json
# (bf16: W1 1.5 s, W3 19.2 s, W2 17.7 s, engine start 6-15 s) plus a process start, loading 16 GB, CUDA graphs and
# warm-up (~45 s); quantized variants are taken as no slower. Building 16 GB of random weights and quantizing them
# shard by shard on the GPU are mostly disk writes.
declare -A EST=([build]=120 [quantize]=60 [engine]=45 [W1]=3 [W2]=20 [W3]=22)
declare -A CKPT=([bf16]=$BF16 [fp8kv]=$BF16 [fp8]=$ROOT/$SHAPE-fp8 [w4a16]=$ROOT/$SHAPE-w4a16
                 [awq]=$ROOT/$SHAPE-awq)
declare -A FORMAT=([fp8]=fp8-dynamic [w4a16]=w4a16 [awq]=awq)
declare -A FLAGS=([fp8kv]="--kv-cache-dtype fp8")
left() { echo $((BUDGET_S - SECONDS)); }
fits() {  # fits SECONDS WHAT: is there time left for it?
  if [ "$1" -gt "$(left)" ]; then echo "SKIPPED $2 (about $1 s, $(left) s left): run this script again"; return 1; fi
}
have_model() { [ -f "$1/config.json" ] && [ -f "$1/tokenizer.json" ]; }

wl_est=0; for w in ${WORKLOADS//,/ }; do wl_est=$((wl_est + ${EST[$w]})); done
plan=0; have_model $BF16 || plan=${EST[build]}
for v in ${VARIANTS//,/ }; do
  [ -n "${CKPT[$v]:-}" ] || { echo "unknown variant $v: bf16, fp8, w4a16, awq, fp8kv"; exit 2; }
  [ -n "${FORMAT[$v]:-}" ] && ! have_model "${CKPT[$v]}" && plan=$((plan + ${EST[quantize]}))
  plan=$((plan + ${EST[engine]} + wl_est))
done
echo "estimates (s): build ${EST[build]}, quantize ${EST[quantize]} a format, engine ${EST[engine]} a variant" \
  "(process, load, CUDA graphs, warm-up), W1 ${EST[W1]}, W3 ${EST[W3]}, W2 ${EST[W2]}"
echo "plan: variants [$VARIANTS] on [$WORKLOADS], about $plan s of work ($wl_est s of workloads each), budget $BUDGET_S s"

if [ -n "$VARIANTS" ] && ! have_model $BF16 && fits ${EST[build]} "building $BF16"; then
  t=$SECONDS; python3 -m benchmarks.make_random_model --shape "$SHAPE" --out $BF16 2>&1 | tail -1
  echo "built $BF16 in $((SECONDS - t)) s"
fi
for v in ${VARIANTS//,/ }; do
  dir=$RESULTS/$v-${WORKLOADS//,/}
  if [ -f "$dir/done" ] && [ -z "${FORCE:-}" ]; then echo "$v on $WORKLOADS: done in an earlier call"; continue; fi
  have_model $BF16 || { echo "SKIPPED $v: no $BF16"; continue; }
  ckpt=${CKPT[$v]}
  if [ -n "${FORMAT[$v]:-}" ] && ! have_model "$ckpt"; then
    fits ${EST[quantize]} "quantizing $ckpt" || continue
    t=$SECONDS
    timeout -k 10 "$(left)" python3 -m benchmarks.quantize_checkpoint $BF16 "$ckpt" --format "${FORMAT[$v]}" \
      2>"$OUT/stderr-quantize-$v.log" | grep -E "^\[(1|10|20|30)/|shards in" \
      || { echo "quantizing $ckpt failed:"; tail -5 "$OUT/stderr-quantize-$v.log"; continue; }
    echo "quantized $ckpt in $((SECONDS - t)) s ($(du -sh "$ckpt" | cut -f1))"
  fi
  fits $((${EST[engine]} + wl_est)) "$v on $WORKLOADS" || continue
  t=$SECONDS; rm -rf "$dir"
  # shellcheck disable=SC2086  # FLAGS and WORKLOADS split into words on purpose
  spy=(); [ -n "${PYSPY:-}" ] && spy=("$PYSPY" record --format raw --rate 100 --nonblocking -o "$OUT/py-spy-$v.txt" --)
  if timeout -k 10 "$(left)" "${spy[@]}" python3 -m benchmarks.throughput --model "$ckpt" --workloads ${WORKLOADS//,/ } \
       --hf-baseline 0 --out-dir "$dir" ${LIMIT:+--limit $LIMIT} ${FLAGS[$v]:-} \
       ${PROFILE:+--decode-roofline --profile --decode-batch 1 256 --decode-context 512} 2>"$OUT/stderr-$v.log"; then
    touch "$dir/done"; echo "$v: done in $((SECONDS - t)) s"
  else
    echo "$v failed or ran out of time after $((SECONDS - t)) s:"; tail -15 "$OUT/stderr-$v.log"
  fi
done

for done in "$RESULTS"/*/done; do  # every variant's figures so far, this call's and earlier ones'
  [ -f "$done" ] && d=$(dirname "$done") && cp "$d"/throughput-*.json "$OUT/quant-$(basename "$d").json"
done
cp "$RESULTS"/vllm-*.jsonl "$OUT"/ 2>/dev/null
python3 - "$RESULTS" "$OUT" <<'EOF'
"""The issue's targets from every variant's figures so far (this call's and earlier ones') and vLLM's."""
import json, sys
from pathlib import Path
from benchmarks.report import write_result

results, out = Path(sys.argv[1]), Path(sys.argv[2])
variants, devices = {}, {}
for done in sorted(results.glob("*/done")):
    record = json.loads(max(done.parent.glob("throughput-*.json")).read_text())
    name = done.parent.name.split("-")[0]
    v = variants.setdefault(name, {"kv_blocks": record["settings"]["kv_blocks"], "commits": {}})
    devices[name] = record["device"]
    figures = {w: f["output_tok_s"] for w, f in record["figures"].items() if w in ("W1", "W2", "W3")}
    v.update(figures)
    v["commits"].update({w: record["commit"] for w in figures})  # a workload may come from a later call
for f in sorted(results.glob("vllm-*.jsonl")):  # .anchor/vllm_bench.py --out /root/quant-results/vllm-fp8.jsonl
    lines = [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
    v = variants.setdefault(f.stem, {})  # vllm-fp8
    v.update({d["workload"]: d["output_tok_s"] for d in lines if d.get("workload", "").startswith("W")})
    devices[f.stem] = next((d["gpu"] for d in lines if "gpu" in d), "?")


def ratio(a, wa, b, wb):
    x, y = variants.get(a, {}).get(wa), variants.get(b, {}).get(wb)
    return round(x / y, 3) if x and y else None


targets = {  # name: (ratio, the issue's target)
    "fp8 W1 / bf16 W1": (ratio("fp8", "W1", "bf16", "W1"), 1.6),
    "fp8 W3 / bf16 W3": (ratio("fp8", "W3", "bf16", "W3"), 1.3),
    "fp8 W3 / vLLM fp8 W3": (ratio("fp8", "W3", "vllm-fp8", "W3"), 1.0),
    "w4a16 W1 / bf16 W1": (ratio("w4a16", "W1", "bf16", "W1"), 2.2),
    "awq W1 / bf16 W1": (ratio("awq", "W1", "bf16", "W1"), 2.2),
    "fp8kv KV blocks / bf16 KV blocks": (ratio("fp8kv", "kv_blocks", "bf16", "kv_blocks"), 1.9),  # "about 2x"
    "fp8kv W3 / bf16 W3": (ratio("fp8kv", "W3", "bf16", "W3"), 1.0),
}
summary = {k: {"ratio": r, "target": t, "met": None if r is None else r >= t} for k, (r, t) in targets.items()}
for name, v in variants.items():
    print(f"{name:10s} " + "  ".join(f"{k} {v[k]:.1f}" if isinstance(v[k], float) else f"{k} {v[k]}" for k in v))
for k, s in summary.items():
    print(f"{k:34s} {s['ratio']}  (target >= {s['target']}: {'-' if s['met'] is None else s['met']})")
if len(set(devices.values())) > 1:
    print("WARNING: the figures come from different devices:", devices)
path = write_result("quant-summary", {"devices": devices, "results_dir": str(results)},
                    {"variants": variants, "targets": summary}, out)
print("wrote", path)
EOF
