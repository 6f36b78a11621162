"""Engine fixtures: tiny random checkpoints, one shared engine over the tiny Llama, and a Ray of the module's own
for tensor/pipeline-parallel workers."""
from pathlib import Path

import pytest

from tests.support.checkpoints import make_tiny_model
from tests.support.ray_cluster import local_ray as start_local_ray
from tests.support.ray_cluster import shutdown_ray


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A callable: kind -> directory of a tiny random checkpoint of that kind (built once per session)."""
    built = {}

    def get(kind: str = "llama") -> Path:
        if kind not in built:
            built[kind] = make_tiny_model(kind, tmp_path_factory.mktemp("models") / kind)
        return built[kind]

    return get


@pytest.fixture(scope="session")
def tiny_llm(tiny_model_dir):
    """A shared engine over the tiny Llama (GQA, llama3 rope scaling), default settings."""
    from engine import LLM

    return LLM(str(tiny_model_dir("llama")), max_num_seqs=16)


@pytest.fixture(scope="module")
def local_ray():
    """A Ray of this module's own, with a logical CPU for each tensor/pipeline-parallel worker."""
    start_local_ray(num_cpus=8)
    yield
    shutdown_ray()
