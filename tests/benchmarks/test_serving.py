"""The serving benchmark's datasets, load generator and summary, driven against an in-process engine."""
import asyncio
import math

from benchmarks.serving import InProcessBackend, make_dataset, run_load, summarize


def test_prefix_dataset_shares_each_groups_system_prompt():
    reqs = make_dataset("prefix", 40, 8, 4, 500, prefix_len=32, num_groups=4)
    heads = {tuple(r.prompt[:32]) for r in reqs}
    assert len(reqs) == 40 and len(heads) == 4 and all(len(r.prompt) == 40 and r.output_len == 4 for r in reqs)


def test_shared_workloads_are_sent_as_they_are():
    from benchmarks.workloads import WORKLOADS

    w3 = make_dataset("W3", 0, 0, 0, 10000)
    prompts, outs = WORKLOADS["W3"]()
    assert [r.prompt for r in w3] == prompts and [r.output_len for r in w3] == outs


def test_load_and_summary_against_the_engine():
    from engine import AsyncEngine

    engine = AsyncEngine(model="demo")
    try:
        reqs = make_dataset("random", 12, 16, 6, 500)

        async def go():
            async with InProcessBackend(engine) as backend:
                return await run_load(backend, reqs, request_rate=200.0, max_concurrency=4)

        results, seconds = asyncio.run(go())
    finally:
        engine.shutdown()
    figures = summarize(results, seconds, {"ttft": 60_000, "e2e": 60_000})
    assert figures["completed"] == 12 and figures["failed"] == 0
    assert figures["output_tokens"] == 12 * 6 and figures["input_tokens"] == 12 * 16
    assert all(r.ttft > 0 and r.e2e >= r.ttft and len(r.itls) <= 5 for r in results)
    assert 0 < figures["ttft_ms"]["p50"] <= figures["ttft_ms"]["p99"]
    assert math.isclose(figures["goodput"], figures["request_throughput"])
    assert summarize(results, seconds, {"ttft": 0.0})["goodput"] == 0
