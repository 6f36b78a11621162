"""The OpenAI API end to end: real Ray Serve, real HTTP, the `openai` client, the demo model."""
from __future__ import annotations

import json
import re
import threading
import time
from typing import Literal

import httpx
import jsonschema
import openai
import pydantic
import pytest

from cluster.config import ClusterConfig, LimitsConfig, ModelConfig
from engine import SamplingParams
from tests.support.polling import wait_for
from tests.support.prompts import MESSAGES, PROMPT
from tests.support.serve_app import deploy, metrics, replica_metric

API_KEY = "test-key"
CONFIG = ClusterConfig(
    models=[
        ModelConfig(model="demo", num_kv_blocks=512, max_num_seqs=32),
        # One request at a time and one waiting: the third is turned away with 429.
        ModelConfig(model="demo", name="demo-tiny-queue", num_kv_blocks=256, max_ongoing_requests=1, max_queue_size=1),
    ],
    api_keys=[API_KEY],
    limits=LimitsConfig(max_request_bytes=64 * 1024, max_n=4),
)


@pytest.fixture(scope="module")
def base_url(serve_url):
    yield from deploy(serve_url, CONFIG)


@pytest.fixture(scope="module")
def client(base_url):
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key=API_KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def offline():
    from engine import LLM

    llm = LLM(model="demo", num_kv_blocks=256)
    yield llm
    llm.shutdown()


def auth() -> dict:
    return {"Authorization": f"Bearer {API_KEY}"}


def sse_events(response: httpx.Response) -> list[str]:
    return [line.removeprefix("data: ") for line in response.iter_lines() if line.startswith("data: ")]


# -- generation -----------------------------------------------------------------------------------------------
def test_greedy_completion_equals_offline_engine(client, offline):
    out = client.completions.create(model="demo", prompt=PROMPT, max_tokens=24, temperature=0)
    expected = offline.generate(PROMPT, SamplingParams(temperature=0, max_tokens=24), use_tqdm=False)[0]
    choice = out.choices[0]
    assert choice.text == expected.outputs[0].text
    assert choice.finish_reason == expected.outputs[0].finish_reason
    assert out.usage.prompt_tokens == len(expected.prompt_token_ids)
    assert out.usage.completion_tokens == len(expected.outputs[0].token_ids)
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens


def test_greedy_chat_equals_offline_engine(client, offline):
    out = client.chat.completions.create(model="demo", messages=MESSAGES, max_tokens=16, temperature=0)
    expected = offline.chat(MESSAGES, SamplingParams(temperature=0, max_tokens=16), use_tqdm=False)[0]
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == expected.outputs[0].text
    assert out.usage.prompt_tokens == len(expected.prompt_token_ids)
    assert out.usage.completion_tokens == len(expected.outputs[0].token_ids)


