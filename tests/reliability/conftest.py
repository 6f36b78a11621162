"""Reliability tests: faults, overload and bad input against real Ray Serve, real HTTP and the demo model.

The single-node modules share one Ray + Serve (reliability_testing.local_serve, started by the first module
that asks); each deploys its own app and deletes it at its end. The node-loss module needs a multi-node
`ray.cluster_utils.Cluster` and shuts the shared one down first. Whatever runs is shut down at the session's end.
"""
from __future__ import annotations

import pytest
from reliability_testing import local_serve, shutdown_ray


@pytest.fixture(scope="session", autouse=True)
def _shutdown_at_end():
    yield
    shutdown_ray()


@pytest.fixture(scope="module")
def serve_url():
    return local_serve()
