"""Fixtures every test directory may use; engine-only ones are in tests/engine/conftest.py, helpers in
tests/support/."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before anything imports huggingface_hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

from tests.support.ray_cluster import local_serve, shutdown_ray  # noqa: E402

# `make test` runs the suite in pytest-xdist workers (--dist loadgroup). What shares the host's Ray and Serve (port
# 8000), or builds hosts in network namespaces and containers, runs in one worker each, in order; the rest spreads
# over the workers. Each worker keeps its Ray sessions under a temp dir of its own.
SERIAL_GROUPS = {
    "serve": ("tests/cluster/", "tests/reliability/", "tests/deploy/test_grafana_dashboard.py",
              "tests/deploy/test_load_balancer.py", "tests/benchmarks/test_experiments.py"),
    "hosts": ("tests/deploy/multinode/", "tests/deploy/test_images.py"),
}
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("RAY_TMPDIR", f"/tmp/ray-{os.environ['PYTEST_XDIST_WORKER']}")


def pytest_collection_modifyitems(config, items):
    root = str(config.rootpath) + "/"
    for item in items:
        path = str(item.path).removeprefix(root)
        for group, prefixes in SERIAL_GROUPS.items():
            if path.startswith(prefixes):
                item.add_marker(pytest.mark.xdist_group(group))


@pytest.fixture(scope="session", autouse=True)
def _ray_shut_down_at_the_end():
    yield
    shutdown_ray()


@pytest.fixture(scope="module")
def serve_url() -> str:
    """Base URL of the shared local Ray + Serve. Each module deploys its own app on it (serve_app.deploy) and
    deletes it at its end; Ray is started once, and again only after a module that needed a Ray of its own."""
    return local_serve()
