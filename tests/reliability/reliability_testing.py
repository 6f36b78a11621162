"""Helpers for the reliability tests (imported as `reliability_testing`): one local Ray + Serve shared by the
single-node modules, steady HTTP load that records how every request ended, the replica actors and worker
processes to kill, and a checkpoint that turns one token into NaN."""
from __future__ import annotations

import json
import random
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil
from polling import wait_for  # noqa: F401 - re-exported to the tests
from ports import free_port  # noqa: F401 - re-exported to the tests

POISON_TOKEN = 7  # the poisoned checkpoint's NaN embedding row; the demo's greedy outputs of TEXTS never hold it
TEXTS = ["The capital of France is", "Hello, how are you today?", "Once upon a time there was",
         "Serving engines batch many requests", "def main():", "The quick brown fox"]
_serve: dict = {}


# -- Ray and Serve ----------------------------------------------------------------------------------------------
def local_serve(num_cpus: int = 12) -> str:
    """A single-node Ray (logical CPUs: more than the machine has) with Serve's HTTP proxy; started once and
    shared by the modules that need nothing else. Returns the base URL."""
    import ray
    from ray import serve

    if _serve.get("url") and ray.is_initialized():
        return _serve["url"]
    shutdown_ray()  # another test package's Ray, or a multi-node one
    from cluster.config import ClusterConfig, HTTPConfig
    from cluster.serve_env import start_local

    port = free_port()
    serve.start(http_options=start_local(ClusterConfig(http=HTTPConfig(host="127.0.0.1", port=port)),
                                         num_cpus=num_cpus, include_dashboard=False))
    _serve["url"] = f"http://127.0.0.1:{port}"
    return _serve["url"]


def shutdown_ray() -> None:
    import ray
    from ray import serve

    _serve.clear()
    if ray.is_initialized():
        try:
            serve.shutdown()
        finally:
            ray.shutdown()


def deploy(base_url: str, config):
    """Deploy a ClusterConfig as its Serve app (a generator for module fixtures: yields the URL, then deletes)."""
    from ray import serve

    from cluster.app import build_app

    serve.run(build_app(config), name=config.app_name, route_prefix="/")
    try:
        yield base_url
    finally:
        serve.delete(config.app_name)


def replica_states(app: str, deployment: str) -> dict[str, int]:
    from ray import serve

    status = serve.status().applications[app].deployments[deployment]
    return {getattr(state, "value", state): n for state, n in status.replica_states.items()}


def replica_actor(replica_id: str):
    """The Ray actor of a Serve replica, from the id the ingress sends in `X-Strata-Replica`."""
    import ray

    for actor in ray.util.list_named_actors(all_namespaces=True):
        if actor["name"].startswith("SERVE_REPLICA::") and actor["name"].endswith("#" + replica_id):
            return ray.get_actor(actor["name"], namespace=actor["namespace"])
    raise LookupError(f"no live actor for replica {replica_id}")


def engine_stats(app: str, deployment: str, timeout_s: float = 10.0) -> list[dict]:
    """Every replica's `engine_stats`, asked of the replicas themselves."""
    from ray import serve

    handle = serve.get_deployment_handle(deployment, app)
    return [r for r in handle.broadcast("engine_stats").results(timeout_s=timeout_s, return_exceptions=True)
            if isinstance(r, dict)]


def local_raylets() -> set[int]:
    """The raylet of the Ray this process started (local_serve)."""
    import ray

    node = ray._private.worker._global_node
    return {info.process.pid for info in node.all_processes.get("raylet", [])}


def processes(title: str, raylets: set[int] | None = None) -> list[psutil.Process]:
    """Live worker processes of this test's Ray (children of its raylets: other Rays may run on the machine) whose
    title (Ray sets it to `ray::<ActorClass>.<method>`) holds `title`."""
    raylets = local_raylets() if raylets is None else raylets
    found = []
    for p in psutil.process_iter(["cmdline", "status", "ppid"]):
        try:
            cmd = " ".join(p.info["cmdline"] or [])
            if p.info["ppid"] in raylets and title in cmd and p.info["status"] != psutil.STATUS_ZOMBIE:
                found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


