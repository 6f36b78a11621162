#!/usr/bin/env bash
# Serve overhead on CPU with the default model's shape, on a machine with cores to spare (the device machines: 16),
# so that Ray's and Serve's own processes do not take CPU from the engine's two threads as they do on a 2-core
# machine. A random-weight SmolLM2-135M-shaped checkpoint (the hub is out of reach there; compute is the same).
# Device tool: carry [".whl"], then: bash benchmarks/cpu_serving_overhead.sh   (JSON to $OUT; EXTRA: more flags)
# RUNS: the serving_overhead.py modes, in order ("standard" = ingress + engine replica; "colocated" =
# --engine-in-ingress; "paired" = colocated, cluster and in-process engine alive together, each prompt to both in
# turn, PAIRS prompts; "paired-standard" = the same with the engine in its own replica); all with --direct-ingress.
set -uo pipefail
. .whl/device-install.sh || exit 1
export PYTHONPATH=$PYTHONPATH:$PWD PYTHONUNBUFFERED=1 STRATA_CACHE_DIR=/tmp/strata-cache RAY_DEDUP_LOGS=0
export CUDA_VISIBLE_DEVICES=""
OUT=${OUT:-benchmarks/results}
MODEL=/tmp/smollm2-135m-random
mkdir -p "$OUT"
nproc
[ -f "$MODEL/config.json" ] || python3 benchmarks/make_random_model.py --shape smollm2-135m --out "$MODEL" 2>&1 | tail -1
for run in ${RUNS:-standard colocated standard colocated}; do
  flags="--num-prompts 16 --max-concurrency 1 4"
  [ "$run" = colocated ] && flags="$flags --engine-in-ingress"
  [ "$run" = paired ] && flags="--num-prompts ${PAIRS:-48} --engine-in-ingress --paired"
  [ "$run" = paired-standard ] && flags="--num-prompts ${PAIRS:-48} --paired"
  echo "== $run"
  timeout 400 python3 benchmarks/serving_overhead.py --model "$MODEL" --device cpu --threads 2 --direct-ingress \
    $flags ${EXTRA:-} --out-dir "$OUT" > "$OUT/$run.log" 2>&1
  grep -E "^(cluster rate|in-process rate|concurrency|paired|wrote)" "$OUT/$run.log" || tail -n 20 "$OUT/$run.log"
  ray stop --force > /dev/null 2>&1
done
