"""engine_in_ingress: the model's engine runs inside the ingress replica (one process, no Serve call between
them), through real Serve and real HTTP, with the `openai` client."""
from __future__ import annotations

import threading

import httpx
import openai
import pytest

from cluster.app import INGRESS_NAME
from cluster.config import ClusterConfig, ModelConfig
from engine import LLM, SamplingParams
from tests.support.polling import wait_for
from tests.support.prompts import MESSAGES, PROMPT
from tests.support.serve_app import deploy, replica_metric

# Capacity: one request held by the replica plus one in the model's queue; a third is turned away with 429.
CONFIG = ClusterConfig(app_name="colocated", engine_in_ingress=True,
                       models=[ModelConfig(model="demo", num_kv_blocks=256, max_ongoing_requests=1, max_queue_size=1)])


@pytest.fixture(scope="module")
def base_url(serve_url):
    yield from deploy(serve_url, CONFIG)


@pytest.fixture(scope="module")
def client(base_url):
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=120)


def test_one_deployment_serves_what_the_offline_engine_generates(client):
    from ray import serve

    assert set(serve.status().applications["colocated"].deployments) == {INGRESS_NAME}
    out = client.completions.create(model="demo", prompt=PROMPT, max_tokens=16, temperature=0)
    chat = client.chat.completions.create(model="demo", messages=MESSAGES, max_tokens=12, temperature=0)
    streamed = client.chat.completions.create(model="demo", messages=MESSAGES, max_tokens=12, temperature=0,
                                              stream=True)
    llm = LLM(model="demo", num_kv_blocks=256)
    try:
        greedy = SamplingParams(temperature=0, max_tokens=16)
        assert out.choices[0].text == llm.generate(PROMPT, greedy, use_tqdm=False)[0].outputs[0].text
        expected_chat = llm.chat(MESSAGES, SamplingParams(temperature=0, max_tokens=12), use_tqdm=False)[0]
    finally:
        llm.shutdown()
    assert chat.choices[0].message.content == expected_chat.outputs[0].text
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == expected_chat.outputs[0].text
    assert chat.usage.completion_tokens == len(expected_chat.outputs[0].token_ids)


def test_health_and_metrics_come_from_the_engine_in_the_ingress(base_url):
    health = httpx.get(f"{base_url}/health", timeout=30)
    assert health.status_code == 200, health.text
    assert health.json()["models"]["demo"] == {"healthy": True, "replicas": 1, "healthy_replicas": 1}
    assert len(replica_metric(base_url, "strata_kv_cache_blocks_total", "demo")) == 1


def test_full_model_answers_429_and_disconnects_free_blocks(base_url):
    body = {"model": "demo", "prompt": PROMPT, "max_tokens": 1500, "ignore_eos": True, "stream": True}
    stop = threading.Event()

    def hold_stream(started: threading.Event):
        with httpx.stream("POST", f"{base_url}/v1/completions", json=body, timeout=120) as r:
            for _ in r.iter_lines():
                started.set()
                if stop.is_set():
                    return  # leaves the stream: the client is gone

    started = [threading.Event(), threading.Event()]
    threads = [threading.Thread(target=hold_stream, args=(e,), daemon=True) for e in started]
    for t, e in zip(threads, started):
        t.start()
        assert e.wait(60), "a long stream never started"
    try:
        r = httpx.post(f"{base_url}/v1/completions", timeout=30, json={"model": "demo", "prompt": PROMPT})
        assert r.status_code == 429, r.text
        assert all(t.is_alive() for t in threads), "the 429 came only after a long stream had ended"
        assert r.json()["error"]["code"] == "queue_full"
        assert r.headers["retry-after"] == str(CONFIG.limits.retry_after_s)
        assert sum(replica_metric(base_url, "strata_kv_cache_blocks_used", "demo").values()) > 0
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
    wait_for(lambda: sum(replica_metric(base_url, "strata_kv_cache_blocks_used", "demo").values()) == 0, timeout=20,
             what="the disconnected streams' KV blocks to be freed")
    ok = httpx.post(f"{base_url}/v1/completions", timeout=30, json={"model": "demo", "prompt": PROMPT, "max_tokens": 2})
    assert ok.status_code == 200, ok.text
