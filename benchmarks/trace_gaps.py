"""Where a rank's decode steps leave the GPU idle, from a torch.profiler Chrome trace (`LLM.start_profile`).

Each CUDA-graph replay (cudaGraphLaunch) is one step: its kernels, found by correlation id, give the step's GPU
span. For each step: did the host launch it before the previous step's kernels ended (the GPU had it queued), and
if not, how late; and the host operations that ran between the two launches, by total time.

    python benchmarks/trace_gaps.py traces-tp2/*.json [--top 15]
"""
from __future__ import annotations

import argparse
import collections
import gzip
import json
import statistics
import sys
from pathlib import Path


def load(path: Path) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        data = json.load(f)
    return data["traceEvents"] if isinstance(data, dict) else data


def summarize(events: list[dict], top: int) -> dict:
    spans = [e for e in events if e.get("ph") == "X"]
    launches = sorted((e for e in spans if e.get("cat") == "cuda_runtime" and e["name"] == "cudaGraphLaunch"),
                      key=lambda e: e["ts"])
    by_corr = collections.defaultdict(list)
    for e in spans:
        if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset"):
            by_corr[e.get("args", {}).get("correlation")].append(e)
    steps = []
    for launch in launches:
        kernels = by_corr.get(launch.get("args", {}).get("correlation"), [])
        if kernels:
            steps.append({"launch": launch["ts"], "launch_end": launch["ts"] + launch["dur"],
                          "start": min(k["ts"] for k in kernels), "end": max(k["ts"] + k["dur"] for k in kernels),
                          "tid": launch["tid"]})
    if len(steps) < 3:
        return {"graph_steps": len(steps)}
    idle, late, period = [], [], []
    for prev, cur in zip(steps, steps[1:]):
        idle.append(cur["start"] - prev["end"])
        late.append(cur["launch"] - prev["end"])  # > 0: the GPU had finished before the host launched this step
        period.append(cur["start"] - prev["start"])
    # Host work on the launching thread between consecutive launches, by operation name.
    tid = steps[0]["tid"]
    host = sorted((e for e in spans if e.get("tid") == tid and e.get("cat") in ("cpu_op", "python_function",
                                                                               "user_annotation", "cuda_runtime")),
                  key=lambda e: e["ts"])
    first, last = steps[1]["launch"], steps[-1]["launch"]
    totals = collections.Counter()
    for e in host:
        if first <= e["ts"] < last:
            totals[f'{e.get("cat")}: {e["name"][:80]}'] += e["dur"]
    n = len(steps) - 2
    return {
        "graph_steps": len(steps),
        "step_period_us_median": statistics.median(period),
        "gpu_span_us_median": statistics.median(s["end"] - s["start"] for s in steps),
        "gpu_idle_between_steps_us_median": statistics.median(idle),
        "gpu_idle_between_steps_us_mean": statistics.fmean(idle),
        "launched_after_previous_ended": sum(x > 0 for x in late) / len(late),
        "lateness_us_median_when_late": statistics.median([x for x in late if x > 0] or [0]),
        "host_us_per_step_on_launching_thread": {k: round(v / n, 1) for k, v in totals.most_common(top)},
    }


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("traces", nargs="+", type=Path)
    ap.add_argument("--top", type=int, default=15)
    args = ap.parse_args()
    for path in args.traces:
        print(path.name, json.dumps(summarize(load(path), args.top), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
