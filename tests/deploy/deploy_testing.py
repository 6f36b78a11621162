"""Helpers for tests/deploy (imported as `deploy_testing`, like tests/cluster's `cluster_testing`)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
CHART = ROOT / "helm" / "strata"
DATA = Path(__file__).resolve().parent / "data"


def strata(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run the `strata` CLI as users do (a fresh process), from the repository root."""
    return subprocess.run([sys.executable, "-m", "cluster.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def render_serve_config(*args: str) -> str:
    out = strata("config", "render", *args)
    assert out.returncode == 0, out.stderr
    return out.stdout


def load_yaml(path: Path):
    return yaml.safe_load(path.read_text())


def shutdown_ray() -> None:
    """Stop Serve and Ray of this process, if any (another test package's, or ours)."""
    import ray

    if ray.is_initialized():
        from ray import serve

        try:
            serve.shutdown()
        finally:
            ray.shutdown()
