"""Scheduling must never change what is generated: chunked prefill, preemption, prefix hits, n > 1, priority."""
import pytest

from engine import LLM, SamplingParams
from tests.support.prompts import random_prompts

GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)


@pytest.fixture(scope="module")
def reference(tiny_llm):
    prompts = random_prompts(seed=2, lens=(7, 40, 61, 90, 23))
    outs = tiny_llm.generate(prompts, GREEDY, use_tqdm=False)
    return prompts, [o.outputs[0].token_ids for o in outs]


def tokens(outs):
    return [o.outputs[0].token_ids for o in outs]


def test_chunked_prefill_gives_the_same_tokens(tiny_model_dir, reference):
    prompts, expected = reference
    llm = LLM(str(tiny_model_dir("llama")), max_num_batched_tokens=16, enable_prefix_caching=False)
    assert tokens(llm.generate(prompts, GREEDY, use_tqdm=False)) == expected
    # 221 prompt tokens at 16 per step take at least 14 steps of prefill before the last prompt samples.
    assert llm.stats().steps >= 221 // 16 + GREEDY.max_tokens


def test_preemption_under_a_tiny_kv_cache_gives_the_same_tokens(tiny_model_dir, reference):
    prompts, expected = reference
    llm = LLM(str(tiny_model_dir("llama")), num_kv_blocks=9, block_size=16)  # 144 tokens for ~350 needed
    assert tokens(llm.generate(prompts, GREEDY, use_tqdm=False)) == expected
    stats = llm.stats()
    assert stats.preemptions > 0
    assert stats.kv_blocks_used == 0


def test_preemption_with_prefix_caching_off(tiny_model_dir, reference):
    prompts, expected = reference
    llm = LLM(str(tiny_model_dir("llama")), num_kv_blocks=9, enable_prefix_caching=False)
    assert tokens(llm.generate(prompts, GREEDY, use_tqdm=False)) == expected
    assert llm.stats().preemptions > 0


def test_shared_prefixes_hit_the_cache_and_give_the_same_tokens(tiny_model_dir):
    system = random_prompts(seed=3, lens=(50,))[0]
    prompts = [system + tail for tail in random_prompts(seed=4, lens=(3, 9, 20))]
    cold = LLM(str(tiny_model_dir("llama")), enable_prefix_caching=False)
    expected = tokens(cold.generate(prompts, GREEDY, use_tqdm=False))
    warm = LLM(str(tiny_model_dir("llama")))
    first = warm.generate(prompts[:1], GREEDY, use_tqdm=False)
    assert first[0].num_cached_tokens == 0
    rest = warm.generate(prompts[1:], GREEDY, use_tqdm=False)
    assert tokens(first + rest) == expected
    assert all(o.num_cached_tokens == 48 for o in rest)  # three full blocks of the 50-token system prompt
    stats = warm.stats()
    assert stats.prefix_cache_hits == 96 and stats.prefix_cache_queries == sum(map(len, prompts))
    assert stats.kv_blocks_used == 0


def test_a_fully_cached_prompt_still_samples(tiny_llm):
    prompt = random_prompts(seed=5, lens=(32,))[0]  # exactly two blocks
    a = tiny_llm.generate([prompt], GREEDY, use_tqdm=False)[0]
    b = tiny_llm.generate([prompt], GREEDY, use_tqdm=False)[0]
    assert a.outputs[0].token_ids == b.outputs[0].token_ids
    assert b.num_cached_tokens == 16  # the last block is recomputed to get logits


def test_n_completions_share_the_prompt_blocks(tiny_model_dir):
    llm = LLM(str(tiny_model_dir("llama")), enable_prefix_caching=False)
    prompt = random_prompts(seed=6, lens=(40,))[0]
    greedy = llm.generate([prompt], GREEDY, use_tqdm=False)[0].outputs[0].token_ids
    core = llm.engine
    core.add_request("fan", prompt, SamplingParams(n=3, temperature=0, max_tokens=24, ignore_eos=True))
    shared = None
    outputs = {0: [], 1: [], 2: []}
    while core.has_work:
        for d in core.step():
            outputs[d.index] += d.token_ids
        seqs = [r for r in core.scheduler.running if r.request_id.startswith("fan#")]
        if len(seqs) == 3 and shared is None:
            shared = [r.block_ids[:2] for r in seqs]
    assert shared[0] == shared[1] == shared[2]  # the prompt's two full blocks, held once
    assert all(outputs[i] == greedy for i in range(3))
    assert core.stats().kv_blocks_used == 0


