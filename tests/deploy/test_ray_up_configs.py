"""deploy/ray-up/*.yaml pass Ray's own cluster-config validation (what `ray up` runs first), size their GPU
workers for the Serve config they deploy, and run only commands that exist, on files that are in the repo."""
from __future__ import annotations

import copy
import re
import shlex
from pathlib import Path

import pytest
import yaml

from cluster.cli import build_parser
from cluster.config import ClusterConfig
from cluster.serve_env import FAST_PATH_ENV
from tests.support.paths import DEPLOY, ROOT

CONFIGS = sorted((DEPLOY / "ray-up").glob("*.yaml"))
# Ray settings onprem.yaml's start commands export (tests/deploy/multinode runs them on hosts of their own).
RAY_NODE_ENV = {"RAY_AUTH_MODE", "RAY_enable_autoscaler_v2"}
COMMAND_LISTS = ("initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands",
                 "head_start_ray_commands", "worker_start_ray_commands")


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def commands(config: dict) -> list[list[str]]:
    """Every simple command the cluster launcher runs, as argv: command lines split at `;`, `&&`, `||` and
    `|` (outside quotes), redirections (with their files) and `&` dropped."""
    lines = [c for key in COMMAND_LISTS for c in config.get(key) or []]
    lines += [c for t in (config.get("available_node_types") or {}).values()
              for key in ("initialization_commands", "worker_setup_commands") for c in t.get(key) or []]
    out = []
    for line in lines:
        lexer = shlex.shlex(line.replace("$RAY_HEAD_IP", "10.0.0.1"), posix=True, punctuation_chars=";&|<>")
        lexer.whitespace_split = True
        argv: list[str] = []
        target = False  # the next token is a redirection's file or descriptor
        for token in [*lexer, ";"]:
            if token in (";", "&&", "||", "|"):
                out += [argv] if argv else []
                argv = []
            elif token in (">", ">>", "<", ">&", "<&", "&>"):
                if argv and argv[-1].isdigit():  # 2>&1: the descriptor before the operator
                    argv.pop()
                target = True
            elif token == "&":  # runs in the background
                continue
            elif target:
                target = False
            else:
                argv.append(token)
    return out


def local_path(config: dict, remote: str) -> Path | None:
    """The repo file that file_mounts puts at `remote` on the nodes."""
    for target, source in config.get("file_mounts", {}).items():
        target = target.rstrip("/")
        if remote == target or remote.startswith(target + "/"):
            return (ROOT / source / remote[len(target):].lstrip("/")).resolve()
    return None


