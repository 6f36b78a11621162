"""`ray down` of the cluster the earlier tests in this directory used: no Ray process is left on any host."""
from __future__ import annotations

import time

import pytest

from tests.deploy.multinode.conftest import ray_processes
from tests.support.polling import wait_for

pytestmark = pytest.mark.slow


def test_ray_down_leaves_no_ray_process_on_any_host(cluster, hosts):
    assert ray_processes(cluster.head)  # Ray runs before (a host lost earlier may have none left)
    result = cluster.down()
    assert result.returncode == 0, cluster.log_tail()
    # A worker's Ray stops once its head watch (onprem.yaml) finds the head gone: its `ray health-check` takes about
    # 40 s to give up, after up to 10 s of sleep, and `ray stop` follows.
    down = time.monotonic()
    try:
        wait_for(lambda: not any(ray_processes(h) for h in hosts), timeout=180, interval=1, what="Ray to stop")
    except AssertionError:
        left = {h.name: ray_processes(h) for h in hosts}
        watches = {h.name: h.run(["cat", "/tmp/strata-head-watch.log"], check=False).stdout[-600:] for h in hosts}
        raise AssertionError(f"Ray processes left 180 s after ray down: {left}\nthe hosts' head-watch logs: "
                             f"{watches}\n{cluster.log_tail(40)}") from None
    print(f"\nno Ray process left on any host {time.monotonic() - down:.0f} s after ray down")
