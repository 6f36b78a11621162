"""Async scheduling (step n+1 scheduled and launched before step n's tokens reach the host) must generate
exactly what synchronous steps generate, whatever the sampling options, cache pressure or aborts.

On CPU the launch is not really asynchronous, but the bookkeeping is the same as on CUDA: steps decode
placeholder tokens that the worker fills from the previous step's sampled tokens."""
import pytest

from engine import LLM, SamplingParams
from engine.step import PENDING_TOKEN
from tests.support.prompts import random_prompts

PROMPTS = random_prompts(seed=21, lens=(7, 40, 61, 90, 23, 3))
MIXED = [
    SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, logprobs=2),
    SamplingParams(temperature=0.8, top_p=0.9, seed=5, n=2, max_tokens=17, ignore_eos=True),
    SamplingParams(temperature=0, max_tokens=25, ignore_eos=True, presence_penalty=0.5, repetition_penalty=1.2),
    SamplingParams(temperature=0.7, top_k=20, seed=9, max_tokens=12, min_tokens=8, prompt_logprobs=1),
    SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, stop_token_ids=[17, 99]),
    SamplingParams(temperature=0, max_tokens=1, ignore_eos=True),
]


def run(path, async_scheduling: bool, **options):
    llm = LLM(path, async_scheduling=async_scheduling, **options)
    launched = []
    if async_scheduling:  # record what was launched (a spy: every call goes through unchanged)
        execute_async = llm.engine.executor.execute_async
        llm.engine.executor.execute_async = lambda batch: launched.append(batch) or execute_async(batch)
    outs = llm.generate(PROMPTS, MIXED, use_tqdm=False)
    stats = llm.stats()
    llm.shutdown()
    return outs, stats, launched


def assert_same(got, expected):
    """Same tokens and finish reasons; logprobs equal up to float noise (batches are composed differently)."""
    for a, b in zip(got, expected, strict=True):
        assert [(c.token_ids, c.finish_reason) for c in a.outputs] == [(c.token_ids, c.finish_reason) for c in b.outputs]
        pairs = [(x, y) for ca, cb in zip(a.outputs, b.outputs) for x, y in zip(ca.logprobs or [], cb.logprobs or [])]
        pairs += list(zip((a.prompt_logprobs or [])[1:], (b.prompt_logprobs or [])[1:]))
        for x, y in pairs:
            assert x.keys() == y.keys()
            assert list(x.values()) == pytest.approx(list(y.values()), abs=1e-4)


@pytest.mark.parametrize("options", [
    {},
    {"max_num_batched_tokens": 16},  # chunked prefill: chunks of one prompt run ahead of each other
    {"num_kv_blocks": 10, "block_size": 16},  # preemption: an ahead step that would need one is not launched
    {"num_kv_blocks": 12, "enable_prefix_caching": False},
], ids=["default", "chunked", "preempting", "no-prefix-cache"])
def test_async_scheduling_generates_what_synchronous_steps_do(tiny_model_dir, options):
    assert_async_matches_sync(str(tiny_model_dir("llama")), options, ahead_share=1 / 2)


def assert_async_matches_sync(path, options, ahead_share, **parallel):
    """Async steps (over `parallel` workers) give what one process's synchronous steps give, free every block,
    and more than `ahead_share` of the launched steps decode tokens the host has not seen yet."""
    expected, _, _ = run(path, False, **options)
    got, stats, launched = run(path, True, **parallel, **options)
    assert_same(got, expected)
    assert stats.kv_blocks_used == 0
    ahead = [b for b in launched if any(t and t[-1] == PENDING_TOKEN for t in b.token_ids)]
    assert len(ahead) > len(launched) * ahead_share, "most steps should decode tokens the host has not seen yet"
    if "num_kv_blocks" in options:
        assert stats.preemptions > 0


@pytest.mark.parametrize("pp", [1, 2])
def test_abort_while_steps_are_in_flight_frees_every_block(tiny_model_dir, request, pp):
    if pp > 1:
        request.getfixturevalue("local_ray")
    llm = LLM(str(tiny_model_dir("llama")), async_scheduling=True, pipeline_parallel_size=pp)
    core = llm.engine
    for i, p in enumerate(PROMPTS):
        core.add_request(f"r{i}", p, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))
    received = {f"r{i}": 0 for i in range(len(PROMPTS))}
    for _ in range(4):
        for d in core.step():
            received[d.request_id] += len(d.token_ids)
    assert core.in_flight, "a step should be in flight between calls"
    aborted = {f"r{i}" for i in range(0, len(PROMPTS), 2)}
    for rid in aborted:
        core.abort(rid)
    before = dict(received)
    while core.has_work:
        for d in core.step():
            assert d.request_id not in aborted
            received[d.request_id] += len(d.token_ids)
    assert all(received[r] == before[r] for r in aborted)
    assert all(received[r] == 40 for r in received if r not in aborted)
    assert llm.stats().kv_blocks_used == 0
    llm.shutdown()


def test_async_scheduling_over_tensor_parallel_workers(tiny_model_dir, local_ray):
    """Each TP rank fills the placeholders from its own copy of the previous step's tokens."""
    path = str(tiny_model_dir("llama"))
    expected, _, _ = run(path, False)
    got, stats, launched = run(path, True, tensor_parallel_size=2)
    assert_same(got, expected)
    assert stats.kv_blocks_used == 0
    assert any(any(t and t[-1] == PENDING_TOKEN for t in b.token_ids) for b in launched)


@pytest.mark.parametrize("options", [{}, {"num_kv_blocks": 10, "block_size": 16, "max_num_batched_tokens": 32}],
                         ids=["default", "chunked-preempting"])
def test_async_scheduling_over_pipeline_stages(tiny_model_dir, local_ray, options):
    """Each micro-batch's next step leaves the driver before its tokens come back: the first stage fills the
    placeholders from the last stage's outputs."""
    assert_async_matches_sync(str(tiny_model_dir("llama")), options, ahead_share=1 / 3, pipeline_parallel_size=2)
