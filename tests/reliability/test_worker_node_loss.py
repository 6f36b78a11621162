"""A Ray worker node that hosts an engine replica disappears under load (its raylet and every process on it are
killed, as when a machine fails): requests that had not started move to the other replica and succeed, a stream
that was running there ends with an error event, Serve starts a replacement on a spare node, and the API keeps
answering throughout.

Runs on a multi-node `ray.cluster_utils.Cluster` of this machine: a head (Serve's controller, proxy and ingress,
one engine replica) and two worker nodes of one CPU each (the second replica, and room for its replacement).
"""
from __future__ import annotations

import time

import pytest
from ray import serve

from cluster.config import ClusterConfig, ModelConfig, engine_deployment_name
from tests.support.http_clients import Load, LongStream, summarize
from tests.support.polling import wait_for
from tests.support.ports import free_port
from tests.support.ray_cluster import multi_node_cluster
from tests.support.ray_processes import processes
from tests.support.serve_app import deploy, engine_stats, replica_states

DEPLOYMENT = engine_deployment_name("demo")
# One replica at deploy time, on the head (the only node then, so the ingress lands there too); the load makes
# the autoscaler add the second, which can only go to a worker node.
CONFIG = ClusterConfig(app_name="node-loss", models=[ModelConfig(
    model="demo", num_kv_blocks=256, max_num_seqs=16, min_replicas=1, initial_replicas=1, max_replicas=2,
    target_queue_depth=1, upscale_delay_s=0, downscale_delay_s=600, look_back_period_s=2, metrics_interval_s=0.5,
    health_check_period_s=1)])


@pytest.fixture(scope="module")
def cluster():
    # Node deaths are noticed after 3 missed heartbeats of 0.5 s rather than Ray's default 15 s.
    system = {"health_check_initial_delay_ms": 0, "health_check_period_ms": 500, "health_check_failure_threshold": 3}
    with multi_node_cluster(head={"num_cpus": 1, "include_dashboard": False, "_system_config": system}) as cluster:
        port = free_port()
        serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
        yield cluster, f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def base_url(cluster):
    yield from deploy(cluster[1], CONFIG)


def raylet_pids(node) -> set[int]:
    return {info.process.pid for info in node.all_processes["raylet"]}


def test_removed_worker_node_under_load(cluster, base_url):
    cluster, _ = cluster
    workers = [cluster.add_node(num_cpus=1) for _ in range(2)]
    cluster.wait_for_nodes()
    with Load(base_url, "demo", threads=4) as load:
        stats = wait_for(lambda: len(s := engine_stats("node-loss", DEPLOYMENT)) == 2 and s, 120, interval=1.0,
                         what="the autoscaler's second replica")
        by_node = {s["node_id"]: s["replica"] for s in stats}
        victim = next(n for n in workers if n.node_id in by_node)
        spare = next(n for n in workers if n is not victim)
        assert not processes("OpenAIIngress", raylet_pids(victim)), "the ingress must not run on the node we remove"
        known = {s["replica"] for s in stats}
        # A stream in progress on the victim's replica.
        streams = [LongStream(base_url, "demo").begin() for _ in range(4)]
        on_victim = [s for s in streams if s.replica == by_node[victim.node_id]]
        assert on_victim, "no long stream landed on the victim's replica"

        t_remove = time.monotonic()
        cluster.remove_node(victim, allow_graceful=False)  # SIGKILL: the node fails, it does not drain
        for s in streams:
            s.join(timeout=90)
            assert not s.is_alive(), "a stream hung after its node died"
        first_new = wait_for(lambda: next((o for o in list(load.outcomes) if o.ok and o.replica not in known), None),
                             180, interval=0.5, what="a replacement replica to serve")
        wait_for(lambda: replica_states("node-loss", DEPLOYMENT) == {"RUNNING": 2}, 60, what="two running replicas")
        time.sleep(2)
        outcomes = load.stop()

    new_stats = engine_stats("node-loss", DEPLOYMENT)
    assert {s["node_id"] for s in new_stats} == {cluster.head_node.node_id, spare.node_id}
    during = [o for o in outcomes if t_remove <= o.end <= first_new.end]
    ended = [s.outcome.end - t_remove for s in on_victim]
    print(f"\nnode removal: {summarize(outcomes)}; a replacement replica served {first_new.end - t_remove:.1f} s "
          f"after the node died; its streams ended {max(ended):.1f} s after with "
          f"{on_victim[0].outcome.error}; {sum(o.ok for o in during)} requests succeeded meanwhile")
    for s in on_victim:
        out = s.outcome
        assert out.status == 200 and out.chunks > 0 and out.error is not None and out.done, out
    for s in streams:
        if s not in on_victim:
            assert s.outcome.ok, s.outcome
    for o in outcomes:
        assert o.ok or (o.stream and o.chunks > 0 and o.error is not None and o.done), o
    assert sum(1 for o in during if o.ok) >= 3
