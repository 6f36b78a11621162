"""Tensor and pipeline parallel over Ray workers (gloo on CPU) give what one process gives; failures surface fast."""
import asyncio
import json
import os
import signal
from pathlib import Path

import psutil
import pytest
import ray

from engine import LLM, SamplingParams
from engine.config import EngineConfig
from engine.executor.ray import RayExecutor, RayWorker
from engine.model_setup import ModelSetup
from engine.parallel_state import DistributedInitError, balanced_layer_split, layer_ranges
from engine.step import BatchInput, NewSequence
from tests.support.polling import wait_for
from tests.support.prompts import random_prompts
from tests.support.ray_cluster import multi_node_cluster

PARAMS = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=3, prompt_logprobs=3)
PROMPTS = random_prompts(seed=11, lens=(5, 19, 40))


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    """kind -> single-process outputs."""
    cache = {}

    def get(kind):
        if kind not in cache:
            llm = LLM(str(tiny_model_dir(kind)))
            cache[kind] = llm.generate(PROMPTS, PARAMS, use_tqdm=False)
            llm.shutdown()
        return cache[kind]

    return get


def assert_same(outs, ref):
    for a, b in zip(outs, ref, strict=True):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        pairs = zip(a.outputs[0].logprobs + a.prompt_logprobs[1:], b.outputs[0].logprobs + b.prompt_logprobs[1:])
        for mine, theirs in pairs:
            assert mine.keys() == theirs.keys()
            assert list(mine.values()) == pytest.approx(list(theirs.values()), abs=1e-4)


def assert_gone(executor, pids):
    """No worker process, live actor or placement group is left behind."""
    wait_for(lambda: not any(alive(p) for p in pids), timeout=15, interval=0.2, what="the workers to exit")
    assert executor.pg is None and not executor.workers
    assert all(pg["state"] == "REMOVED" for pg in ray.util.placement_group_table().values())


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_layer_ranges():
    assert layer_ranges(7, 3) == [(0, 3), (3, 5), (5, 7)]
    assert layer_ranges(8, 2, [3, 5]) == [(0, 3), (3, 8)]
    with pytest.raises(ValueError, match="at least one layer"):
        layer_ranges(4, 2, [4, 0])


def test_the_default_split_gives_the_last_stage_fewer_layers_for_its_lm_head():
    from transformers import LlamaConfig

    llama3_8b = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                            num_key_value_heads=8, vocab_size=128256)
    assert balanced_layer_split(llama3_8b, 2) == [17, 15]
    assert balanced_layer_split(llama3_8b, 4) == [9, 9, 8, 6]
    small_vocab = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                              vocab_size=32)
    assert balanced_layer_split(small_vocab, 3) == [1, 1, 1]
    assert balanced_layer_split(small_vocab, 1) == [3]


@pytest.mark.parametrize("kind,tp,pp", [("llama", 2, 1), ("mistral", 2, 1), ("llama_tied_mha", 1, 2),
                                        ("qwen3", 2, 2), ("phi3", 2, 1)])
def test_parallel_matches_one_process(local_ray, tiny_model_dir, reference, tmp_path, kind, tp, pp):
    """mistral has one KV head, replicated over the two ranks; the tied model's last stage loads the embedding
    as its LM head; phi3's fused qkv/gate_up tensors split over the ranks. Every rank records what it runs while
    profiled."""
    llm = LLM(str(tiny_model_dir(kind)), tensor_parallel_size=tp, pipeline_parallel_size=pp)
    executor = llm.engine.executor
    try:
        nodes = executor.worker_nodes()
        assert [(n["stage"], n["tp_rank"]) for n in nodes] == [(s, t) for s in range(pp) for t in range(tp)]
        llm.start_profile(str(tmp_path))
        assert_same(llm.generate(PROMPTS, PARAMS, use_tqdm=False), reference(kind))
        traces = llm.stop_profile()
        assert len(traces) == len(nodes) and all(f"pid{n['pid']}" in t for t, n in zip(traces, nodes))
        for trace in traces:
            events = json.loads(Path(trace).read_text())["traceEvents"]
            assert any(e.get("name", "").startswith("aten::") for e in events)
        executor.check_health()
        if pp > 1:
            pipelined_steps_match(executor, reference(kind))
    finally:
        llm.shutdown()
    assert_gone(executor, [n["pid"] for n in nodes])


def pipelined_steps_match(executor, ref):
    """Two sequences in alternate steps, the next step submitted before the previous one finished."""
    seqs = {i: list(PROMPTS[i]) for i in (0, 1)}
    tables = {0: list(range(0, 8)), 1: list(range(8, 16))}
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    out = {0: [], 1: []}

    def submit(i):
        tokens = seqs[i] if not out[i] else out[i][-1:]
        start = 0 if not out[i] else len(seqs[i]) + len(out[i]) - 1
        new = [NewSequence(f"p{i}", seqs[i], params, None, [])] if not out[i] else []
        return executor.execute_async(BatchInput([f"p{i}"], [tokens], [start], [tables[i]], [True], new))

    inflight = [(0, submit(0)), (1, submit(1))]
    while inflight:
        i, handle = inflight.pop(0)
        out[i].append(executor.wait(handle).sampled[f"p{i}"].token_id)
        if len(out[i]) < params.max_tokens:
            inflight.append((i, submit(i)))
    assert [out[0], out[1]] == [ref[0].outputs[0].token_ids, ref[1].outputs[0].token_ids]