def test_n_seeded_samples_differ_and_reproduce(tiny_llm):
    p = SamplingParams(n=3, temperature=1.0, seed=11, max_tokens=12, ignore_eos=True)
    a = tiny_llm.generate(["Once upon a time"], p, use_tqdm=False)[0]
    b = tiny_llm.generate(["Once upon a time"], p, use_tqdm=False)[0]
    assert [c.token_ids for c in a.outputs] == [c.token_ids for c in b.outputs]
    assert len({tuple(c.token_ids) for c in a.outputs}) == 3


def test_priority_policy_runs_urgent_requests_first(tiny_model_dir):
    llm = LLM(str(tiny_model_dir("llama")), max_num_seqs=1, scheduling_policy="priority")
    core = llm.engine
    core.add_request("late", [5, 6, 7], SamplingParams(max_tokens=4, ignore_eos=True, priority=5))
    core.add_request("urgent", [8, 9, 10], SamplingParams(max_tokens=4, ignore_eos=True, priority=-1))
    finished = []
    while core.has_work:
        finished += [d.request_id for d in core.step() if d.finish_reason]
    assert finished == ["urgent", "late"]


def test_pipeline_steps_split_the_running_batch():
    """With pp micro-batches each step takes at most 1/pp of the sequences; the steps in flight take disjoint
    halves, so both pipeline stages have work every step."""
    from engine.kv_cache import KVCacheManager
    from engine.request import Request
    from engine.scheduler import Scheduler

    sched = Scheduler(KVCacheManager(256, 16), max_num_seqs=8, max_num_batched_tokens=512, micro_batches=2)
    params = SamplingParams(max_tokens=20, ignore_eos=True)
    for i in range(8):
        sched.add(Request(f"r{i}", [i + 3] * 10, params, set(), 20))

    def launch():
        out = sched.schedule()
        for s in out.scheduled:
            s.req.in_flight = True
        sched.advance(out)
        return out, {s.req.request_id for s in out.scheduled}

    (first, a), (_, b) = launch(), launch()
    assert len(a) == len(b) == 4 and not a & b and a | b == {f"r{i}" for i in range(8)}
    sched.update(first, {rid: 7 for rid in a})  # the older step comes back
    for s in first.scheduled:
        s.req.in_flight = False
    third, c = launch()
    assert c == a and all(s.num_new_tokens == 1 and s.sample for s in third.scheduled)


def test_pipeline_steps_split_few_sequences_and_decode_ahead():
    """However few sequences run, the pp steps in flight split them; a step decodes ahead the sequences of the
    step one round older, and with a single sequence each step follows the previous one directly."""
    from engine.kv_cache import KVCacheManager
    from engine.request import Request
    from engine.scheduler import Scheduler

    def scheduler(n):
        sched = Scheduler(KVCacheManager(256, 16), max_num_seqs=256, max_num_batched_tokens=512, micro_batches=2)
        for i in range(n):
            sched.add(Request(f"r{i}", [i + 3] * 10, SamplingParams(max_tokens=20, ignore_eos=True), set(), 20))
        return sched

    def launch(sched):
        out = sched.schedule(ahead=True)
        sched.advance(out)
        return {s.req.request_id for s in out.scheduled}

    four = scheduler(4)
    a, b = launch(four), launch(four)
    assert len(a) == len(b) == 2 and not a & b
    assert launch(four) == a  # pending tokens from step 1, two steps back
    assert launch(four) == b
    assert launch(four) == set()  # every sequence has a step in flight that has not come back
    one = scheduler(1)
    assert launch(one) == launch(one) == {"r0"}
