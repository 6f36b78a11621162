"""Ray and Serve on this machine for the tests.

One local Ray with Serve's HTTP proxy is shared by every module that needs nothing else (`local_serve`, through
the `serve_url` fixture); a module that needs a Ray of its own (`local_ray`, `multi_node_cluster`) shuts down
whatever runs first, and the shared one is started again by the next module that asks for it. The machine
running CI is small (2 cores): Ray starts as rarely as that allows.
"""
from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from tests.support.ports import free_port

_serve: dict = {}  # the shared local Serve: its base URL while it runs


def shutdown_ray() -> None:
    """Stop Serve and Ray of this process, whoever started them."""
    _serve.clear()
    if "ray" not in sys.modules:  # never started in this process
        return
    import ray

    if ray.is_initialized():
        from ray import serve

        try:
            serve.shutdown()
        finally:
            ray.shutdown()


def local_serve(num_cpus: int = 12) -> str:
    """The shared single-node Ray (logical CPUs: more than the machine has) with Serve's HTTP proxy, served by
    the ingress itself as `strata serve` does; never joins a running cluster. Returns the base URL."""
    import ray
    from ray import serve

    if _serve.get("url") and ray.is_initialized():
        return _serve["url"]
    shutdown_ray()  # another module's Ray, or a multi-node one
    from cluster.config import ClusterConfig, HTTPConfig
    from cluster.serve_env import start_local

    port = free_port()
    # Serve's proxy: modules deploy apps of their own, one after another, on this one Ray
    config = ClusterConfig(http=HTTPConfig(host="127.0.0.1", port=port, direct_ingress=False))
    serve.start(http_options=start_local(config, num_cpus=num_cpus, include_dashboard=False))
    _serve["url"] = f"http://127.0.0.1:{port}"
    return _serve["url"]


def local_ray(num_cpus: int = 8) -> None:
    """A Ray of the caller's own (not one another module or test run left), with more logical CPUs than the
    machine: one per tensor/pipeline-parallel worker."""
    import ray

    shutdown_ray()
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False)


@contextmanager
def multi_node_cluster(head: dict, workers: Sequence[dict] = ()) -> Iterator:
    """A `ray.cluster_utils.Cluster` on this machine, this process connected to it: a head started with the
    `head` node arguments and one node per item of `workers` (arguments of `add_node`). Shut down on exit."""
    import ray
    from ray.cluster_utils import Cluster

    shutdown_ray()
    cluster = Cluster(initialize_head=True, head_node_args=head)
    try:
        for args in workers:
            cluster.add_node(**args)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address)
        yield cluster
    finally:
        shutdown_ray()
        cluster.shutdown()
