"""`ray down` of the cluster the earlier tests in this directory used: no Ray process is left on any host."""
from __future__ import annotations

import pytest

from tests.deploy.multinode.conftest import ray_processes
from tests.support.polling import wait_for

pytestmark = pytest.mark.slow


def test_ray_down_leaves_no_ray_process_on_any_host(cluster, hosts):
    assert ray_processes(cluster.head)  # Ray runs before (a host lost earlier may have none left)
    result = cluster.down()
    assert result.returncode == 0, cluster.log_tail()
    wait_for(lambda: not any(ray_processes(h) for h in hosts), timeout=90, interval=1,
             what="Ray to stop on every host: " + repr({h.name: ray_processes(h) for h in hosts}))