def test_chat_stream_matches_whole_response_and_reports_usage(client):
    whole = client.chat.completions.create(model="demo", messages=MESSAGES, max_tokens=12, temperature=0,
                                           extra_body={"ignore_eos": True})
    chunks = list(client.chat.completions.create(model="demo", messages=MESSAGES, max_tokens=12, temperature=0,
                                                 stream=True, stream_options={"include_usage": True},
                                                 extra_body={"ignore_eos": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert all(c.usage is None for c in chunks[:-1])


def test_completion_stream_is_sse_ending_with_done(base_url):
    body = {"model": "demo", "prompt": PROMPT, "max_tokens": 5, "temperature": 0, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", f"{base_url}/v1/completions", json=body, headers=auth(), timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert sum(1 for c in chunks if c["choices"][0]["text"]) >= 1
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_n_and_batched_prompts(client):
    out = client.completions.create(model="demo", prompt=PROMPT, max_tokens=6, temperature=0.9, seed=3, n=3,
                                    extra_body={"ignore_eos": True})
    assert sorted(c.index for c in out.choices) == [0, 1, 2]
    assert out.usage.completion_tokens == 18
    batch = client.completions.create(model="demo", prompt=["Hello world", PROMPT], max_tokens=4, n=2,
                                      extra_body={"ignore_eos": True})
    assert sorted(c.index for c in batch.choices) == [0, 1, 2, 3]
    assert batch.usage.completion_tokens == 16


def test_seed_reproducibility(client):
    def sample(seed):
        return client.completions.create(model="demo", prompt=PROMPT, max_tokens=20, temperature=1.0, seed=seed,
                                         extra_body={"ignore_eos": True}).choices[0].text

    assert sample(7) == sample(7)
    assert sample(7) != sample(8)


def test_stop_string_ends_the_completion(client):
    full = client.completions.create(model="demo", prompt=PROMPT, max_tokens=30, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text
    stop = full[8:11]
    out = client.completions.create(model="demo", prompt=PROMPT, max_tokens=30, temperature=0, stop=[stop],
                                    extra_body={"ignore_eos": True}).choices[0]
    assert out.finish_reason == "stop"
    assert out.text == full[:full.index(stop)]


def test_logprobs(client):
    out = client.completions.create(model="demo", prompt=PROMPT, max_tokens=4, temperature=0, logprobs=2, echo=True)
    choice = out.choices[0]
    assert choice.text.startswith(PROMPT)
    lp = choice.logprobs
    assert len(lp.tokens) == out.usage.prompt_tokens + out.usage.completion_tokens
    assert lp.token_logprobs[0] is None and all(x <= 0 for x in lp.token_logprobs[1:])
    assert all(len(top) == 2 for top in lp.top_logprobs[1:])
    chat = client.chat.completions.create(model="demo", messages=MESSAGES, max_tokens=3, temperature=0,
                                          logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens
    assert all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in content)


# -- the rest of the API --------------------------------------------------------------------------------------
def test_models_health_and_metrics(client, base_url):
    assert sorted(m.id for m in client.models.list().data) == ["demo", "demo-tiny-queue"]
    health = httpx.get(f"{base_url}/health", timeout=30)
    assert health.status_code == 200 and health.json()["status"] == "ok"
    names = set(metrics(base_url))
    for name in ["strata_time_to_first_token_seconds_count", "strata_inter_token_latency_seconds_count",
                 "strata_e2e_request_latency_seconds_count", "strata_request_queue_time_seconds_count",
                 "strata_requests_total", "strata_prompt_tokens_total", "strata_generation_tokens_total",
                 "strata_num_requests_waiting", "strata_num_requests_running", "strata_kv_cache_usage_ratio",
                 "strata_prefix_cache_hit_rate", "strata_num_preemptions_total", "strata_num_replicas"]:
        assert name in names, name
    assert sum(replica_metric(base_url, "strata_generation_tokens_total", "demo").values()) > 0


def test_ingress_streams_from_replicas_over_grpc(base_url):
    """The handle the ingress gets was pickled by the driver, which keeps Serve's defaults (Ray actor calls); in a
    process of the cluster, whose environment turns Serve's gRPC path on, the ingress's model endpoint takes it."""
    import ray
    from ray import serve

    from cluster.config import engine_deployment_name

    @ray.remote(num_cpus=0)
    def by_reference(handle) -> bool:
        import asyncio

        from cluster.model_endpoint import ModelEndpoint

        async def build() -> bool:  # as the ingress does, on an event loop (the cluster's routers run on the caller's)
            return ModelEndpoint(CONFIG.models[0], handle, CONFIG.limits).stream_handle.handle_options._by_reference

        return asyncio.run(build())

    handle = serve.get_deployment_handle(engine_deployment_name("demo"), CONFIG.app_name)
    assert handle.handle_options._by_reference  # as build_app's handles leave the driver
    assert ray.get(by_reference.remote(handle), timeout=60) is False


def test_replica_sends_the_first_token_with_accepted(base_url):
    """A short prompt's first delta comes within the replica's ACCEPT_WAIT_S: it rides on `Accepted`, the first item
    of the replica's stream, rather than costing a streamed item of its own before the first token."""
    import asyncio

    from ray import serve

    from cluster.config import engine_deployment_name
    from cluster.replica import Accepted, GenerateRequest

    handle = serve.get_deployment_handle(engine_deployment_name("demo"), CONFIG.app_name).options(
        stream=True, method_name="generate")

    async def first_items(i: int) -> tuple[Accepted, list]:
        stream = handle.remote(GenerateRequest(f"first-delta-{i}", [1, 2, 3, 4], SamplingParams(max_tokens=4,
                                                                                                ignore_eos=True)))
        first = await stream.__anext__()
        return first, [item async for item in stream]

    async def attempts() -> list[tuple[Accepted, list]]:
        return [await first_items(i) for i in range(5)]

    results = asyncio.run(attempts())
    for accepted, rest in results:
        assert isinstance(accepted, Accepted)
        deltas = ([accepted.first_delta] if accepted.first_delta else []) + rest
        assert sum(len(d.token_ids) for d in deltas) == 4  # with it or without it, every token comes once
    # One that came later than ACCEPT_WAIT_S (a busy machine) would be accepted alone; not all of them.
    assert any(a.first_delta is not None and a.first_delta.token_ids for a, _ in results)


def test_errors_are_openai_shaped(client, base_url):
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="nope", prompt=PROMPT)
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="demo", prompt=PROMPT, temperature=-1)
    assert e.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="demo", prompt=PROMPT, n=5)  # above limits.max_n
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="demo", prompt=PROMPT, extra_body={"max_token": 3})  # unknown key
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="demo", prompt=list(range(1, 2100)), max_tokens=1)  # > max_model_len
    assert "max_model_len" in e.value.message

    def post(body: bytes | dict, headers=None) -> httpx.Response:
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        return httpx.post(f"{base_url}/v1/completions", content=content, timeout=30,
                          headers={"Content-Type": "application/json", **(auth() if headers is None else headers)})

    for response, status in [(post(b"{not json"), 400), (post({"model": "demo", "prompt": "x" * 70_000}), 413),
                             (post({"model": "demo", "prompt": PROMPT}, headers={}), 401),
                             (post({"model": "demo", "prompt": PROMPT}, {"Authorization": "Bearer wrong"}), 401),
                             (httpx.get(f"{base_url}/v1/nothing-here", headers=auth()), 404)]:
        assert response.status_code == status, response.text
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}


