"""How Strata starts a Ray instance of its own for Serve: Serve's low-latency request path.

Serve reads these settings from the environment of each Ray process when it starts, so they are set before
`ray.init` (the raylet, and every worker it forks, inherits them) and cannot change on a running cluster:
- gRPC between handles and replicas, in place of a Ray actor task per request and per streamed item;
- user code on the replica's own event loop, not a second thread that every message hops to and back;
- on a local cluster only, a handle's router on the event loop of the process using it (the ingress, Serve's
  proxy), not on a thread of its own that every request and streamed item hops to and back (demo model, 2 cores,
  concurrency 16, direct ingress: 2,211-2,964 tok/s in three runs against 1,933-2,125 in three without; through
  Serve's proxy 1,773 and 2,275 against 1,442). Such a handle cannot be used outside a running event loop
  (`.results()` in `strata status`): clusters whose nodes set the environment for every process (deploy/, helm/)
  keep Serve's default;
- with one ingress replica (or `http.direct_ingress: true`), the ingress replica serves HTTP itself on
  `http.port`, so requests skip Serve's HTTP proxy (one hop fewer each way: 3.6 ms of TTFT on one H100). Serve
  still starts a proxy on the head node, on a spare port. A replacement ingress replica (a crash, a redeploy in
  place) takes the port back at once: no quarantine, and no draining period, since no load balancer in front has
  to notice it leave. Several ingress replicas would each listen on a port of their own, so they keep Serve's
  proxy unless `http.direct_ingress: true` asks otherwise.

A local cluster (one machine, where the engine's own threads share the CPUs with Ray's processes) also gets a
quieter control plane, since every periodic wake-up of Ray's processes is CPU taken from the engine (measured idle
on a 2-core machine with one engine replica: Ray's and Serve's processes took 20% of a core with the dashboard,
18% without it, 10% with these settings and a replica that sends no routing stats, cluster/app.py):
- the Serve controller's loop every 0.5 s, not 0.1 s (deploys, replica replacement and autoscaling decisions
  react up to 0.4 s later);
- Serve's own Ray metrics exported once a second, not ten times (Strata's metrics are its own, at /metrics);
- no Ray dashboard (its ten processes took 3.6% of a core; minimal mode, 0.4%): start Ray yourself
  (`ray start --head`) and `strata serve --address auto` to have it.

The README has the measurements (benchmarks/serving_overhead.py). Clusters started by `ray up` or KubeRay get
the gRPC and event-loop settings from their nodes' environment (deploy/, helm/) and keep Serve's proxies.

Also the console's log levels (`strata serve --log-level`): Strata's own lines from the chosen level on, Ray's
and Serve's (start banners, the controller, proxies and replicas reporting each step) only at debug, their
warnings and errors always. Every Ray process of the app gets the level through Ray's worker setup hook, and its
stderr reaches the console (log_to_driver), so a replica's warnings and errors show where `strata serve` runs.
"""
from __future__ import annotations

import logging
import os
import socket
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the worker setup hook imports this module in every Ray process: keep it light
    from cluster.config import ClusterConfig

FAST_PATH_ENV = {
    "RAY_SERVE_USE_GRPC_BY_DEFAULT": "1",
    "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
}


# Only in the Ray processes of a local cluster: the CLI or test that starts it keeps its own environment.
LOCAL_ROUTER_ENV = {
    "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0",
}


LOCAL_CONTROL_PLANE_ENV = {
    "RAY_SERVE_CONTROL_LOOP_INTERVAL_S": "0.5",
    "RAY_SERVE_METRICS_EXPORT_INTERVAL_MS": "1000",
}


def direct_ingress_env(config: ClusterConfig) -> dict[str, str]:
    port = config.http.port
    return {
        "RAY_SERVE_ENABLE_DIRECT_INGRESS": "1",
        # Ingress replica i listens on port + i (Serve hands out ports from this range, the lowest free first).
        "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(port),
        "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(port + config.ingress_replicas),
        # A restarted ingress replica takes its port back at once (Serve otherwise rests it for 150 s, for HAProxy).
        "RAY_SERVE_PORT_QUARANTINE_S": "0",
        # No load balancer in front has to notice a stopping replica: stop once its requests are done.
        "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "0",
    }


def start_local(config: ClusterConfig, **ray_init_kwargs) -> dict:
    """Start a new local Ray instance for `config` (ray.init(address="local", ...)); returns the `http_options`
    to start Serve with. Settings already in the environment win, so a user can turn any of them off; Ray's
    dashboard stays off unless `include_dashboard=True` is passed."""
    import ray
    from ray import serve  # noqa: F401 - Serve reads its settings at import: this process keeps the defaults

    env = {**FAST_PATH_ENV, **LOCAL_ROUTER_ENV, **LOCAL_CONTROL_PLANE_ENV,
           **(direct_ingress_env(config) if config.serves_http_directly else {})}
    ray_init_kwargs.setdefault("include_dashboard", False)
    saved = {k: os.environ.get(k) for k in env}
    for key, value in env.items():
        os.environ.setdefault(key, value)
    direct = os.environ.get("RAY_SERVE_ENABLE_DIRECT_INGRESS") == "1"
    try:
        context = ray.init(address="local", **ray_init_kwargs)
        logging.getLogger("strata").info("Ray started at %s (token authentication on: RAY_AUTH_MODE=token for "
                                         "`strata deploy/status --address` it)", context.address_info["gcs_address"])
    finally:  # the raylet has its copy; this process (a CLI, a test) keeps its own environment
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return {"host": config.http.host, "port": spare_port() if direct else config.http.port}