@pytest.mark.parametrize("kind,tp,pp,ep,local_experts", [("olmoe", 2, 1, False, 7), ("qwen3_moe", 2, 1, True, 3),
                                                         ("qwen2_moe", 1, 2, False, 4)])
def test_mixture_of_experts_in_parallel_matches_one_process(local_ray, tiny_model_dir, reference, kind, tp, pp, ep,
                                                            local_experts):
    """olmoe: every expert's intermediate dim and the whole-projection q/k norms split over two ranks; qwen3_moe:
    its five experts placed three and two (expert parallel); qwen2_moe: its dense and sparse layers over two
    stages (rank 0 holds its one sparse layer's four experts)."""
    llm = LLM(str(tiny_model_dir(kind)), tensor_parallel_size=tp, pipeline_parallel_size=pp,
              enable_expert_parallel=ep)
    try:
        assert llm.engine.executor.describe()["local_experts"] == local_experts
        assert_same(llm.generate(PROMPTS, PARAMS, use_tqdm=False), reference(kind))
    finally:
        llm.shutdown()


def test_hung_worker_fails_the_health_check(local_ray, tiny_model_dir):
    llm = LLM(str(tiny_model_dir("llama")), tensor_parallel_size=2)
    executor = llm.engine.executor
    executor.health_timeout_s = 2.0
    pid = executor.worker_nodes()[1]["pid"]
    os.kill(pid, signal.SIGSTOP)
    try:  # the check gives up on the stopped rank after its timeout instead of waiting for it
        with pytest.raises(RuntimeError, match=r"rank 1 \(node .*pid %d\) did not answer a ping" % pid):
            executor.check_health()
        with pytest.raises(RuntimeError, match="executor is down"):
            llm.generate(PROMPTS[:1], PARAMS, use_tqdm=False)
    finally:
        os.kill(pid, signal.SIGCONT)
        llm.shutdown()
    assert_gone(executor, [pid])


def test_a_killed_worker_fails_the_next_step_through_shared_memory(local_ray, tiny_model_dir):
    llm = LLM(str(tiny_model_dir("llama")), tensor_parallel_size=2)
    executor = llm.engine.executor
    assert executor.batches is not None  # every worker on this node: steps go through shared memory
    pids = [n["pid"] for n in executor.worker_nodes()]
    try:
        llm.generate(PROMPTS[:1], PARAMS, use_tqdm=False)
        os.kill(pids[1], signal.SIGKILL)
        with pytest.raises(RuntimeError, match=r"rank 1 \(node .*pid %d\) failed to run a step" % pids[1]):
            llm.generate(PROMPTS[:1], PARAMS, use_tqdm=False)
        with pytest.raises(RuntimeError, match="executor is down"):
            executor.check_health()
    finally:
        llm.shutdown()
    assert_gone(executor, pids)


def test_a_rank_that_never_joins_is_named(local_ray, tiny_model_dir):
    class NeverJoins(RayWorker):
        async def init_distributed(self, rank, *args):
            if rank == 1:
                await asyncio.sleep(3600)
            return await super().init_distributed(rank, *args)

    class Executor(RayExecutor):
        worker_cls = NeverJoins

    config = EngineConfig(model=str(tiny_model_dir("llama")), tensor_parallel_size=2)
    setup = ModelSetup.from_config(config)
    before = set(ray.util.placement_group_table())
    with pytest.raises(DistributedInitError, match=r"rank 1 \(node \w+, [\d.]+, pid \d+\) did not join the process "
                                                   r"group at tcp://[\d.]+:\d+ within 5 s") as e:
        Executor(config.model_copy(update={"distributed_init_timeout_s": 5}), setup.runner_kwargs())
    assert e.value.missing == [1]
    new = set(ray.util.placement_group_table()) - before
    assert all(ray.util.placement_group_table()[pg]["state"] == "REMOVED" for pg in new)


@pytest.fixture
def two_nodes():
    with multi_node_cluster(head={"num_cpus": 1}, workers=[{"num_cpus": 1}]) as cluster:
        yield cluster


def test_workers_on_two_nodes_match_and_a_dead_worker_fails_the_health_check(two_nodes, tiny_model_dir, reference):
    # one CPU per node: PACK has to spread. Async scheduling sends step n+1 while n runs (the Ray-call path then
    # launches n+1 on a rank before finishing n); PARAMS asks for prompt logprobs, whose finish gathers over TP.
    llm = LLM(str(tiny_model_dir("llama")), tensor_parallel_size=2, async_scheduling=True)
    executor = llm.engine.executor
    nodes = executor.worker_nodes()
    try:
        print("workers:", [(n["rank"], n["node_id"][:12]) for n in nodes])
        assert len({n["node_id"] for n in nodes}) == 2
        assert_same(llm.generate(PROMPTS, PARAMS, use_tqdm=False), reference("llama"))
        executor.check_health()
        os.kill(nodes[1]["pid"], signal.SIGKILL)
        dead = r"rank 1 \(node %s.*\) (died|did not answer)" % nodes[1]["node_id"][:12]
        with pytest.raises(RuntimeError, match=dead):
            executor.check_health()
    finally:
        llm.shutdown()
    assert_gone(executor, [n["pid"] for n in nodes])
