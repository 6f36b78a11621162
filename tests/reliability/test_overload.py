"""Overload: a burst far above capacity is shed quickly with 429s while what was accepted completes; a KV cache
too small for the load completes everything through preemption and recomputation.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import random
import re
import time

import httpx
import pytest

from cluster.config import ClusterConfig, ModelConfig, engine_deployment_name
from reliability_testing import deploy, engine_stats, processes, wait_for

CAPACITY = dict(max_ongoing_requests=2, max_queue_size=2)  # 2 running, 2 waiting: 4 requests
KV_BLOCKS = 40  # 640 tokens of KV for 12 requests of 400 tokens each
CONFIG = ClusterConfig(app_name="overload", models=[
    ModelConfig(model="demo", name="demo-burst", num_kv_blocks=256, max_num_seqs=2, **CAPACITY),
    ModelConfig(model="demo", name="demo-small-kv", num_kv_blocks=KV_BLOCKS, max_num_seqs=16),
])


@pytest.fixture(scope="module")
def base_url(serve_url):
    yield from deploy(serve_url, CONFIG)


async def burst(base_url: str, n: int) -> list[tuple[int, float, dict, dict]]:
    """n concurrent requests: (status, seconds, headers, body) each."""
    body = {"model": "demo-burst", "prompt": "The capital of France is", "max_tokens": 48, "ignore_eos": True}

    async def one(client):
        t0 = time.monotonic()
        r = await client.post(f"{base_url}/v1/completions", json=body)
        return r.status_code, time.monotonic() - t0, dict(r.headers), r.json()

    limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        return await asyncio.gather(*(one(client) for _ in range(n)))


def serve_rss() -> dict[str, int]:
    """Resident memory of Serve's processes: proxy, controller, ingress and engine replicas ("pid name": bytes)."""
    out = {}
    for title in ("ServeReplica:", "ProxyActor", "ServeController"):
        for p in processes(title):
            name = re.search(r"(ServeReplica:[\w-]+:[\w-]+|ProxyActor|ServeController)", " ".join(p.cmdline()))
            out[f"{p.pid} {name.group(1) if name else title}"] = p.memory_info().rss
    return out


def test_burst_of_ten_times_capacity(base_url):
    capacity = CAPACITY["max_ongoing_requests"] + CAPACITY["max_queue_size"]
    asyncio.run(burst(base_url, 2 * capacity))  # warm-up: imports, connection pools, allocator arenas
    before = serve_rss()
    results = []
    for _ in range(3):
        results += asyncio.run(burst(base_url, 10 * capacity))
    after = serve_rss()

    accepted = [r for r in results if r[0] == 200]
    rejected = [r for r in results if r[0] == 429]
    assert len(accepted) + len(rejected) == len(results), sorted({r[0] for r in results})
    assert len(accepted) >= capacity and len(rejected) >= len(results) // 2
    assert all(r[3]["usage"]["completion_tokens"] == 48 for r in accepted)
    for status, seconds, headers, body in rejected:
        assert int(headers["retry-after"]) >= 1
        assert body["error"]["type"] == "rate_limit_error" and body["error"]["code"] == "queue_full"
    latencies = sorted(r[1] for r in rejected)
    slowest_accepted = max(r[1] for r in accepted)
    growth = {k.split(" ", 1)[1]: round((after.get(k, 0) - v) / 2 ** 20, 1) for k, v in before.items()}
    print(f"\nburst x3 of {10 * capacity}: {len(accepted)} accepted, {len(rejected)} got 429; 429 latency p50 "
          f"{latencies[len(latencies) // 2]:.3f} s, p99 {latencies[int(len(latencies) * 0.99)]:.3f} s, max "
          f"{latencies[-1]:.3f} s (slowest accepted request {slowest_accepted:.3f} s); RSS growth over the bursts, "
          f"MiB: {growth}")
    # Rejected at once, not after waiting for a slot: the bounds leave room for a loaded 2-core CI machine (its
    # slowest 429 has been seen at 1.3 s, p50 0.46 s, slowest accepted request 1.4 s unloaded).
    assert latencies[len(latencies) // 2] < 1.0, "the median 429 took longer than a second"
    assert latencies[-1] < 3.0, "a 429 took longer than 3 s"
    assert set(before) == set(after), "a Serve process restarted during the bursts"
    assert all(g < 64 for g in growth.values()), growth  # memory stays bounded: no growth per burst


def test_kv_cache_exhaustion_completes_through_preemption(base_url):
    rng = random.Random(0)
    prompts = [[rng.randrange(10, 500) for _ in range(250)] for _ in range(12)]

    def send(prompt):
        return httpx.post(f"{base_url}/v1/completions", timeout=300, json={
            "model": "demo-small-kv", "prompt": prompt, "max_tokens": 150, "ignore_eos": True, "temperature": 0})

    t0 = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
        responses = list(pool.map(send, prompts))
    seconds = time.monotonic() - t0
    assert [r.status_code for r in responses] == [200] * len(prompts), [r.text for r in responses if r.status_code != 200]
    assert all(r.json()["usage"]["completion_tokens"] == 150 for r in responses)
    deployment = engine_deployment_name("demo-small-kv")
    stats = wait_for(lambda: [s for s in engine_stats("overload", deployment)
                              if s["kv_blocks_used"] == 0 and s["running"] == 0 and s["waiting"] == 0],
                     10, what="the block pool to be free")[0]
    print(f"\nKV exhaustion: {len(prompts)} requests of 400 tokens on {KV_BLOCKS * 16} tokens of KV finished in "
          f"{seconds:.1f} s with {stats['preemptions']} preemptions; blocks used afterwards: {stats['kv_blocks_used']}")
    assert stats["preemptions"] > 0
    assert stats["kv_blocks_total"] == KV_BLOCKS