def test_there_is_a_config_per_target():
    assert {p.stem for p in CONFIGS} == {"aws", "gcp", "onprem"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_ray_validates_the_cluster_config(path):
    from ray.autoscaler._private.util import prepare_config, validate_config

    # What `ray up` does before contacting the provider: fill the provider's defaults, then the JSON schema
    # (ray-schema.json) and Ray's own consistency checks.
    validate_config(prepare_config(copy.deepcopy(load(path))))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_the_head_takes_no_gpus(path):
    config = load(path)
    head_start = " ".join(config["head_start_ray_commands"])
    assert "ray start --head" in head_start and "--num-gpus=0" in head_start
    if "head_node_type" in config:
        assert config["available_node_types"][config["head_node_type"]]["resources"].get("GPU") == 0


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_every_command_exists_and_deploys_a_serve_config_from_the_repo(path):
    from ray.scripts.scripts import cli as ray_cli

    config = load(path)
    deployed = []
    for argv in commands(config):
        command = " ".join(argv)
        argv = [a for a in argv if a not in ("{", "}")]  # a group: `cmp ... || { pip install ...; }`
        while argv and argv[0] in ("setsid", "nohup"):  # a worker's watch on its head, in the background
            argv = argv[1:]
        if not argv:
            continue
        if argv[0] == "ray":
            sub = ray_cli.commands[argv[1]]
            sub.make_context(argv[1], argv[2:])  # click parses every flag, or raises
        elif argv[0] == "strata":
            args = build_parser().parse_args(argv[1:])  # raises UsageError on an unknown command or flag
            if args.command == "deploy":
                file = local_path(config, args.file)
                assert file and file.is_file(), f"{path.name}: `{command}` deploys a file not synced from the repo"
                deployed.append(file)
        elif argv[0] == "export":  # Serve's request-path settings, the ones `strata serve` starts Ray with
            exported = dict(a.split("=", 1) for a in argv[1:])
            assert FAST_PATH_ENV.items() <= exported.items() or set(exported) <= RAY_NODE_ENV, f"{path.name}: `{command}`"
            assert set(exported) - set(FAST_PATH_ENV) <= RAY_NODE_ENV, f"{path.name}: `{command}`"
        elif argv[0] in ("ulimit", "test", "grep", "echo", "timeout", "python3", "cmp", "cp", "bash"):
            continue
        else:
            assert re.fullmatch(r"~/strata-venv/bin/(pip|python)", argv[0]), f"{path.name}: unexpected `{command}`"
            for arg in argv:
                if match := re.fullmatch(r"\$HOME/(.+)\[(\w+)\]", arg):  # pip install -e $HOME/strata[serve]
                    assert local_path(config, "~/" + match.group(1)) == ROOT, f"{arg} is not the synced checkout"
                    assert f"\n{match.group(2)} = [" in (ROOT / "pyproject.toml").read_text(), arg
                if arg.startswith("torch=="):  # the torch every other install path pins
                    assert f"# {arg} " in (DEPLOY / "docker" / "requirements.lock").read_text()
    assert deployed == [DEPLOY / "serve" / "strata.yaml"]


@pytest.mark.parametrize("path", [p for p in CONFIGS if p.stem != "onprem"], ids=lambda p: p.stem)
def test_gpu_workers_are_sized_for_the_deployed_models(path):
    config = load(path)
    serve_config = yaml.safe_load((DEPLOY / "serve" / "strata.yaml").read_text())
    models = ClusterConfig.model_validate(serve_config["applications"][0]["args"]).models
    workers = [t for name, t in config["available_node_types"].items()
               if name != config["head_node_type"] and t["resources"].get("GPU")]
    (gpu_type,) = workers
    gpus = gpu_type["resources"]["GPU"]
    for m in models:
        assert m.tensor_parallel_size <= gpus, "a tensor-parallel group must fit on one node"
    nodes_per_replica = {m.served_name: -(-m.world_size // gpus) for m in models}
    assert gpu_type["min_workers"] == sum(m.min_replicas * nodes_per_replica[m.served_name] for m in models)
    assert gpu_type["max_workers"] == sum(m.max_replicas * nodes_per_replica[m.served_name] for m in models)
    assert config["max_workers"] >= gpu_type["max_workers"]


@pytest.mark.parametrize("path", [p for p in CONFIGS if "docker" in load(p)], ids=lambda p: p.stem)
def test_container_configs_run_the_strata_images(path):
    docker = load(path)["docker"]
    version = re.search(r'^version = "([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.M).group(1)
    assert docker["head_image"].endswith(f"/strata:{version}-cpu")
    assert docker["worker_image"].endswith(f"/strata:{version}-gpu")
    assert "--gpus all" in docker["worker_run_options"]


@pytest.mark.parametrize("mistake", [
    lambda c: c.__setitem__("head_start_commands", c.pop("head_start_ray_commands")),  # misspelt key
    lambda c: c["available_node_types"]["gpu_8x"]["resources"].__setitem__("GPU", "8"),  # wrong type
    lambda c: c["docker"].__setitem__("gpu_image", c["docker"].pop("worker_image")),
])
def test_rays_validation_catches_mistakes(mistake):
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = load(DEPLOY / "ray-up" / "aws.yaml")
    mistake(config)
    with pytest.raises(Exception, match="unexpected|is not of type|Must provide"):
        validate_config(prepare_config(config))
