"""Overload: a burst far above capacity is shed with 429s while the accepted requests run, and what was queued
completes; a KV cache too small for the load completes everything through preemption and recomputation.
"""
from __future__ import annotations

import concurrent.futures
import random
import re

import httpx
import pytest

from cluster.config import ClusterConfig, ModelConfig, engine_deployment_name
from tests.support.http_clients import LongStream
from tests.support.polling import wait_for
from tests.support.ray_processes import processes
from tests.support.serve_app import deploy, engine_stats

CAPACITY = dict(max_ongoing_requests=2, max_queue_size=2)  # 2 running, 2 waiting: 4 requests
KV_BLOCKS = 40  # 640 tokens of KV for 12 requests of 400 tokens each
CONFIG = ClusterConfig(app_name="overload", models=[
    ModelConfig(model="demo", name="demo-burst", num_kv_blocks=256, max_num_seqs=2, **CAPACITY),
    ModelConfig(model="demo", name="demo-small-kv", num_kv_blocks=KV_BLOCKS, max_num_seqs=16),
])
SHORT = {"model": "demo-burst", "prompt": "The capital of France is", "max_tokens": 48, "ignore_eos": True}


@pytest.fixture(scope="module")
def base_url(serve_url):
    yield from deploy(serve_url, CONFIG)


def send_burst(pool, base_url: str, n: int, holders: list[LongStream]) -> list[concurrent.futures.Future]:
    """n requests at once; each answers (status, headers, body, whether every holder still streamed then)."""
    def one():
        r = httpx.post(f"{base_url}/v1/completions", json=SHORT, timeout=300)
        return r.status_code, dict(r.headers), r.json(), all(h.is_alive() for h in holders)

    return [pool.submit(one) for _ in range(n)]


def serve_rss() -> dict[str, int]:
    """Resident memory of Serve's processes: proxy, controller, ingress and engine replicas ("pid name": bytes)."""
    out = {}
    for title in ("ServeReplica:", "ProxyActor", "ServeController"):
        for p in processes(title):
            name = re.search(r"(ServeReplica:[\w-]+:[\w-]+|ProxyActor|ServeController)", " ".join(p.cmdline()))
            out[f"{p.pid} {name.group(1) if name else title}"] = p.memory_info().rss
    return out


def test_bursts_of_ten_times_capacity_are_shed_while_the_accepted_requests_run(base_url):
    """Both running slots held by long streams, three bursts of ten times the capacity: every request but the
    queue's gets 429 while those streams still run (shed at once, not after waiting for a slot); the queued ones
    complete once the streams leave; Serve's processes neither restart nor grow."""
    running, queued = CAPACITY["max_ongoing_requests"], CAPACITY["max_queue_size"]
    size = 10 * (running + queued)
    with concurrent.futures.ThreadPoolExecutor(size) as pool:
        warm_up = send_burst(pool, base_url, 2 * (running + queued), [])  # imports, connection pools, arenas
        assert {f.result()[0] for f in warm_up} <= {200, 429}
        before = serve_rss()
        holders = [LongStream(base_url, "demo-burst", max_tokens=2000).begin() for _ in range(running)]
        answers = []
        for _ in range(3):
            answers += send_burst(pool, base_url, size, holders)
            wait_for(lambda: sum(not f.done() for f in answers) <= queued, 120, interval=0.1,
                     what="every request but the queued ones to be answered")
        waiting = [f for f in answers if not f.done()]
        shed = [f.result() for f in answers if f not in waiting]
        held = [h.close() for h in holders]
        queued_then_served = [f.result(timeout=300) for f in waiting]
    after = serve_rss()
    growth_mib = {k.split(" ", 1)[1]: round((after.get(k, 0) - v) / 2 ** 20, 1) for k, v in before.items()}
    print(f"\n3 bursts of {size} with {running} long streams running: {len(shed)} shed, "
          f"{len(queued_then_served)} queued then served; RSS growth over the bursts, MiB: {growth_mib}")
    assert len(waiting) == queued  # the queue was full from the first burst on
    for status, headers, body, streaming in shed:
        assert status == 429, (status, body)
        assert streaming, "a 429 came only after a running request had ended"
        assert body["error"]["type"] == "rate_limit_error" and body["error"]["code"] == "queue_full"
        assert headers["retry-after"] == str(CONFIG.limits.retry_after_s)
    assert all(o.status == 200 and o.error is None and o.closed for o in held), held
    for status, _, body, _ in queued_then_served:
        assert status == 200 and body["usage"]["completion_tokens"] == 48, body
    assert set(before) == set(after), "a Serve process restarted during the bursts"
    assert all(g < 64 for g in growth_mib.values()), growth_mib  # memory stays bounded: no growth per burst


def test_kv_cache_exhaustion_completes_through_preemption(base_url):
    rng = random.Random(0)
    prompts = [[rng.randrange(10, 500) for _ in range(250)] for _ in range(12)]

    def send(prompt):
        return httpx.post(f"{base_url}/v1/completions", timeout=300, json={
            "model": "demo-small-kv", "prompt": prompt, "max_tokens": 150, "ignore_eos": True, "temperature": 0})

    with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
        responses = list(pool.map(send, prompts))
    assert [r.status_code for r in responses] == [200] * len(prompts), [r.text for r in responses if r.status_code != 200]
    assert all(r.json()["usage"]["completion_tokens"] == 150 for r in responses)
    deployment = engine_deployment_name("demo-small-kv")
    stats = wait_for(lambda: [s for s in engine_stats("overload", deployment)
                              if s["kv_blocks_used"] == 0 and s["running"] == 0 and s["waiting"] == 0],
                     10, what="the block pool to be free")[0]
    print(f"\nKV exhaustion: {len(prompts)} requests of 400 tokens on {KV_BLOCKS * 16} tokens of KV finished with "
          f"{stats['preemptions']} preemptions")
    assert stats["preemptions"] > 0
    assert stats["kv_blocks_total"] == KV_BLOCKS
