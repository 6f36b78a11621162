"""Faults inside the cluster, under load: a killed engine replica, a killed tensor-parallel worker.

What must hold: requests that had not started move to another replica and succeed; streams that had already
sent tokens end with an error event and `data: [DONE]` (never a hang); Serve replaces what died; the API keeps
answering throughout; nothing is left behind (worker processes, placement groups).
"""
from __future__ import annotations

import os
import signal
import time

import pytest
import ray

from cluster.config import ClusterConfig, ModelConfig, engine_deployment_name
from tests.support.http_clients import Load, LongStream, completion, summarize
from tests.support.polling import wait_for
from tests.support.ray_processes import processes
from tests.support.serve_app import deploy, replica_actor, replica_states

HEALTH_CHECK_PERIOD_S = 1.0
CONFIG = ClusterConfig(app_name="faults", models=[
    ModelConfig(model="demo", min_replicas=2, max_replicas=2, num_kv_blocks=256, max_num_seqs=16,
                health_check_period_s=HEALTH_CHECK_PERIOD_S),
    ModelConfig(model="demo", name="demo-tp", tensor_parallel_size=2, num_kv_blocks=128, max_num_seqs=8,
                health_check_period_s=HEALTH_CHECK_PERIOD_S),
])
DEMO, TP = engine_deployment_name("demo"), engine_deployment_name("demo-tp")


@pytest.fixture(scope="module")
def base_url(serve_url):
    yield from deploy(serve_url, CONFIG)


def test_killed_replica_under_load(base_url):
    with Load(base_url, "demo", threads=4) as load:
        known = wait_for(lambda: len(r := {o.replica for o in load.outcomes if o.replica}) == 2 and r, 30,
                         what="both replicas to serve")
        streamer = LongStream(base_url, "demo").begin()
        time.sleep(0.5)
        t_kill = time.monotonic()
        ray.kill(replica_actor(streamer.replica), no_restart=True)
        streamer.join(timeout=60)
        assert not streamer.is_alive(), "the stream on the killed replica hung"
        killed_stream = streamer.outcome
        # Recovered: a new replica answers requests (Serve replaced the dead one).
        first_new = wait_for(lambda: next((o for o in list(load.outcomes) if o.ok and o.replica not in known), None),
                             120, what="a replacement replica to serve")
        wait_for(lambda: replica_states("faults", DEMO) == {"RUNNING": 2}, 30, what="two running replicas")
        time.sleep(2)  # the load goes on against the recovered deployment
        outcomes = load.stop()

    recovery = first_new.end - t_kill
    summary = summarize(outcomes)
    during = [o for o in outcomes if t_kill <= o.end <= first_new.end]
    print(f"\nreplica kill: {summary}; a new replica served {recovery:.1f} s after the kill; the killed replica's "
          f"stream ended {killed_stream.end - t_kill:.2f} s after it with {killed_stream.error}; "
          f"{sum(o.ok for o in during)} requests succeeded during the recovery")
    # The stream that had sent tokens ends with an error event and [DONE].
    assert killed_stream.status == 200 and killed_stream.chunks > 0, killed_stream
    assert killed_stream.error is not None and killed_stream.done, killed_stream
    # Every failure is a stream that had already sent tokens; whole responses and unstarted requests succeed.
    for o in outcomes:
        assert o.ok or (o.stream and o.chunks > 0 and o.error is not None and o.done), o
    # The API answered while the replacement started.
    assert sum(1 for o in during if o.ok) >= 3


def tp_worker_pids() -> set[int]:
    return {p.pid for p in processes("ray::RayWorker")}


def live_placement_groups() -> int:
    return sum(1 for pg in ray.util.placement_group_table().values() if pg["state"] == "CREATED")


def test_killed_tensor_parallel_worker(base_url):
    ok = completion(base_url, {"model": "demo-tp", "prompt": "Hello", "max_tokens": 8, "ignore_eos": True})
    assert ok.ok, ok
    old_replica = ok.replica
    workers = tp_worker_pids()
    assert len(workers) == 2, f"expected the TP replica's two workers, found {workers}"
    # Three replicas, one placement group each: the TP workers sit in their replica's, not in one of their own.
    assert live_placement_groups() == 3

    victim = min(workers)
    os.kill(victim, signal.SIGKILL)
    # A request during the failure must get an answer (an error or a retry), never hang.
    during = completion(base_url, {"model": "demo-tp", "prompt": "Hello", "max_tokens": 8}, timeout=60)
    assert during.status is not None, during
    # Serve stops a replica after 3 failed health checks in a row (the replica's check reaches the dead worker).
    wait_for(lambda: replica_states("faults", TP).get("RUNNING", 0) == 0, 60, interval=0.1,
             what="Serve to mark the replica unhealthy")
    replacement = wait_for(lambda: _served_by_new_replica(base_url, old_replica), 120, interval=1.0,
                           what="a replacement TP replica that serves")
    print(f"\nTP worker kill: request during the failure got {during.status}; serving again on {replacement}")
    # Nothing of the old replica survives: its other worker is gone, and so is its placement group.
    wait_for(lambda: not (workers & tp_worker_pids()), 30, what="the old replica's workers to exit")
    assert len(tp_worker_pids()) == 2
    wait_for(lambda: live_placement_groups() == 3, 30, what="the old placement group to be removed")


def _served_by_new_replica(base_url: str, old_replica: str) -> str | None:
    out = completion(base_url, {"model": "demo-tp", "prompt": "Hello", "max_tokens": 4}, timeout=30)
    return out.replica if out.ok and out.replica != old_replica else None
