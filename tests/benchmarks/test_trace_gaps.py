"""trace_gaps.py reads graph steps, idle time and host work out of a Chrome trace laid out as torch.profiler's."""
import json

from benchmarks.trace_gaps import load, summarize


def step_events(i: int, launch: float, start: float, end: float) -> list[dict]:
    return [{"ph": "X", "cat": "cuda_runtime", "name": "cudaGraphLaunch", "ts": launch, "dur": 10, "tid": 1,
             "args": {"correlation": i}},
            {"ph": "X", "cat": "kernel", "name": "gemv", "ts": start, "dur": (end - start) / 2, "tid": 7,
             "args": {"correlation": i}},
            {"ph": "X", "cat": "kernel", "name": "attention", "ts": (start + end) / 2, "dur": (end - start) / 2,
             "tid": 7, "args": {"correlation": i}},
            {"ph": "X", "cat": "cpu_op", "name": "aten::copy_", "ts": launch - 50, "dur": 30, "tid": 1}]


def test_steps_queued_ahead_and_one_launched_late(tmp_path):
    # Steps of 1000 us on the GPU, 100 us apart; the host launches each 500 us before the previous one ends,
    # except step 3, launched 200 us after step 2 ended (so the GPU idled 200 + 100 us before it).
    events, t = [], 0.0
    for i in range(6):
        late = i == 3
        launch = t + 200 if late else t - 500
        start = launch + 100 if late else t + 100
        events += step_events(i, launch, start, start + 1000)
        t = start + 1000
    path = tmp_path / "trace.json"
    path.write_text(json.dumps({"traceEvents": events}))
    out = summarize(load(path), top=5)
    assert out["graph_steps"] == 6
    assert out["gpu_span_us_median"] == 1000
    assert out["launched_after_previous_ended"] == 1 / 5
    assert out["lateness_us_median_when_late"] == 200
    assert out["gpu_idle_between_steps_us_median"] == 100 and out["gpu_idle_between_steps_us_mean"] == 140
    assert out["host_us_per_step_on_launching_thread"]["cpu_op: aten::copy_"] == 30