def rebind_over_time_wait() -> None:
    """In an ingress replica serving HTTP itself: bind its port with SO_REUSEADDR, as uvicorn and Serve's proxy do.
    Ray 2.60 binds a replica's port without it. After an ingress replica stops, a client's kept-alive connection
    leaves the old side of it waiting to close (FIN-WAIT-2, then TIME-WAIT, up to a minute), and a bind without
    SO_REUSEADDR fails meanwhile (seen here); Serve then blocks that port for good and hands the replacement
    replica (a redeploy, a crash under traffic) the next one. Serve's own switch (`enable_so_reuseport`, which sets
    SO_REUSEADDR and SO_REUSEPORT) is fixed to False where the replica starts its server; this turns it on. The
    replica looks the function up when it starts the server, after the deployment's constructor has run this."""
    if os.environ.get("RAY_SERVE_ENABLE_DIRECT_INGRESS") != "1":
        return
    from ray.serve._private import replica

    start = replica.start_asgi_http_server
    if getattr(start, "strata_rebinds", False):
        return

    async def start_rebinding(*args, **kwargs):
        return await start(*args, **{**kwargs, "enable_so_reuseport": True})

    start_rebinding.strata_rebinds = True
    replica.start_asgi_http_server = start_rebinding


def serves_http_directly(app_name: str) -> bool:
    """Whether `app_name` runs on the connected cluster with its ingress serving HTTP itself. Asks a Ray worker,
    which has the cluster's environment."""
    import ray
    from ray import serve

    if app_name not in serve.status().applications:
        return False
    read = ray.remote(num_cpus=0)(lambda: os.environ.get("RAY_SERVE_ENABLE_DIRECT_INGRESS"))
    return ray.get(read.remote()) == "1"


def delete_and_wait_for_port(app_name: str, host: str, port: int, timeout_s: float = 60.0) -> None:
    """Delete `app_name`, then wait until the head node can bind `port` again. A redeploy in place of an app whose
    ingress serves HTTP itself is a restart: Serve hands each replica a port of its own, so a new ingress replica
    started while the old one runs would get the next port, or none."""
    import ray
    from ray import serve

    def port_free() -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with socket.socket() as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the replica binds it
                try:
                    s.bind((host, port))
                    return True
                except OSError:
                    time.sleep(0.2)
        return False

    serve.delete(app_name)
    on_head = ray.remote(num_cpus=0, resources={"node:__internal_head__": 0.001})(port_free)
    if not ray.get(on_head.remote()):
        raise RuntimeError(f"port {port} is still taken {timeout_s:.0f} s after {app_name} was deleted")


def spare_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- the console's log levels ----------------------------------------------------------------------------------
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_LEVEL_ENV = "STRATA_LOG_LEVEL"
# Ray's notice, on every new local instance, that it turned token authentication on: a start banner.
RAY_AUTH_NOTICE_LOGGER = "ray._private.authentication.authentication_token_setup"


def ray_log_level(level: str) -> int:
    """Ray's and Serve's threshold for Strata's `level`: their INFO lines only at debug."""
    return logging.INFO if level == "debug" else max(logging.WARNING, getattr(logging, level.upper()))


def logging_ray_init_kwargs(level: str) -> dict:
    """ray.init arguments that set `level` in this process's Ray logger and, through Ray's worker setup hook, in
    every process of the job: Serve's controller and proxies, the replicas, the engines' shard workers."""
    return {"logging_level": ray_log_level(level),
            "runtime_env": {"worker_process_setup_hook": f"{__name__}.configure_logging",
                            "env_vars": {LOG_LEVEL_ENV: level}}}


class ServeLevelFilter(logging.Filter):
    """Serve's records from a level on, and its access log (on only where `access_log: true` asks for it). A
    filter on the logger, not its level: Serve resets the level and handlers each time it sets up a component."""

    def __init__(self, level: int):
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= self.level or bool(getattr(record, "serve_access_log", False))


def configure_logging(level: str | None = None) -> None:
    """Strata's log lines to stderr from `level` on (default: $STRATA_LOG_LEVEL, else info); Ray's and Serve's
    from ray_log_level(level). Ray calls it with no argument in each worker process (its setup hook)."""
    level = level or os.environ.get(LOG_LEVEL_ENV, "info")
    strata = logging.getLogger("strata")
    if not strata.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(asctime)s %(message)s", "%m-%d %H:%M:%S"))
        strata.addHandler(handler)
    strata.setLevel(level.upper())
    strata.propagate = False
    logging.getLogger("ray").setLevel(ray_log_level(level))
    logging.getLogger(RAY_AUTH_NOTICE_LOGGER).setLevel(logging.INFO if level == "debug" else logging.ERROR)
    serve_logger = logging.getLogger("ray.serve")
    for old in [f for f in serve_logger.filters if isinstance(f, ServeLevelFilter)]:
        serve_logger.removeFilter(old)
    serve_logger.addFilter(ServeLevelFilter(ray_log_level(level)))
