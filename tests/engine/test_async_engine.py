"""AsyncEngine: streams, aborts that free blocks, concurrent requests, stats and health, with the engine loop on a
thread or in its own process."""
import asyncio

import pytest

from engine import AsyncEngine, SamplingParams


@pytest.fixture(scope="module", params=[False, True], ids=["loop-thread", "loop-process"])
def engine(tiny_model_dir, request):
    """Every test runs against the engine loop on a thread of this process and in a process of its own."""
    eng = AsyncEngine(model=str(tiny_model_dir("llama")), engine_core_process=request.param)
    yield eng
    eng.shutdown()


async def collect(engine, rid, prompt, params):
    return [d async for d in engine.add_request(rid, prompt, params)]


def test_stream_matches_offline_generation(engine, tiny_llm):
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    expected = tiny_llm.generate(["Hello there"], params, use_tqdm=False)[0].outputs[0]
    deltas = asyncio.run(collect(engine, "a", "Hello there", params))
    assert [t for d in deltas for t in d.token_ids] == expected.token_ids
    assert "".join(d.text for d in deltas) == expected.text
    assert deltas[0].prompt_token_ids == engine.tokenizer.encode("Hello there")
    assert deltas[-1].finish_reason == "length" and all(d.finish_reason is None for d in deltas[:-1])


def test_concurrent_requests_with_n(engine):
    async def main():
        return await asyncio.gather(*[collect(engine, f"c{i}", [3 + i] * (5 + i),
                                              SamplingParams(n=2, max_tokens=8, ignore_eos=True, seed=i))
                                      for i in range(6)])
    for deltas in asyncio.run(main()):
        assert sorted(d.index for d in deltas if d.finish_reason) == [0, 1]
        assert sum(len(d.token_ids) for d in deltas) == 16


def test_a_consumer_that_falls_behind_gets_the_piled_up_deltas_merged(engine, tiny_llm):
    """A slow reader (a busy server loop) gets fewer, larger deltas: the same tokens, text and logprobs, each
    completion's deltas in order, and the end still marked on the last one."""
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, logprobs=1, n=2, seed=1)
    expected = tiny_llm.generate(["Hello slow reader"], params, use_tqdm=False)[0].outputs

    async def slow():
        out = []
        async for d in engine.add_request("slow", "Hello slow reader", params):
            out.append(d)
            await asyncio.sleep(0.05)
        return out

    deltas = asyncio.run(slow())
    assert len(deltas) < 60 and max(len(d.token_ids) for d in deltas) > 1
    for completion in expected:
        mine = [d for d in deltas if d.index == completion.index]
        assert [t for d in mine for t in d.token_ids] == completion.token_ids
        assert "".join(d.text for d in mine) == completion.text
        assert sum(len(d.logprobs) for d in mine) == len(completion.token_ids)
        assert mine[-1].finish_reason == "length" and all(d.finish_reason is None for d in mine[:-1])


def test_a_paced_stream_sends_the_first_token_at_once_then_chunks(engine, tiny_llm):
    """A server pacing its messages (stream_interval) gets the first delta without waiting for the interval,
    then deltas at least the interval apart that carry every token in order, the tokens in between merged."""
    import time

    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    expected = tiny_llm.generate(["Pace me"], params, use_tqdm=False)[0].outputs[0]

    async def paced(interval):
        got, asked = [], []  # (arrival, delta); how many deltas had arrived each time the stream asked the interval

        def stream_interval():
            asked.append(len(got))
            return interval

        async for d in engine.add_request(f"paced-{interval}", "Pace me", params, stream_interval=stream_interval):
            got.append((time.monotonic(), d))
        return got, asked

    for interval in (0.03, 1.0):
        got, asked = asyncio.run(paced(interval))
        deltas = [d for _, d in got]
        assert [t for d in deltas for t in d.token_ids] == expected.token_ids
        assert "".join(d.text for d in deltas) == expected.text
        assert asked and asked[0] >= 1  # the first delta went out before the interval was ever consulted
        gaps = [b - a for (a, _), (b, _) in zip(got, got[1:])]
        # The pacing itself (a least spacing, which a slow machine only widens); the final delta may come early.
        assert min(gaps[:-1] or [interval]) >= interval * 0.8
        if interval == 1.0:  # one delta a second: the tokens generated in between were merged
            assert len(deltas) < len(expected.token_ids)


def test_closing_a_stream_aborts_and_frees_its_blocks(engine):
    async def main():
        stream = engine.add_request("long", [7] * 40, SamplingParams(max_tokens=500, ignore_eos=True))
        seen = 0
        async for _ in stream:
            seen += 1
            if seen == 3:
                break
        await stream.aclose()
        for _ in range(100):
            await asyncio.sleep(0.02)
            s = engine.stats()
            if s.running == 0 and s.kv_blocks_used == 0:
                return s
        return engine.stats()
    stats = asyncio.run(main())
    assert stats.running == 0 and stats.waiting == 0 and stats.kv_blocks_used == 0


def test_bad_input_raises_before_streaming(engine):
    async def main():
        with pytest.raises(ValueError, match="empty"):
            engine.add_request("bad", [], SamplingParams())
    asyncio.run(main())
    engine.check_health()


def test_stats_count_tokens(engine):
    s = engine.stats()
    assert s.prompt_tokens > 0 and s.generation_tokens > 0 and s.kv_blocks_total > 0


def test_an_engine_process_that_dies_ends_every_stream_and_refuses_new_requests(tiny_model_dir):
    """The engine process killed mid-request: the open stream ends with an error instead of hanging, and the
    engine reports itself down (health check, new requests)."""
    import os
    import signal

    from engine import EngineDeadError

    eng = AsyncEngine(model=str(tiny_model_dir("llama")), engine_core_process=True)

    async def main():
        stream = eng.add_request("doomed", [7] * 20, SamplingParams(max_tokens=400, ignore_eos=True))
        first = await anext(stream)
        os.kill(eng._loop._process.pid, signal.SIGKILL)
        rest = [d async for d in stream]
        return first, rest

    try:
        first, rest = asyncio.run(main())
        assert first.token_ids and rest and rest[-1].error is not None
        assert eng.errored
        with pytest.raises(EngineDeadError):
            eng.check_health()

        async def add():
            eng.add_request("after", [7] * 4, SamplingParams(max_tokens=4))
        with pytest.raises(EngineDeadError):
            asyncio.run(add())
    finally:
        eng.shutdown()
