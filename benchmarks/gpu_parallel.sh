#!/usr/bin/env bash
# Two-GPU runs (device kind nvidia-h200-x2) of the Llama-3-8B-shaped random bf16 model, each a stage:
#   smoke     tests/engine/test_parallel_gpu.py: NCCL TP=2 / PP=2 on tiny models == one GPU
#   tp1       offline engine, one GPU: W1 (batch-1 decode) and W3
#   tp2, pp2  offline engine, tensor / pipeline parallel over both GPUs: W1 and W3
#   replicas  two independent TP=1 engines, one per GPU, sharing W3 (benchmarks/replicas.py)
#   serving   W3 over HTTP through the whole Ray Serve stack vs the in-process AsyncEngine, one GPU
#             (benchmarks/serving_overhead.py at a fixed concurrency)
#   w1        W1 alone at TP=1 then TP=2 (the batch-1 decode ratio), with TRACE=1 torch.profiler traces of every
#             rank under $OUT/traces-tp<N>
#   decode_profile  benchmarks/experiments/tp_decode_profile.py: one batch-1 step as a CUDA graph per rank, TP=1 and TP=2,
#             kernel by kernel (VARIANTS: its --variants)
# Issue 26 (mixture of experts and FP8 on two GPUs), the Qwen3-30B-A3B-shaped random bf16 model (61 GB, built in
# /dev/shm: MOE_MODEL) and a Llama-3-70B-shaped FP8 W8A8 one (70 GB, written quantized: FP8_MODEL):
#   moe_tp2, moe_ep2  offline engine, TP=2 / EP=2: W1 and W3
#   moe_replicas      two independent TP=1 engines sharing W3
#   moe_layouts       TP=2, EP=2 and two TP=1 replicas through the whole Ray Serve stack: W1, W3 and W3 at a
#                     Poisson RATE (TTFT/TPOT p50/p99; benchmarks/two_gpu_layouts.py)
#   fp8_70b           offline engine, TP=2: W1 and W3, and batch-1 decode against the weights roofline
# Device tool: carry [".whl"] (../shared/tools/device-bundle.sh: Ray, Serve, pydantic), then
#   STAGES="smoke tp1 tp2" bash benchmarks/gpu_parallel.sh        # default: smoke tp1 tp2 pp2 replicas serving
# Each stage's full log goes to $OUT/<stage>$TAG.log; JSON results to $OUT (default benchmarks/results).
# EXTRA_ARGS go to the offline throughput stages (tp1, tp2, pp2), e.g. EXTRA_ARGS="--max-num-seqs 512" TAG=-512.
set -uo pipefail
. .whl/device-install.sh || exit 1
export PYTHONPATH=$PYTHONPATH:$PWD PYTHONUNBUFFERED=1 STRATA_CACHE_DIR=/tmp/strata-cache RAY_DEDUP_LOGS=0
OUT=${OUT:-benchmarks/results}
MODEL=${MODEL:-/tmp/llama3-8b-random}
CONCURRENCY=${CONCURRENCY:-256}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
[ -f "$MODEL/config.json" ] || python3 benchmarks/make_random_model.py --shape llama3-8b --out "$MODEL"

stage() {  # stage NAME CMD...: run when NAME is in $STAGES, bounded by STAGE_TIMEOUT seconds
  local name=$1; shift
  [[ " ${STAGES:-smoke tp1 tp2 pp2 replicas serving} " == *" $name "* ]] || return 0
  echo "== $name: $*"
  local t0=$SECONDS
  local log="$OUT/$name${TAG:-}.log"
  timeout "${STAGE_TIMEOUT:-400}" "$@" > "$log" 2>&1
  local rc=$?
  grep -E "^(engine ready|W[123]:|[0-9]+ replicas|concurrency|cluster rate|in-process rate|wrote|PASSED|FAILED|ERROR|=+ .* in )" \
    "$log" | tail -n 20
  [ $rc -eq 0 ] || { echo "-- $name failed (rc $rc); log tail:"; tail -n 25 "$log"; }
  echo "-- $name: $((SECONDS - t0)) s"
  ray stop --force > /dev/null 2>&1
}

stage smoke python3 -m pytest -q -rA -p no:cacheprovider tests/engine/test_parallel_gpu.py
stage tp1 python3 benchmarks/throughput.py --model "$MODEL" --workloads W1 W3 --hf-baseline 0 --out-dir "$OUT" ${EXTRA_ARGS:-}
stage tp2 python3 benchmarks/throughput.py --model "$MODEL" --workloads W1 W3 --hf-baseline 0 --out-dir "$OUT" --tp 2 ${EXTRA_ARGS:-}
stage pp2 python3 benchmarks/throughput.py --model "$MODEL" --workloads W1 W3 --hf-baseline 0 --out-dir "$OUT" --pp 2 ${EXTRA_ARGS:-}
stage replicas python3 benchmarks/replicas.py --model "$MODEL" --replicas 2 --workload W3 --out-dir "$OUT"
for tp in 1 2; do
  TAG=${TAG:-}-tp$tp stage w1 python3 benchmarks/throughput.py --model "$MODEL" --workloads W1 --hf-baseline 0 \
    --out-dir "$OUT" --tp $tp ${TRACE:+--torch-profile "$OUT/traces-tp$tp"}
done
stage decode_profile python3 benchmarks/experiments/tp_decode_profile.py --model "$MODEL" --tp 1 2 --out-dir "$OUT" \
  ${VARIANTS:+--variants $VARIANTS}
MOE_MODEL=${MOE_MODEL:-/dev/shm/qwen3-30b-a3b}
FP8_MODEL=${FP8_MODEL:-/root/llama3-70b-fp8}
moe_model() { [ -f "$MOE_MODEL/config.json" ] || python3 benchmarks/make_random_model.py --shape qwen3-30b-a3b \
  --out "$MOE_MODEL" > /dev/null 2>&1; }
[[ " ${STAGES:-} " == *" moe_"* ]] && moe_model
stage moe_tp2 python3 benchmarks/throughput.py --model "$MOE_MODEL" --workloads W1 W3 --hf-baseline 0 --out-dir "$OUT" --tp 2
stage moe_ep2 python3 benchmarks/throughput.py --model "$MOE_MODEL" --workloads W1 W3 --hf-baseline 0 --out-dir "$OUT" --tp 2 --ep
stage moe_replicas python3 benchmarks/replicas.py --model "$MOE_MODEL" --replicas 2 --workload W3 --out-dir "$OUT"
stage moe_layouts python3 benchmarks/two_gpu_layouts.py --model "$MOE_MODEL" --layouts tp2 ep2 replicas2 \
  --request-rate "${RATE:-8}" --out-dir "$OUT"
if [[ " ${STAGES:-} " == *" fp8_70b "* ]] && [ ! -f "$FP8_MODEL/config.json" ]; then
  python3 benchmarks/make_random_model.py --shape llama3-70b --format fp8-dynamic --out "$FP8_MODEL" > /dev/null 2>&1
fi
stage fp8_70b python3 benchmarks/throughput.py --model "$FP8_MODEL" --workloads W1 W3 --hf-baseline 0 --out-dir "$OUT" \
  --tp 2 --decode-roofline --decode-batch 1
stage serving python3 benchmarks/serving_overhead.py --model "$MODEL" --device cuda --dataset W3 --num-prompts 0 \
  --max-concurrency "$CONCURRENCY" --max-num-seqs 256 --warmup 8 --out-dir "$OUT"
exit 0