def test_disconnected_stream_frees_its_blocks(base_url):
    body = {"model": "demo", "prompt": PROMPT, "max_tokens": 1500, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{base_url}/v1/completions", json=body, headers=auth(), timeout=60) as r:
        lines = r.iter_lines()
        for _ in range(3):
            next(lines)
        assert sum(replica_metric(base_url, "strata_kv_cache_blocks_used", "demo").values()) > 0
    # The client is gone: the engine request is aborted and every block returns to the pool.
    wait_for(lambda: blocks_in_use(base_url) == 0, timeout=20, what="the aborted request's KV blocks to be freed")


def test_client_that_gives_up_on_a_whole_response_frees_its_blocks(base_url):
    body = {"model": "demo", "prompt": PROMPT, "max_tokens": 1500, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{base_url}/v1/completions", json=body, headers=auth(), timeout=1.5)
    wait_for(lambda: blocks_in_use(base_url) == 0, timeout=20, what="the abandoned request's KV blocks to be freed")


def blocks_in_use(base_url: str) -> float:
    used = replica_metric(base_url, "strata_kv_cache_blocks_used", "demo")
    running = replica_metric(base_url, "strata_num_requests_running", "demo")
    return sum(used.values()) + sum(running.values())


def test_backpressure_answers_429_quickly(base_url):
    body = {"model": "demo-tiny-queue", "prompt": PROMPT, "max_tokens": 1500, "ignore_eos": True, "stream": True}
    stop = threading.Event()

    def hold_stream(started: threading.Event):
        with httpx.stream("POST", f"{base_url}/v1/completions", json=body, headers=auth(), timeout=120) as r:
            started.set()
            for _ in r.iter_lines():
                if stop.is_set():
                    return

    running, queued = threading.Event(), threading.Event()
    threads = [threading.Thread(target=hold_stream, args=(running,), daemon=True)]
    threads[0].start()
    assert running.wait(60), "the first request never started"
    threads.append(threading.Thread(target=hold_stream, args=(queued,), daemon=True))
    threads[1].start()  # waits in the model's queue (size 1) for the only slot
    time.sleep(1.0)
    try:
        r = httpx.post(f"{base_url}/v1/completions", headers=auth(), timeout=30,
                       json={"model": "demo-tiny-queue", "prompt": PROMPT, "max_tokens": 4})
        assert r.status_code == 429, r.text
        assert all(t.is_alive() for t in threads), "the 429 came only after a held request had ended"
        assert r.headers["retry-after"] == str(CONFIG.limits.retry_after_s)
        assert r.json()["error"]["code"] == "queue_full"
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)


# -- vLLM's extras: logit_bias, priority, chat_template_kwargs, /tokenize, /detokenize -------------------------
def test_logit_bias_steers_every_token(client, offline):
    """+100 on one token makes greedy pick it every time; -100 on the greedy token keeps it out. The API answers
    what the offline engine generates with the same bias."""
    greedy = offline.generate(PROMPT, SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)[0]
    first = greedy.outputs[0].token_ids[0]
    for bias, check in (({65: 100}, lambda ids: ids == [65] * 8), ({first: -100}, lambda ids: first not in ids)):
        expected = offline.generate(PROMPT, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True,
                                                           logit_bias=bias), use_tqdm=False)[0].outputs[0]
        assert check(expected.token_ids)
        out = client.completions.create(model="demo", prompt=PROMPT, max_tokens=8, temperature=0,
                                        logit_bias={str(k): v for k, v in bias.items()},
                                        extra_body={"ignore_eos": True})
        assert out.choices[0].text == expected.text


