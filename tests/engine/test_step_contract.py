"""The step contract: torch-free step types, one Executor protocol, one device decision, no import cycles."""
import ast
import inspect
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine.config import EngineConfig
from engine.executor import Executor
from engine.executor.local import LocalExecutor
from engine.executor.ray import RayExecutor
from engine.model_runner import LaunchedStep, ModelRunner
from engine.model_setup import ModelSetup, shard_device

ENGINE = Path(__file__).parents[2] / "engine"


def test_the_step_types_and_the_executor_protocol_load_without_torch():
    code = "import sys, engine.step, engine.executor; print(sorted(m for m in ('torch', 'ray') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def engine_imports() -> dict[str, set[str]]:
    """module -> the engine modules it imports, at the top or inside a function (a lazy import is still an edge)."""
    graph = {}
    for path in ENGINE.rglob("*.py"):
        parts = path.relative_to(ENGINE.parent).with_suffix("").parts
        module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                edges.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                edges.add(node.module)
        graph[module] = {e for e in edges if e.startswith("engine.") and e != module}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for n in sorted(graph.get(m, ())):
            if state.get(n) == "open":
                return stack[stack.index(n):] + [n]
            if n not in state and (cycle := visit(n)):
                return cycle
        state[m] = "done"
        stack.pop()
        return None

    for m in sorted(graph):
        if m not in state and (cycle := visit(m)):
            return cycle
    return None


def test_engine_modules_import_each_other_without_cycles():
    graph = engine_imports()
    assert "engine.executor.ray" in graph["engine.model_setup"]  # the graph sees imports inside functions
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_find_cycle_finds_a_lazy_import_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


PROTOCOL_MEMBERS = sorted(n for n in vars(Executor) if not n.startswith("_"))


@pytest.mark.parametrize("cls,handle", [(LocalExecutor, "LaunchedStep"), (RayExecutor, "int")])
def test_each_executor_implements_the_protocol_with_one_handle_type(cls, handle):
    assert "is_dead" in PROTOCOL_MEMBERS and "execute_async" in PROTOCOL_MEMBERS
    for name in PROTOCOL_MEMBERS:
        wanted, given = inspect.getattr_static(Executor, name), inspect.getattr_static(cls, name)
        if isinstance(wanted, property):
            assert isinstance(given, property), name
        else:
            assert list(inspect.signature(given).parameters) == list(inspect.signature(wanted).parameters), name
    sig = inspect.signature
    assert sig(cls.execute_async).return_annotation == handle
    assert sig(cls.wait).parameters["handle"].annotation == sig(cls.discard).parameters["handle"].annotation == handle
    assert sig(ModelRunner.launch).return_annotation == "LaunchedStep"
    assert LaunchedStep.__module__ == "engine.model_runner"


def test_a_local_executor_is_one_and_is_dead_once_shut_down(tiny_model_dir):
    setup = ModelSetup.from_config(EngineConfig(model=str(tiny_model_dir("llama")), device="cpu"))
    executor = setup.make_executor()
    assert isinstance(executor, LocalExecutor) and isinstance(executor, Executor)
    assert not executor.is_dead
    executor.check_health()
    executor.shutdown()
    executor.shutdown()
    assert executor.is_dead
    with pytest.raises(RuntimeError, match="executor is down"):
        executor.check_health()


def test_the_device_is_decided_once_from_the_config(tiny_model_dir):
    model = str(tiny_model_dir("llama"))
    assert shard_device(EngineConfig(model=model, device="cpu")) == torch.device("cpu")
    here = "cuda" if torch.cuda.is_available() else "cpu"
    assert shard_device(EngineConfig(model=model)) == torch.device(here)
    setup = ModelSetup.from_config(EngineConfig(model=model, device="cpu"))
    assert setup.runner_kwargs()["device"] == setup.device == torch.device("cpu")
    assert (setup.dtype, setup.max_num_batched_tokens, setup.max_num_seqs) == (torch.float32, 2048, 256)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU is visible"):
            shard_device(EngineConfig(model=model, device="cuda"))


def test_shards_of_a_replica_without_a_gpu_run_on_the_ray_clusters_gpus(tiny_model_dir):
    """A Serve replica of several shards holds no GPU itself; its workers take the cluster's. One GPU is declared
    to Ray here, so this holds on a CPU machine too."""
    import ray

    if torch.cuda.is_available():
        pytest.skip("this process sees a GPU: the shards run on CUDA for that reason alone")
    model = str(tiny_model_dir("llama"))
    ray.shutdown()
    ray.init(address="local", num_cpus=1, num_gpus=1, include_dashboard=False)
    try:
        setup = ModelSetup.from_config(EngineConfig(model=model, tensor_parallel_size=2))
        assert setup.device == setup.runner_kwargs()["device"] == torch.device("cuda")
        assert (setup.dtype, setup.max_num_batched_tokens, setup.max_num_seqs) == (torch.bfloat16, 8192, 1024)
        assert shard_device(EngineConfig(model=model, tensor_parallel_size=2, device="cuda")).type == "cuda"
        assert shard_device(EngineConfig(model=model)).type == "cpu"  # one shard runs here, where no GPU is
    finally:
        ray.shutdown()
