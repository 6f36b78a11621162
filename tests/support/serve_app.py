"""A Strata app on the test's Serve: deploy one, and read what it reports (its Prometheus metrics, the states
of its replicas, the replicas' own engine stats, their Ray actors)."""
from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families

from cluster.config import ClusterConfig


def deploy(base_url: str, config: ClusterConfig):
    """Deploy `config` as its Serve app (a generator for module fixtures: yields the base URL, then deletes it)."""
    from ray import serve

    from cluster.app import build_app

    serve.run(build_app(config), name=config.app_name, route_prefix="/")
    try:
        yield base_url
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


def replica_states(app: str, deployment: str) -> dict[str, int]:
    """{state name ("RUNNING", "STARTING", ...): number of replicas} of one deployment."""
    from ray import serve

    status = serve.status().applications[app].deployments[deployment]
    return {getattr(state, "value", state): n for state, n in status.replica_states.items()}


def engine_stats(app: str, deployment: str, timeout_s: float = 10.0) -> list[dict]:
    """Every replica's `engine_stats`, asked of the replicas themselves."""
    from ray import serve

    handle = serve.get_deployment_handle(deployment, app)
    return [r for r in handle.broadcast("engine_stats").results(timeout_s=timeout_s, return_exceptions=True)
            if isinstance(r, dict)]


def replica_actor(replica_id: str):
    """The Ray actor of a Serve replica, from the id the ingress sends in `X-Strata-Replica`."""
    import ray

    for actor in ray.util.list_named_actors(all_namespaces=True):
        if actor["name"].startswith("SERVE_REPLICA::") and actor["name"].endswith("#" + replica_id):
            return ray.get_actor(actor["name"], namespace=actor["namespace"])
    raise LookupError(f"no live actor for replica {replica_id}")
