"""The test variant of deploy/ray-up/onprem.yaml (docs/deployment.md shows the difference).

Changed, and only these:
- the keys marked EDIT for a user: `provider.head_ip`, `provider.worker_ips`, `auth` (the hosts' addresses,
  root with the harness's key), and `cluster_name` (one per run);
- paths: the venv `~/strata-venv` becomes the venv running the tests, which the shared filesystem gives every
  host already installed (so the install step, which skips an unchanged pyproject.toml, is a no-op);
- the model: `strata deploy` deploys serve_config() (the tiny demo model) instead of deploy/serve/strata.yaml.
Everything else, the checkout's sync over rsync, every setup and start command, runs as written.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

from tests.support.paths import DEPLOY

ONPREM = DEPLOY / "ray-up" / "onprem.yaml"
VENV_PATHS = ("~/strata-venv", "$HOME/strata-venv")
SERVE_CONFIG_PATH = "~/strata/deploy/serve/strata.yaml"
COMMAND_LISTS = ("setup_commands", "head_setup_commands", "worker_setup_commands", "head_start_ray_commands",
                 "worker_start_ray_commands")


def onprem_variant(hosts, venv: Path, serve_config: Path) -> dict:
    config = yaml.safe_load(ONPREM.read_text())
    config["cluster_name"] = hosts.tag
    config["provider"].update(head_ip=hosts[0].ip, worker_ips=[h.ip for h in hosts.hosts[1:]])
    config["auth"] = {"ssh_user": "root", "ssh_private_key": str(hosts.key)}
    for key in COMMAND_LISTS:
        config[key] = [replace_paths(c, venv, serve_config) for c in config.get(key) or []]
    return config


def replace_paths(command: str, venv: Path, serve_config: Path) -> str:
    for path in VENV_PATHS:
        command = command.replace(path, str(venv))
    return command.replace(SERVE_CONFIG_PATH, str(serve_config))


# The demo model on hosts of 2 CPUs: a replica reserves a whole host (as a GPU replica takes a host's GPUs), and
# two requests at a time queue the rest, so a burst scales it to 2 within seconds.
SERVE_FLAGS = ["--host", "0.0.0.0", "--min-replicas", "1", "--max-replicas", "2", "--num-cpus-per-replica", "2",
               "--num-kv-blocks", "256", "--max-num-seqs", "2", "--target-queue-depth", "2",
               "--upscale-delay-s", "0.5", "--downscale-delay-s", "3", "--look-back-period-s", "2",
               "--metrics-interval-s", "0.5"]


def serve_config() -> str:
    """`strata config render demo ...`: the Serve config the variant deploys."""
    out = subprocess.run([sys.executable, "-m", "cluster.cli", "config", "render", "demo", *SERVE_FLAGS],
                         capture_output=True, text=True, check=True)
    return out.stdout