@pytest.mark.parametrize("bias, message", [({"x": 1}, "token ids"), ({"1": 101}, r"\[-100, 100\]"),
                                           ({"100000": 1}, r"in \[0, ")])
def test_bad_logit_bias_is_a_400_naming_it(base_url, bias, message):
    r = httpx.post(f"{base_url}/v1/completions", headers=auth(), timeout=60,
                   json={"model": "demo", "prompt": PROMPT, "max_tokens": 2, "logit_bias": bias})
    assert r.status_code == 400 and r.json()["error"]["param"] == "logit_bias"
    assert re.search(message, r.json()["error"]["message"])


def test_priority_is_accepted_and_chat_template_kwargs_reach_the_template(client, base_url):
    out = client.completions.create(model="demo", prompt=PROMPT, max_tokens=2, extra_body={"priority": -5})
    assert out.usage.completion_tokens == 2
    template = "{% for m in messages %}{{ m.content }}{% endfor %}{{ greeting }}"
    body = {"model": "demo", "messages": MESSAGES, "chat_template": template,
            "chat_template_kwargs": {"greeting": " Bonjour"}}
    tokens = httpx.post(f"{base_url}/tokenize", headers=auth(), json=body, timeout=60).json()["tokens"]
    text = httpx.post(f"{base_url}/detokenize", headers=auth(), timeout=60,
                      json={"model": "demo", "tokens": tokens}).json()["prompt"]
    assert text.endswith(MESSAGES[0]["content"] + " Bonjour")


