import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from tiny_models import CONFIGS, make_tiny_model  # noqa: E402


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


ALL_KINDS = list(CONFIGS)


@pytest.fixture(scope="module")
def local_ray():
    """A Ray of our own (not one another test run left), with more logical CPUs than the machine: one per
    tensor/pipeline-parallel worker."""
    import ray

    ray.shutdown()
    ray.init(address="local", num_cpus=8, include_dashboard=False)
    yield
    ray.shutdown()