# -- requests ---------------------------------------------------------------------------------------------------
@dataclass
class Outcome:
    """How one request ended, as the client saw it."""

    stream: bool
    start: float
    end: float = 0.0
    status: int | None = None  # None: no HTTP answer (connection failed or timed out)
    chunks: int = 0  # stream chunks that carried text or a finish reason
    error: dict | str | None = None  # the error event / error body / transport exception
    done: bool = False  # the stream ended with `data: [DONE]`
    replica: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.error is None and (self.done or not self.stream)


def completion(base_url: str, body: dict, headers: dict | None = None, timeout: float = 60.0,
               on_chunk: Callable[[Outcome], None] | None = None) -> Outcome:
    """POST /v1/completions (streamed when body says so), reading it to the end."""
    out = Outcome(stream=bool(body.get("stream")), start=time.monotonic())
    try:
        with httpx.stream("POST", f"{base_url}/v1/completions", json=body, headers=headers, timeout=timeout) as r:
            out.status, out.replica = r.status_code, r.headers.get("x-strata-replica")
            if r.status_code != 200 or not out.stream:
                r.read()
                data = r.json()
                out.error = data.get("error") if r.status_code != 200 else None
            else:
                for line in r.iter_lines():
                    if not line.startswith("data: "):
                        continue
                    payload = line.removeprefix("data: ")
                    if payload == "[DONE]":
                        out.done = True
                        continue
                    event = json.loads(payload)
                    if "error" in event:
                        out.error = event["error"]
                    elif event.get("choices") and (event["choices"][0].get("text")
                                                   or event["choices"][0].get("finish_reason")):
                        out.chunks += 1
                        if on_chunk is not None:
                            on_chunk(out)
    except httpx.HTTPError as e:
        out.error = f"{type(e).__name__}: {e}"
    out.end = time.monotonic()
    return out


@dataclass
class Load:
    """Steady load: `threads` clients, each sending one request after another (streams and whole responses,
    varied lengths) until `stop()`, which returns every outcome."""

    base_url: str
    model: str
    threads: int = 4
    max_tokens: tuple[int, int] = (8, 48)
    headers: dict | None = None
    timeout: float = 60.0
    outcomes: list[Outcome] = field(default_factory=list)

    def __post_init__(self):
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._workers = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(self.threads)]

    def start(self) -> Load:
        for w in self._workers:
            w.start()
        return self

    def stop(self) -> list[Outcome]:
        self._stop.set()
        for w in self._workers:
            w.join(timeout=self.timeout + 10)
        assert not any(w.is_alive() for w in self._workers), "a client hung past its timeout"
        return list(self.outcomes)

    def _run(self, seed: int) -> None:
        rng = random.Random(seed)
        while not self._stop.is_set():
            body = {"model": self.model, "prompt": rng.choice(TEXTS), "max_tokens": rng.randint(*self.max_tokens),
                    "ignore_eos": True, "temperature": 0, "stream": rng.random() < 0.5}
            out = completion(self.base_url, body, self.headers, self.timeout)
            with self._lock:
                self.outcomes.append(out)


def summarize(outcomes: list[Outcome]) -> dict:
    failed = [o for o in outcomes if not o.ok]
    return {"requests": len(outcomes), "failed": len(failed),
            "failed_streams_after_tokens": sum(1 for o in failed if o.stream and o.chunks > 0),
            "statuses": sorted({o.status for o in outcomes}, key=str)}


# -- a model that fails on one input ------------------------------------------------------------------------------
def make_poisoned_model(out_dir: Path, token: int = POISON_TOKEN) -> Path:
    """The demo checkpoint with the embedding row of `token` set to NaN: any sequence holding that token drives
    the model to NaN logits, as corrupt weights or an overflow would."""
    from safetensors.torch import load_file, save_file

    from engine.model_source import resolve_model

    shutil.copytree(resolve_model("demo"), out_dir)
    path = out_dir / "model.safetensors"
    tensors = load_file(str(path))
    tensors["model.embed_tokens.weight"][token] = float("nan")
    save_file(tensors, str(path), metadata={"format": "pt"})
    return out_dir
