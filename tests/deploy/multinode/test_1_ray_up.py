"""`ray up` of deploy/ray-up/onprem.yaml (its test variant) over SSH onto three hosts with their own addresses:
every node joins on its own address, and the YAML's own `strata deploy` leaves a model answering through the
head's Serve proxy. (`ray down` is test_9_ray_down.py, after the tests that use this cluster.)"""
from __future__ import annotations

import pytest

from tests.deploy.multinode.conftest import complete

pytestmark = pytest.mark.slow


def test_every_host_joins_on_its_own_address(cluster, hosts):
    assert sorted(cluster.alive_nodes()) == sorted(h.ip for h in hosts)


def test_a_request_through_the_heads_serve_proxy_answers(cluster):
    response = complete(cluster.url)
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] == 8
