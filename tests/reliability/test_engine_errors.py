"""An engine exception inside one request fails that request only (500, OpenAI's error shape) and the engine
goes on serving the others, with outputs unchanged.

The culprit is real: a checkpoint whose embedding row for one token is NaN (tests/support/checkpoints.py,
make_poisoned_model), so any prompt holding that token drives the model to NaN logits, the way corrupt weights
or an overflow do. The engine's step raises for the whole batch; the engine reruns the batch's requests one at
a time, fails the one at fault, and never lets its NaN keys/values reach another request through a reused
KV block.
"""
from __future__ import annotations

import concurrent.futures
import logging

import pytest

from cluster.config import ClusterConfig, ModelConfig, engine_deployment_name
from engine import SamplingParams
from tests.support.checkpoints import POISON_TOKEN, make_poisoned_model
from tests.support.http_clients import completion
from tests.support.polling import wait_for
from tests.support.prompts import TEXTS
from tests.support.serve_app import deploy, engine_stats

GREEDY = dict(temperature=0, max_tokens=24, ignore_eos=True)
POISONED_PROMPT = [40, 41, POISON_TOKEN, 42] + list(range(100, 160))  # spans four KV blocks


@pytest.fixture(scope="module")
def poisoned_dir(tmp_path_factory):
    return make_poisoned_model(tmp_path_factory.mktemp("models") / "poisoned")


@pytest.fixture(scope="module")
def reference(poisoned_dir):
    """Greedy outputs of TEXTS from a fresh engine over the same checkpoint (none holds the poisoned token)."""
    from engine import LLM

    llm = LLM(str(poisoned_dir), num_kv_blocks=64)
    outs = llm.generate(TEXTS, SamplingParams(**GREEDY), use_tqdm=False)
    llm.shutdown()
    texts = {t: o.outputs[0].text for t, o in zip(TEXTS, outs)}
    assert not any(POISON_TOKEN in o.outputs[0].token_ids for o in outs)
    return texts


def test_offline_batch_fails_only_the_poisoned_request(poisoned_dir, reference, caplog):
    """The engine on its own: the poisoned prompt ends with finish_reason 'error', its batch mates are exactly
    what they are without it, and afterwards no rerun is needed (no NaN was left in a reused block)."""
    from engine import LLM

    llm = LLM(str(poisoned_dir), num_kv_blocks=16, enable_prefix_caching=False)  # a small pool: blocks get reused
    try:
        params = SamplingParams(**GREEDY)
        outs = llm.generate([TEXTS[0], POISONED_PROMPT, TEXTS[1]], params, use_tqdm=False)
        assert [o.outputs[0].finish_reason for o in outs] == ["length", "error", "length"]
        assert [outs[0].outputs[0].text, outs[2].outputs[0].text] == [reference[TEXTS[0]], reference[TEXTS[1]]]
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="strata"):
            for _ in range(3):  # short and long sequences decode together over the freed blocks
                outs = llm.generate([TEXTS[2], TEXTS[3] + " and a much longer tail" * 6], params, use_tqdm=False)
                assert all(o.outputs[0].finish_reason == "length" for o in outs)
                assert outs[0].outputs[0].text == reference[TEXTS[2]]
        assert "rerunning" not in caplog.text, "a NaN left in the KV cache reached another request"
        assert llm.stats().kv_blocks_used == 0
    finally:
        llm.shutdown()


@pytest.fixture(scope="module")
def base_url(serve_url, poisoned_dir):
    config = ClusterConfig(app_name="engine-errors", models=[
        ModelConfig(model=str(poisoned_dir), name="poisoned", num_kv_blocks=128, max_num_seqs=16)])
    yield from deploy(serve_url, config)


def test_poisoned_request_gets_500_and_its_batch_mates_complete(base_url, reference):
    def send(prompt, stream=False):
        body = {"model": "poisoned", "prompt": prompt, **GREEDY, "stream": stream}
        return completion(base_url, body, timeout=60)

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        good = [pool.submit(send, t) for t in TEXTS[:4]]
        bad = pool.submit(send, POISONED_PROMPT)
        bad_stream = pool.submit(send, POISONED_PROMPT, True)
        good += [pool.submit(send, t, True) for t in TEXTS[4:]]
        good, bad, bad_stream = [f.result() for f in good], bad.result(), bad_stream.result()

    assert bad.status == 500, bad
    assert bad.error["type"] == "internal_error" and set(bad.error) == {"message", "type", "param", "code"}
    assert "non-finite logits" in bad.error["message"]
    # A stream has already answered 200: it carries the error as an event, then ends.
    assert bad_stream.status == 200 and bad_stream.error["type"] == "internal_error" and bad_stream.done
    assert all(o.ok for o in good), good
    assert [o.text for o in good] == [reference[t] for t in TEXTS]  # batched with the poison, unchanged


def test_engine_serves_unchanged_after_the_poison(base_url, reference):
    for text in TEXTS:
        out = httpx_completion(base_url, text)
        assert out == reference[text]
    stats = engine_stats("engine-errors", engine_deployment_name("poisoned"))
    assert len(stats) == 1 and stats[0]["healthy"]
    wait_for(lambda: engine_stats("engine-errors", engine_deployment_name("poisoned"))[0]["kv_blocks_used"] == 0,
             10, what="every KV block to be free")


def httpx_completion(base_url: str, prompt: str) -> str:
    import httpx

    r = httpx.post(f"{base_url}/v1/completions", json={"model": "poisoned", "prompt": prompt, **GREEDY}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]
