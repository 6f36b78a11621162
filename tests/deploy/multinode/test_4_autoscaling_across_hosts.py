"""Autoscaling on the `ray up` cluster: a burst through the head's proxy takes the demo model from 1 replica to 2,
on different hosts (each replica reserves a whole host's 2 CPUs, as a GPU replica takes a host's GPUs), and it
returns to 1 once the burst is over."""
from __future__ import annotations

import threading

import httpx
import pytest

from tests.support.polling import wait_for

pytestmark = pytest.mark.slow


def replica_hosts(cluster) -> list[str]:
    return sorted(cluster.replicas().values())


def test_a_burst_adds_a_replica_on_another_host_and_idle_returns_to_one(cluster, hosts):
    assert len(replica_hosts(cluster)) == 1
    stop = threading.Event()
    body = {"model": "demo", "prompt": "Once upon a time", "max_tokens": 400, "ignore_eos": True, "stream": True}

    def long_stream():
        try:
            with httpx.stream("POST", f"{cluster.url}/v1/completions", json=body, timeout=120) as r:
                for _ in r.iter_lines():
                    if stop.is_set():
                        return
        except httpx.HTTPError:
            pass  # a stream cut when the test ends; the test asserts on replicas, not on these

    threads = [threading.Thread(target=long_stream, daemon=True) for _ in range(8)]
    for t in threads:
        t.start()
    try:
        two = wait_for(lambda: found if len(found := replica_hosts(cluster)) == 2 else None, timeout=150,
                       interval=1, what="a second replica under the burst")
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
    assert len(set(two)) == 2 and set(two) <= {h.ip for h in hosts}, two
    wait_for(lambda: len(replica_hosts(cluster)) == 1, timeout=150, interval=2,
             what="the idle model to return to 1 replica")
