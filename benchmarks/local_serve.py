"""Start a local Ray + Serve with a ClusterConfig for a benchmark, ask its replicas for engine stats, stop it."""
from __future__ import annotations

import socket


def start(config, num_cpus: int = 8, address: str | None = None, port: int | None = None) -> str:
    """Deploy `config` (a ClusterConfig) on a local Ray (or the cluster at `address`); returns the base URL."""
    import ray
    from ray import serve

    from cluster.app import build_app

    from cluster.serve_env import start_local

    config = config.model_copy(update={"http": config.http.model_copy(update={
        "host": "127.0.0.1", "port": port or free_port()})})
    if address:
        ray.init(address=address, include_dashboard=False)
        http_options = {"host": "127.0.0.1", "port": config.http.port}
    else:
        http_options = start_local(config, num_cpus=num_cpus, include_dashboard=False)
    serve.start(http_options=http_options)
    serve.run(build_app(config), name=config.app_name, route_prefix="/")
    return f"http://127.0.0.1:{config.http.port}"


def redeploy(config) -> None:
    """Replace the running application with `config` (same name): new replicas, caches cold."""
    from ray import serve

    from cluster.app import build_app

    serve.delete(config.app_name)
    serve.run(build_app(config), name=config.app_name, route_prefix="/")


def engine_stats(app_name: str, served_name: str) -> list[dict]:
    """Every replica's engine stats (EngineReplica.engine_stats)."""
    from ray import serve

    from cluster.config import engine_deployment_name

    handle = serve.get_deployment_handle(engine_deployment_name(served_name), app_name)
    return [r for r in handle.broadcast("engine_stats").results(timeout_s=30, return_exceptions=True)
            if isinstance(r, dict)]


def stop() -> None:
    import ray
    from ray import serve

    if ray.is_initialized():
        serve.shutdown()
        ray.shutdown()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
