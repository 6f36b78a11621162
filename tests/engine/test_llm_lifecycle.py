"""`LLM` releases its Ray workers and placement group on shutdown(), at the end of a `with`, and when collected:
the next TP=2 `LLM` of the same process gets the room. Ray here has exactly the two CPUs one TP=2 LLM takes, so a
leftover placement group leaves the next LLM no room (it fails within distributed_init_timeout_s)."""
import gc

import psutil
import pytest
import ray

from engine import LLM, SamplingParams
from tests.support.polling import wait_for

PARAMS = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
PROMPTS = [[1, 2, 3, 4, 5], [7, 8, 9]]


@pytest.fixture(scope="module")
def two_cpu_ray():
    ray.shutdown()
    ray.init(address="local", num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def expected(tiny_model_dir):
    llm = LLM(str(tiny_model_dir("llama")), device="cpu")
    outs = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, PARAMS, use_tqdm=False)]
    llm.shutdown()
    return outs


def tp2_llm(tiny_model_dir) -> LLM:
    return LLM(str(tiny_model_dir("llama")), device="cpu", tensor_parallel_size=2, distributed_init_timeout_s=30)


def generates(llm: LLM, expected) -> list[int]:
    """The worker pids of an LLM that generated what one process does."""
    assert [o.outputs[0].token_ids for o in llm.generate(PROMPTS, PARAMS, use_tqdm=False)] == expected
    return [n["pid"] for n in llm.engine.executor.worker_nodes()]


def assert_released(pids: list[int]) -> None:
    """No worker process, placement group or reserved CPU is left."""
    wait_for(lambda: not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE
                             for p in pids), 30, what="the worker processes to exit")
    assert all(pg["state"] == "REMOVED" for pg in ray.util.placement_group_table().values())
    wait_for(lambda: ray.available_resources().get("CPU") == 2, 30, what="Ray to get its two CPUs back")


def shut_down(llm):
    llm.shutdown()
    llm.shutdown()  # a second call does nothing


def left_in_a_with(llm):
    with llm:
        pass


def dropped(llm):
    pass  # the test drops its reference next: the LLM is garbage then


@pytest.mark.parametrize("release", [shut_down, left_in_a_with, dropped])
def test_a_released_llm_leaves_room_for_the_next(two_cpu_ray, tiny_model_dir, expected, release):
    first = tp2_llm(tiny_model_dir)
    executor = first.engine.executor
    pids = generates(first, expected)
    release(first)
    del first
    gc.collect()
    assert_released(pids)
    assert executor.is_dead and executor.pg is None and not executor.workers
    with tp2_llm(tiny_model_dir) as second:
        pids = generates(second, expected)
    assert_released(pids)
