"""One `ray up` cluster of three hosts (tests/support/hosts.py) for the whole directory: a head and two workers
from deploy/ray-up/onprem.yaml's test variant (onprem_variant.py), brought up over SSH, with the demo model
deployed by the YAML's own `strata deploy`. Torn down with `ray down`, and the hosts removed, also when a test
fails or the run is interrupted."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import yaml

from tests.deploy.multinode.onprem_variant import onprem_variant, serve_config
from tests.support.hosts import Hosts, ensure_packages, missing_requirements
from tests.support.paths import ROOT
from tests.support.polling import wait_for
from tests.support.ray_cluster import shutdown_ray

VENV = Path(sys.executable).parent.parent  # the venv running the tests: on the shared filesystem, every host's
RAY = str(VENV / "bin" / "ray")
RAY_UP_TIMEOUT_S = 420


@dataclass
class RayUpCluster:
    hosts: Hosts
    config: Path  # the variant YAML
    log: Path
    up: bool = field(default=True)

    @property
    def head(self):
        return self.hosts[0]

    @property
    def url(self) -> str:
        return f"http://{self.head.ip}:8000"

    def ray(self, *args: str, timeout: float = RAY_UP_TIMEOUT_S) -> subprocess.CompletedProcess:
        """The `ray` CLI of the launching machine (this one), as a user runs it from the repository root."""
        with self.log.open("a") as log:
            log.write(f"\n$ ray {' '.join(args)}\n")
            log.flush()
            return subprocess.run([RAY, *args], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, timeout=timeout,
                                  env={**os.environ, "PATH": f"{VENV / 'bin'}:{os.environ['PATH']}"})

    def log_tail(self, n: int = 60) -> str:
        return "\n".join(self.log.read_text().splitlines()[-n:])

    def alive_nodes(self) -> list[str]:
        """The node IP of every live Ray node, asked on the head."""
        code = ("import json, ray; ray.init(address='auto', logging_level='ERROR', log_to_driver=False);"
                "print('NODES', json.dumps([n['NodeManagerAddress'] for n in ray.nodes() if n['Alive']]))")
        out = self.head.run([sys.executable, "-c", code], timeout=60).stdout
        return json.loads(out.split("NODES ", 1)[1].splitlines()[0])

    def replicas(self, deployment: str = "EngineReplica-demo") -> dict[str, str]:
        """{replica id (the X-Strata-Replica header): host address} of a deployment's live replicas (by default
        the demo model's engine replicas)."""
        code = ("import json, ray; from ray.util.state import list_actors;"
                "ray.init(address='auto', logging_level='ERROR', log_to_driver=False);"
                "ips = {n['NodeID']: n['NodeManagerAddress'] for n in ray.nodes()};"
                "actors = list_actors(filters=[('state', '=', 'ALIVE')], limit=10000);"
                "print('REPLICAS', json.dumps({a.name.rsplit('#', 1)[-1]: ips[a.node_id] for a in actors"
                f" if a.class_name.endswith({deployment!r})}}))")
        out = self.head.run([sys.executable, "-c", code], timeout=60).stdout
        return json.loads(out.split("REPLICAS ", 1)[1].splitlines()[0])

    def down(self) -> subprocess.CompletedProcess:
        self.up = False
        return self.ray("down", "-y", str(self.config), timeout=180)


def ray_processes(host) -> list[str]:
    """Command lines of Ray's processes on a host: GCS, raylet, dashboard, agents, workers (`ray::...`)."""
    out = host.run(["ps", "-eo", "args="]).stdout
    return [line for line in out.splitlines() if "site-packages/ray/" in line or line.startswith("ray::")]


@pytest.fixture(scope="package")
def hosts():
    why = missing_requirements()
    if why:
        pytest.skip(why)
    ensure_packages()
    # The shared local Ray + Serve that earlier modules left running would take CPU from the hosts' Rays on a
    # 2-core machine, and their timings with it: stopped here, the next module that wants it starts it again.
    shutdown_ray()
    with Hosts(3) as made:
        yield made


@pytest.fixture(scope="package")
def cluster(hosts) -> RayUpCluster:
    folder = hosts.dir
    serve_file = folder / "serve.yaml"
    serve_file.write_text(serve_config())
    variant = onprem_variant(hosts, venv=VENV, serve_config=serve_file)
    config = folder / "onprem-test.yaml"
    config.write_text(yaml.safe_dump(variant, sort_keys=False))
    # onprem.yaml installs only when the venv's copy of pyproject.toml differs: the shared venv is installed.
    stamp = VENV / "strata-pyproject.toml"
    had_stamp = stamp.exists()
    made = RayUpCluster(hosts, config, folder / "ray.log")
    assert made.ray("get-auth-token", "--generate", timeout=60).returncode == 0  # the docs' first step
    # The YAML's first setup command creates the venv where it finds none: never over the shared one.
    for h in hosts:
        h.run([str(VENV / "bin" / "python"), "-c", "import ray, torch, cluster"])
    try:
        stamp.write_bytes((ROOT / "pyproject.toml").read_bytes())
        result = made.ray("up", "-y", "--no-config-cache", str(config))
        assert result.returncode == 0, f"ray up failed:\n{made.log_tail()}"
        wait_for(lambda: sorted(made.alive_nodes()) == sorted(h.ip for h in hosts), timeout=180, interval=2,
                 what="the two workers to join the head")
        yield made
    finally:
        if made.up:
            made.down()
        if not had_stamp:
            stamp.unlink(missing_ok=True)


def complete(base_url: str, prompt: str = "Hosts of their own", max_tokens: int = 8) -> httpx.Response:
    return httpx.post(f"{base_url}/v1/completions", timeout=120,
                      json={"model": "demo", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0})
