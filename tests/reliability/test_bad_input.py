"""Bad input: every malformed request gets a 4xx in OpenAI's error shape naming the field at fault, and the server
keeps serving; the served OpenAPI schema, fuzzed with schemathesis, never yields a 5xx or a hang. Also the
security basics: API keys, request data never unpickled, prompts kept out of the logs.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import httpx
import pytest

from cluster.config import ClusterConfig, LimitsConfig, ModelConfig, engine_deployment_name
from tests.support.paths import ROOT
from tests.support.serve_app import deploy, engine_stats

API_KEY = "reliability-key"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
MAX_MODEL_LEN = 128
LIMITS = LimitsConfig(max_request_bytes=16 * 1024, max_n=2, max_prompts=4, max_stop_strings=2, max_stop_length=8)
CONFIG = ClusterConfig(app_name="bad-input", api_keys=[API_KEY], limits=LIMITS, models=[
    ModelConfig(model="demo", max_model_len=MAX_MODEL_LEN, num_kv_blocks=64, max_num_seqs=32, max_logprobs=3)])
PROMPT_MARKER = "zebra-quartz-7781"  # a prompt that must never appear in a log


@pytest.fixture(scope="module")
def base_url(serve_url):
    yield from deploy(serve_url, CONFIG)


def post(base_url: str, body: bytes | dict, path: str = "/v1/completions", headers: dict | None = None):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(f"{base_url}{path}", content=content, timeout=60,
                      headers={"Content-Type": "application/json", **(AUTH if headers is None else headers)})


def cmpl(**kw) -> dict:
    return {"model": "demo", "prompt": "Hello", **kw}


def chat(**kw) -> dict:
    return {"model": "demo", "messages": [{"role": "user", "content": "Hello"}], **kw}


CHAT = "/v1/chat/completions"
# (name, body, path, status, param the error names)
CASES = [
    ("invalid JSON", b'{"model": "demo", "prompt": ', None, 400, None),
    ("not an object", b'[1, 2, 3]', None, 400, None),
    ("invalid UTF-8", b'{"model": "demo", "prompt": "caf\xe9"}', None, 400, None),
    ("lone surrogate", b'{"model": "demo", "prompt": "a\\ud800b"}', None, 400, "prompt"),
    ("lone surrogate in chat", b'{"model": "demo", "messages": [{"role": "user", "content": "\\udfff"}]}', CHAT,
     400, "messages.0.content"),
    ("wrong type: max_tokens", cmpl(max_tokens="many"), None, 400, "max_tokens"),
    ("wrong type: prompt", cmpl(prompt=5), None, 400, "prompt"),
    ("wrong type: token ids", cmpl(prompt=[[1, "a"]]), None, 400, "prompt"),
    ("wrong type: temperature", cmpl(temperature="hot"), None, 400, "temperature"),
    ("wrong type: stream", cmpl(stream=[1]), None, 400, "stream"),
    ("wrong type: messages", chat(messages="hi"), CHAT, 400, "messages"),
    ("bad role", chat(messages=[{"role": "robot", "content": "hi"}]), CHAT, 400, "messages.0.role"),
    ("unknown model", cmpl(model="nope"), None, 404, "model"),
    ("missing model", {"prompt": "Hello"}, None, 400, "model"),
    ("missing prompt", {"model": "demo"}, None, 400, "prompt"),
    ("missing messages", {"model": "demo"}, CHAT, 400, "messages"),
    ("max_tokens 0", cmpl(max_tokens=0), None, 400, "max_tokens"),
    ("max_tokens negative", chat(max_tokens=-5), CHAT, 400, "max_tokens"),
    ("max_tokens beyond the context", cmpl(max_tokens=MAX_MODEL_LEN), None, 400, "max_tokens"),
    ("max_completion_tokens beyond the context", chat(max_completion_tokens=10_000), CHAT, 400,
     "max_completion_tokens"),
    ("prompt longer than max_model_len", cmpl(prompt=[5] * (MAX_MODEL_LEN + 10), max_tokens=1), None, 400, "prompt"),
    ("chat longer than max_model_len", chat(messages=[{"role": "user", "content": "word " * 400}]), CHAT, 400,
     "messages"),
    ("n above the limit", cmpl(n=3), None, 400, "n"),
    ("n zero", cmpl(n=0), None, 400, "n"),
    ("too many stop strings", cmpl(stop=["a", "b", "c"]), None, 400, "stop"),
    ("too long stop string", cmpl(stop="x" * 9), None, 400, "stop"),
    ("empty stop string", cmpl(stop=[""]), None, 400, "stop"),
    ("logprobs above the limit", cmpl(logprobs=4), None, 400, "logprobs"),
    ("top_logprobs above the limit", chat(logprobs=True, top_logprobs=4), CHAT, 400, "top_logprobs"),
    ("empty prompt", cmpl(prompt=""), None, 400, "prompt"),
    ("empty token list", cmpl(prompt=[]), None, 400, "prompt"),
    ("empty prompt in a batch", cmpl(prompt=["Hello", ""]), None, 400, "prompt"),
    ("empty messages", chat(messages=[]), CHAT, 400, "messages"),
    ("too many prompts", cmpl(prompt=["a"] * 5), None, 400, "prompt"),
    ("token id out of the vocabulary", cmpl(prompt=[1, 100_000]), None, 400, "prompt"),
    ("stop token id out of the vocabulary", cmpl(stop_token_ids=[100_000], min_tokens=1), None, 400,
     "stop_token_ids"),
    ("seed beyond 64 bits", cmpl(seed=2 ** 70), None, 400, "seed"),
    ("unknown field", cmpl(max_token=3), None, 400, "max_token"),
    ("unknown nested field", cmpl(stream=True, stream_options={"include_usage": True, "extra": 1}), None, 400,
     "stream_options.extra"),
    ("unknown field in chat", chat(functions=[]), CHAT, 400, "functions"),
    ("body above the size limit", cmpl(prompt="x" * (17 * 1024)), None, 413, None),
    ("no API key", cmpl(), None, 401, None),
]


@pytest.mark.parametrize("name,body,path,status,param", CASES, ids=[c[0] for c in CASES])
def test_malformed_request(base_url, name, body, path, status, param):
    headers = {} if name == "no API key" else None
    r = post(base_url, body, path or "/v1/completions", headers)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param, error


def test_server_keeps_serving_after_bad_input(base_url):
    r = post(base_url, cmpl(max_tokens=8, ignore_eos=True))
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 8
    r = post(base_url, chat(max_tokens=8), CHAT)
    assert r.status_code == 200
    stats = engine_stats("bad-input", engine_deployment_name("demo"))
    assert [s["healthy"] for s in stats] == [True]


def test_fuzzed_requests_never_get_a_server_error(base_url):
    """schemathesis generates bodies from the served OpenAPI schema, valid ones and invalid ones; none may get a
    5xx, and none may hang (each call has a timeout)."""
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from schemathesis import GenerationMode

    schema = schemathesis.openapi.from_url(f"{base_url}/openapi.json").include(method="POST")
    strategy = (schema.as_strategy(generation_mode=GenerationMode.POSITIVE, headers=AUTH)
                | schema.as_strategy(generation_mode=GenerationMode.NEGATIVE, headers=AUTH))
    seen: dict[int, int] = {}

    @settings(max_examples=150, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(case=strategy)
    def check(case):
        response = case.call(base_url=base_url, timeout=60)
        seen[response.status_code] = seen.get(response.status_code, 0) + 1
        assert response.status_code < 500, f"{case.method} {case.path} {case.body!r} -> {response.status_code} " \
                                            f"{response.content[:500]!r}"

    check()
    print(f"\nfuzzed statuses: {dict(sorted(seen.items()))}")
    assert seen.get(200, 0) > 0 and sum(n for s, n in seen.items() if 400 <= s < 500) > 0
    test_server_keeps_serving_after_bad_input(base_url)


# -- security basics ------------------------------------------------------------------------------------------------
def test_api_keys(base_url):
    for key in ["x", API_KEY[:-1], API_KEY + "x", API_KEY.upper(), "y" * 500]:
        r = post(base_url, cmpl(max_tokens=1), headers={"Authorization": f"Bearer {key}"})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", key
    r = post(base_url, cmpl(max_tokens=1), headers={"Authorization": f"Basic {API_KEY}"})
    assert r.status_code == 401
    assert post(base_url, cmpl(max_tokens=1)).status_code == 200
    ingress = (ROOT / "cluster" / "ingress.py").read_text()
    assert "hmac.compare_digest" in ingress  # constant time, on digests of one length


def test_request_data_is_never_unpickled():
    """Bodies are parsed by json.loads only; nothing in the serving code deserializes with pickle, marshal or
    eval, or loads YAML unsafely. (Ray pickles what the ingress itself builds: token ids and SamplingParams.)"""
    forbidden = re.compile(r"\b(pickle|cloudpickle|marshal|dill|shelve)\.loads?\b|\beval\(|\bexec\(|"
                           r"yaml\.(unsafe_)?load\(|yaml\.Loader")
    for path in sorted((ROOT / "cluster").glob("*.py")):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            assert not forbidden.search(line), f"{path.name}:{number}: {line.strip()}"


def test_prompts_are_not_logged(base_url):
    r = post(base_url, cmpl(prompt=f"{PROMPT_MARKER} once", max_tokens=2))
    assert r.status_code == 200
    r = post(base_url, chat(messages=[{"role": "user", "content": PROMPT_MARKER}], max_tokens=2), CHAT)
    assert r.status_code == 200
    r = post(base_url, cmpl(prompt=PROMPT_MARKER, n=99))  # rejected requests are not logged either
    assert r.status_code == 400
    import ray

    logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"
    hits = [p for p in logs.rglob("*") if p.is_file() and PROMPT_MARKER.encode() in p.read_bytes()]
    assert not hits, f"the prompt was logged in {hits}"
