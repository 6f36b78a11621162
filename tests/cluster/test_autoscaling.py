"""QueueDepthPolicy on a live cluster: a burst adds a replica and the idle model returns to its minimum;
a model scaled to zero starts a replica for its first request. Delays are seconds here, minutes in production."""
from __future__ import annotations

import threading
from types import SimpleNamespace

import httpx
import pytest

from cluster.autoscaling import QueueDepthPolicy
from cluster.config import ClusterConfig, ModelConfig, engine_deployment_name
from tests.support.polling import wait_for
from tests.support.serve_app import deploy, replica_states

FAST = dict(upscale_delay_s=0.5, downscale_delay_s=3, downscale_to_zero_delay_s=3, look_back_period_s=2,
            metrics_interval_s=0.5)
CONFIG = ClusterConfig(models=[
    ModelConfig(model="demo", name="burst", min_replicas=1, max_replicas=2, target_queue_depth=2, num_kv_blocks=512,
                **FAST),
    ModelConfig(model="demo", name="cold", min_replicas=0, max_replicas=1, num_kv_blocks=256, queue_timeout_s=120,
                **FAST),
])


# -- the policy on its own ------------------------------------------------------------------------------------
def context(current: int, depths: list[float], kv: list[float] | None = None, queued: float = 0.0):
    metrics = {"queue_depth": dict(enumerate(depths))}
    if kv is not None:
        metrics["kv_cache_usage"] = dict(enumerate(kv))
    return SimpleNamespace(current_num_replicas=current, target_num_replicas=current, aggregated_metrics=metrics,
                           total_queued_requests=queued, total_num_requests=sum(depths) + queued)


def test_policy_targets_queue_depth_per_replica():
    policy = QueueDepthPolicy(target_queue_depth=4)
    assert policy(context(1, [10]))[0] == 3
    assert policy(context(2, [1, 2]))[0] == 1
    assert policy(context(2, [0, 0]))[0] == 0  # Serve keeps min_replicas and applies the delays
    assert policy(context(1, [4], queued=5))[0] == 3  # requests waiting at the ingress count too


def test_policy_adds_a_replica_under_kv_pressure():
    policy = QueueDepthPolicy(target_queue_depth=100, kv_pressure_threshold=0.8)
    assert policy(context(2, [3, 3], kv=[0.95, 0.85]))[0] == 3
    assert policy(context(2, [3, 3], kv=[0.2, 0.3]))[0] == 1


# -- live ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def base_url(serve_url):
    yield from deploy(serve_url, CONFIG)


def replicas(model: str) -> int:
    return replica_states(CONFIG.app_name, engine_deployment_name(model)).get("RUNNING", 0)


def test_scale_from_zero_serves_the_first_request(base_url):
    assert replicas("cold") == 0
    health = httpx.get(f"{base_url}/health", timeout=30)  # a model allowed to scale to zero counts as healthy
    assert health.status_code == 200, health.text
    assert health.json()["models"]["cold"] == {"healthy": True, "replicas": 0, "healthy_replicas": 0}
    assert replicas("cold") == 0  # answered without waiting for a replica to start
    r = httpx.post(f"{base_url}/v1/completions", timeout=120,
                   json={"model": "cold", "prompt": "Hello", "max_tokens": 4, "ignore_eos": True})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 4
    assert replicas("cold") == 1
    wait_for(lambda: replicas("cold") == 0, timeout=90, what="the idle model to scale back to zero")


def test_a_burst_adds_replicas_and_idle_returns_to_the_minimum(base_url):
    assert replicas("burst") == 1
    stop = threading.Event()
    body = {"model": "burst", "prompt": "Once upon a time", "max_tokens": 1500, "ignore_eos": True, "stream": True}

    def long_stream():
        with httpx.stream("POST", f"{base_url}/v1/completions", json=body, timeout=120) as r:
            for _ in r.iter_lines():
                if stop.is_set():
                    return

    threads = [threading.Thread(target=long_stream, daemon=True) for _ in range(8)]
    for t in threads:
        t.start()
    try:
        wait_for(lambda: replicas("burst") >= 2, timeout=120, interval=1, what="a second replica under the burst")
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
    wait_for(lambda: replicas("burst") == 1, timeout=120, interval=1, what="the idle model to return to 1 replica")
