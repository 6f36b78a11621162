"""Helpers for the cluster tests (imported as `cluster_testing`, like tests/engine's `tiny_models`)."""
from __future__ import annotations


import httpx
from polling import wait_for  # noqa: F401 - re-exported to the tests
from ports import free_port  # noqa: F401 - re-exported to the tests
from prometheus_client.parser import text_string_to_metric_families

from cluster.config import ClusterConfig

PROMPT = "The capital of France is"
MESSAGES = [{"role": "user", "content": "Hello, how are you today?"}]


def deploy(serve_url: str, config: ClusterConfig):
    """Deploy `config` as the Serve app (generator for a module fixture: yields the base URL, then deletes it)."""
    from ray import serve

    from cluster.app import build_app

    serve.run(build_app(config), name=config.app_name, route_prefix="/")
    try:
        yield serve_url
    finally:
        serve.delete(config.app_name)


def metrics(base_url: str) -> dict[str, dict[tuple, float]]:
    """GET /metrics as {sample name: {sorted label items: value}}."""
    text = httpx.get(f"{base_url}/metrics", timeout=30).text
    out: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return out


def replica_metric(base_url: str, name: str, model: str) -> dict[str, float]:
    """One per-replica engine metric of a model: {replica id: value}."""
    values = metrics(base_url).get(name, {})
    return {dict(k)["replica"]: v for k, v in values.items() if dict(k).get("model") == model}


def running_replicas(app: str, deployment: str) -> int:
    from ray import serve

    status = serve.status().applications[app].deployments[deployment]
    return sum(n for state, n in status.replica_states.items() if getattr(state, "value", state) == "RUNNING")
