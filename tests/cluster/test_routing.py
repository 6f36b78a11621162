"""PrefixAwareRouter: the ranking rule on its own, hashes that match the engine's, and two replicas behind it."""
from __future__ import annotations

import random

import httpx
import pytest

from cluster.app import request_router_config
from cluster.config import ClusterConfig, ModelConfig
from cluster.routing import ReplicaView, prefix_block_hashes, rank_replicas
from engine import SamplingParams
from tests.support.serve_app import deploy, replica_metric

SHARED_PREFIX = ("Serving engines batch many requests together, keep a paged key-value cache in blocks, share the "
                 "blocks of common prompt prefixes, and schedule prefill and decode steps. ") * 6
MODEL = ModelConfig(model="demo", min_replicas=2, max_replicas=2, num_kv_blocks=512, routing_imbalance_threshold=2,
                    routing_stats_period_s=0.5)


# -- the rule -------------------------------------------------------------------------------------------------
def test_rank_prefers_the_replica_holding_the_longest_prefix():
    views = [ReplicaView("a", load=1, prefix_blocks=0), ReplicaView("b", load=2, prefix_blocks=5),
             ReplicaView("c", load=0, prefix_blocks=3)]
    ranks = rank_replicas(views, imbalance_threshold=4, rng=random.Random(0))
    assert ranks[0] == ["b"]
    assert sorted(k for rank in ranks for k in rank) == ["a", "b", "c"]  # everyone stays reachable


def test_load_gate_skips_a_replica_far_above_the_least_loaded():
    views = [ReplicaView("hot", load=9, prefix_blocks=8), ReplicaView("cold", load=0, prefix_blocks=0),
             ReplicaView("warm", load=1, prefix_blocks=0)]
    ranks = rank_replicas(views, imbalance_threshold=2, rng=random.Random(0))
    assert "hot" not in ranks[0]
    assert ranks[-1] == ["hot"]  # tried only when the others are full


def test_without_affinity_it_is_power_of_two_choices():
    views = [ReplicaView(k, load=0, prefix_blocks=0) for k in "abcde"]
    ranks = rank_replicas(views, imbalance_threshold=8, rng=random.Random(1))
    assert len(ranks[0]) == 2
    assert sorted(k for rank in ranks for k in rank) == list("abcde")


def test_router_hashes_are_the_engines_prefix_cache_hashes():
    from engine import LLM

    llm = LLM(model="demo", num_kv_blocks=128, block_size=16)
    try:
        ids = llm.get_tokenizer().encode(SHARED_PREFIX)
        llm.generate(ids, SamplingParams(max_tokens=1), use_tqdm=False)
        hashes = prefix_block_hashes(ids, block_size=16)
        assert len(hashes) == (len(ids) - 1) // 16
        assert set(hashes) <= set(llm.stats().cached_block_hashes)
    finally:
        llm.shutdown()


def test_prompts_of_impossible_token_ids_route_without_affinity():
    # The router hashes a prompt before any replica has checked it; ids beyond any vocabulary must not fail the
    # routing (the request hung), so the replica can answer 400.
    assert prefix_block_hashes([2 ** 40] + [1] * 40, block_size=16) == []
    assert len(prefix_block_hashes([5] * 41, block_size=16)) == 2


def test_power_of_two_switch_uses_serves_router():
    assert request_router_config(MODEL, "power_of_two").request_router_class.endswith("PowerOfTwoChoicesRequestRouter")
    prefix = request_router_config(MODEL, "prefix_aware")
    assert prefix.request_router_class == "cluster.routing:PrefixAwareRouter"
    assert prefix.request_router_kwargs == {"block_size": 16, "imbalance_threshold": 2}


# -- two replicas behind the router ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def base_url(serve_url):
    yield from deploy(serve_url, ClusterConfig(models=[MODEL]))


def complete(base_url: str, prompt: str) -> tuple[str, dict]:
    r = httpx.post(f"{base_url}/v1/completions", timeout=60,
                   json={"model": "demo", "prompt": prompt, "max_tokens": 2, "temperature": 0})
    assert r.status_code == 200, r.text
    return r.headers["x-strata-replica"], r.json()


def test_requests_sharing_a_prefix_land_on_the_replica_that_cached_it(base_url):
    first, _ = complete(base_url, SHARED_PREFIX + "Question 0?")
    for i in range(1, 6):
        replica, body = complete(base_url, SHARED_PREFIX + f"Question {i}?")
        assert replica == first
        assert body["usage"]["prompt_tokens_details"]["cached_tokens"] >= 16 * 10
    hits = replica_metric(base_url, "strata_prefix_cache_hits_total", "demo")
    assert len(hits) == 2
    assert hits[first] > 0
    assert all(v == 0 for r, v in hits.items() if r != first)


def test_a_new_router_learns_cached_prefixes_from_replica_reports(base_url):
    """This test's own handle has routed nothing: it knows where the prefix lives only from the engines' reports."""
    import asyncio

    from ray import serve

    from cluster.config import engine_deployment_name
    from cluster.replica import GenerateRequest

    cached_on, _ = complete(base_url, SHARED_PREFIX + "Where?")
    handle = serve.get_deployment_handle(engine_deployment_name("demo"), "strata").options(
        stream=True, method_name="generate")
    tokenizer_ids = _tokenize(SHARED_PREFIX + "Again?")

    async def route_once(i: int) -> str:
        stream = handle.remote(GenerateRequest(f"driver-{i}", tokenizer_ids, SamplingParams(max_tokens=1)))
        replica = (await stream.__anext__()).replica_id
        async for _ in stream:
            pass
        return replica

    async def route_all() -> list[str]:
        await asyncio.sleep(2 * MODEL.routing_stats_period_s + 1)  # let a report reach the controller and router
        return [await route_once(i) for i in range(4)]

    assert asyncio.run(route_all()) == [cached_on] * 4


def _tokenize(text: str) -> list[int]:
    from engine.model_source import resolve_model
    from engine.tokenizer import load_tokenizer

    return load_tokenizer(resolve_model("demo")).encode(text)


def test_an_overloaded_replica_is_avoided_despite_affinity(base_url):
    cached_on, _ = complete(base_url, SHARED_PREFIX + "Warm up?")
    body = {"model": "demo", "max_tokens": 1500, "ignore_eos": True, "stream": True}
    client = httpx.Client(timeout=60)
    streams = []
    try:
        for i in range(4):  # one at a time: each is routed knowing the load the previous ones added
            request = client.build_request("POST", f"{base_url}/v1/completions",
                                           json={**body, "prompt": SHARED_PREFIX + f"Long {i}?"})
            streams.append(client.send(request, stream=True))
            assert streams[-1].status_code == 200
        placed = [s.headers["x-strata-replica"] for s in streams]
        # imbalance threshold 2: affinity holds while the cached replica has at most 2 more requests than the other
        assert placed[:3] == [cached_on] * 3
        assert placed[3] != cached_on
    finally:
        for s in streams:
            s.close()
        client.close()
