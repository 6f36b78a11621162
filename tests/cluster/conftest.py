"""One Ray instance and one Serve HTTP proxy for tests/cluster; each module deploys its own app.

The machine running CI is small (2 cores): Ray starts once, each module's app is deployed once (module-scoped
fixture, cluster_testing.deploy) and deleted at the module's end, and Serve and Ray are shut down at the end.
"""
from __future__ import annotations

import pytest
from cluster_testing import free_port


@pytest.fixture(scope="session")
def serve_url():
    import ray
    from ray import serve

    if ray.is_initialized():  # another test package's Ray: ours needs its own CPUs and Serve
        ray.shutdown()
    from cluster.config import ClusterConfig, HTTPConfig
    from cluster.serve_env import start_local

    port = free_port()  # served by the ingress itself (direct ingress, as `strata serve` does)
    serve.start(http_options=start_local(ClusterConfig(http=HTTPConfig(host="127.0.0.1", port=port)),
                                         num_cpus=8, include_dashboard=False))  # never joins a running cluster
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        if ray.is_initialized():  # a later test package may already have shut it down and started its own
            serve.shutdown()
            ray.shutdown()