def test_tokenize_and_detokenize_round_trip(base_url, offline):
    r = httpx.post(f"{base_url}/tokenize", headers=auth(), timeout=60,
                   json={"model": "demo", "prompt": PROMPT, "add_special_tokens": False})
    body = r.json()
    assert r.status_code == 200 and body["tokens"] == offline.get_tokenizer().encode(PROMPT, add_special_tokens=False)
    assert body["count"] == len(body["tokens"]) and body["max_model_len"] > len(PROMPT)
    back = httpx.post(f"{base_url}/detokenize", headers=auth(), timeout=60,
                      json={"model": "demo", "tokens": body["tokens"]})
    assert back.json() == {"prompt": PROMPT}
    bad = httpx.post(f"{base_url}/detokenize", headers=auth(), timeout=60, json={"model": "demo", "tokens": [-1]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"
    models = httpx.get(f"{base_url}/v1/models", headers=auth(), timeout=60).json()["data"]
    assert all(m["max_model_len"] == body["max_model_len"] for m in models if m["id"] == "demo")


def test_tools_for_a_model_without_a_tool_call_parser_are_a_400(client):
    """The demo model's template writes no <tool_call>, and its config names no parser."""
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="demo", messages=MESSAGES, tools=tools, max_tokens=4)
    assert e.value.body["param"] == "tools" and "tool_call_parser" in e.value.body["message"]
    out = client.chat.completions.create(model="demo", messages=MESSAGES, tools=tools, tool_choice="none",
                                         max_tokens=4)
    assert out.choices[0].message.tool_calls is None and out.usage.completion_tokens == 4


# -- structured outputs ---------------------------------------------------------------------------------------
class Forecast(pydantic.BaseModel):
    city: str = pydantic.Field(max_length=8)
    celsius: int = pydantic.Field(ge=-40, le=50)
    sky: Literal["clear", "cloudy", "rain"]


def test_openai_parse_returns_the_pydantic_object(client):
    """The openai client's chat.completions.parse sends a strict json_schema; the random demo model answers with
    JSON that parses into the class only because of the constraint."""
    out = client.chat.completions.parse(model="demo", messages=MESSAGES, response_format=Forecast, max_tokens=120,
                                        temperature=1.0, seed=4, n=2)
    for choice in out.choices:
        assert choice.finish_reason == "stop" and isinstance(choice.message.parsed, Forecast)


def test_structured_output_on_completions_whole_and_streamed(client):
    out = client.completions.create(model="demo", prompt=PROMPT, max_tokens=8, temperature=1.0, seed=1,
                                    extra_body={"guided_choice": ["yes", "no"]})
    assert out.choices[0].text in ("yes", "no") and out.choices[0].finish_reason == "stop"
    stream = client.completions.create(model="demo", prompt=PROMPT, max_tokens=40, temperature=1.0, seed=2, stream=True,
                                       extra_body={"structured_outputs": {"regex": r"[a-z]{3}-[0-9]{2}"}})
    assert re.fullmatch(r"[a-z]{3}-[0-9]{2}", "".join(c.choices[0].text for c in stream))


@pytest.mark.parametrize("body, param", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}},
     "response_format"),
    ({"guided_regex": "(unclosed"}, "guided_regex"),
    ({"guided_regex": "a", "guided_choice": ["a"]}, "guided_choice"),
    ({"response_format": {"type": "json_schema"}}, "response_format"),
])
def test_a_bad_structured_output_is_a_400_naming_its_field(base_url, body, param):
    r = httpx.post(f"{base_url}/v1/chat/completions", headers=auth(), timeout=60,
                   json={"model": "demo", "messages": MESSAGES, "max_tokens": 4, **body})
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


NESTED = {"type": "object", "additionalProperties": False, "required": ["id", "owner", "tags", "status"], "properties": {
    "id": {"type": "integer", "minimum": 1, "maximum": 999},
    "owner": {"type": "object", "additionalProperties": False, "required": ["name", "admin"], "properties": {
        "name": {"type": "string", "maxLength": 6}, "admin": {"type": "boolean"}}},
    "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "minItems": 1, "maxItems": 3},
    "status": {"enum": ["open", "closed"]}}}


def test_nested_json_schema_at_temperature_1_with_many_seeds(client):
    outputs = []
    for seed in range(4):
        out = client.chat.completions.create(
            model="demo", messages=MESSAGES, max_tokens=150, temperature=1.0, seed=seed, n=2,
            response_format={"type": "json_schema", "json_schema": {"name": "ticket", "schema": NESTED}})
        outputs += [(c.finish_reason, c.message.content) for c in out.choices]
    for finish_reason, content in outputs:
        assert finish_reason == "stop"
        jsonschema.validate(json.loads(content), NESTED)


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "set_ticket"}}])
def test_forced_tool_choice_over_http(client, tool_choice, stream):
    tools = [{"type": "function", "function": {"name": "set_ticket", "parameters": NESTED}}]
    out = client.chat.completions.create(model="demo", messages=MESSAGES, tools=tools, tool_choice=tool_choice,
                                         max_tokens=400, temperature=1.0, seed=3, stream=stream,
                                         parallel_tool_calls=False)
    if stream:  # the call's name first, then its arguments in pieces as the model writes them
        calls, finish, pieces = {}, None, 0
        for chunk in out:
            for c in chunk.choices:
                for call in c.delta.tool_calls or []:
                    pieces += 1
                    entry = calls.setdefault(call.index, {"name": None, "arguments": ""})
                    entry["name"] = call.function.name or entry["name"]
                    entry["arguments"] += call.function.arguments or ""
                finish = c.finish_reason or finish
        calls = list(calls.values())
        assert pieces > 2
    else:
        finish = out.choices[0].finish_reason
        calls = [{"name": c.function.name, "arguments": c.function.arguments} for c in out.choices[0].message.tool_calls]
    assert finish == "tool_calls" and [c["name"] for c in calls] == ["set_ticket"]
    jsonschema.validate(json.loads(calls[0]["arguments"]), NESTED)
