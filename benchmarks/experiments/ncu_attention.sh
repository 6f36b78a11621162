#!/usr/bin/env bash
# Nsight Compute on the causal prefill attention kernel (one prompt of 4,096 tokens, Llama-8B heads, as
# benchmarks/kernel_bench.py times it): where the time goes below the 350 TFLOP/s target. Needs a Firecracker machine
# (nvidia-h100-x1; gVisor hides the counters). Device tool: carry [".whl"], then: bash benchmarks/experiments/ncu_attention.sh
# Writes $OUT/ncu-prefill-attention.txt (default benchmarks/results).
set -euo pipefail
. .whl/device-install.sh > /dev/null
export PYTHONPATH=$PYTHONPATH:$PWD
OUT=${OUT:-benchmarks/results}
sections=""
for s in SpeedOfLight ComputeWorkloadAnalysis MemoryWorkloadAnalysis Occupancy WarpStateStats SchedulerStats \
  LaunchStats; do sections="$sections --section $s"; done
ncu --clock-control none -k regex:_attention_kernel -s 5 -c 1 $sections \
  python3 -c "from benchmarks.kernel_bench import prefill_attention; print(prefill_attention())" \
  > "$OUT/ncu-prefill-attention.txt" 2>&1
grep -E "Duration|Compute \(SM\) Throughput|Memory Throughput|Registers Per Thread|Achieved Occupancy|Theoretical Occupancy|Warp Cycles Per Issued|Issue Slots Busy|No Eligible|Block Limit|Shared Memory Configuration Size|L1/TEX Hit|L2 Hit" "$OUT/ncu-prefill-attention.txt" | head -30
