"""Fixtures every test directory may use; engine-only ones are in tests/engine/conftest.py, helpers in
tests/support/."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before anything imports huggingface_hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

from tests.support.ray_cluster import local_serve, shutdown_ray  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def _ray_shut_down_at_the_end():
    yield
    shutdown_ray()


@pytest.fixture(scope="module")
def serve_url() -> str:
    """Base URL of the shared local Ray + Serve. Each module deploys its own app on it (serve_app.deploy) and
    deletes it at its end; Ray is started once, and again only after a module that needed a Ray of its own."""
    return local_serve()
