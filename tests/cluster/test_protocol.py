"""OpenAI request models -> engine SamplingParams, and the limits and unsupported options they enforce."""
from __future__ import annotations

import pytest

from cluster.config import LimitsConfig
from cluster.errors import APIError
from cluster.protocol import ChatCompletionRequest, CompletionRequest

LIMITS = LimitsConfig(max_n=4, max_stop_strings=2, max_stop_length=5, max_prompts=3)
CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def test_completion_fields_map_to_sampling_params():
    p = CompletionRequest(model="m", prompt="x", max_tokens=7, temperature=0.5, top_p=0.9, top_k=-1, min_p=0.1, n=2,
                          stop="END", seed=3, presence_penalty=0.5, frequency_penalty=-0.5, repetition_penalty=1.1,
                          ignore_eos=True, min_tokens=2, logprobs=3).to_sampling_params(LIMITS)
    assert (p.max_tokens, p.temperature, p.top_p, p.top_k, p.min_p, p.n) == (7, 0.5, 0.9, 0, 0.1, 2)
    assert (p.stop, p.seed, p.presence_penalty, p.frequency_penalty) == (["END"], 3, 0.5, -0.5)
    assert (p.repetition_penalty, p.ignore_eos, p.min_tokens, p.logprobs) == (1.1, True, 2, 3)
    assert CompletionRequest(model="m", prompt="x").to_sampling_params(LIMITS).max_tokens == 16  # OpenAI's default


def test_chat_max_completion_tokens_and_logprobs():
    req = ChatCompletionRequest(**CHAT, max_tokens=5, max_completion_tokens=9, logprobs=True, top_logprobs=2)
    p = req.to_sampling_params(LIMITS)
    assert (p.max_tokens, p.logprobs) == (9, 2)
    assert ChatCompletionRequest(**CHAT).to_sampling_params(LIMITS).max_tokens is None  # up to the context end
    assert ChatCompletionRequest(**CHAT, logprobs=True).to_sampling_params(LIMITS).logprobs == 0


def test_echo_with_logprobs_asks_for_prompt_logprobs():
    params = CompletionRequest(model="m", prompt="x", echo=True, logprobs=1).to_sampling_params(LIMITS)
    assert params.prompt_logprobs == 1


def test_prompt_shapes():
    assert CompletionRequest(model="m", prompt="a").prompts(LIMITS) == ["a"]
    assert CompletionRequest(model="m", prompt=[1, 2]).prompts(LIMITS) == [[1, 2]]
    assert CompletionRequest(model="m", prompt=["a", "b"]).prompts(LIMITS) == ["a", "b"]
    assert CompletionRequest(model="m", prompt=[[1], [2]]).prompts(LIMITS) == [[1], [2]]


@pytest.mark.parametrize("request_kwargs, param", [
    (dict(n=5), "n"),
    (dict(stop=["a", "b", "c"]), "stop"),
    (dict(stop=["toolong"]), "stop"),
    (dict(logit_bias={"a": 2.0}), "logit_bias"),
    (dict(logit_bias={"1": 200.0}), "logit_bias"),
    (dict(best_of=3), "best_of"),
    (dict(stream_options={"include_usage": True}), "stream_options"),
    (dict(min_tokens=20, max_tokens=10), "min_tokens"),
])
def test_invalid_requests_name_the_parameter(request_kwargs, param):
    with pytest.raises(APIError) as e:
        CompletionRequest(model="m", prompt="x", **request_kwargs).to_sampling_params(LIMITS)
    assert e.value.status == 400 and e.value.param == param


@pytest.mark.parametrize("prompt", ["", [], ["a", "b", "c", "d"]])
def test_empty_or_too_many_prompts(prompt):
    with pytest.raises(APIError):
        CompletionRequest(model="m", prompt=prompt).prompts(LIMITS)


def test_chat_rejects_what_it_cannot_do():
    for extra in [dict(tool_choice="auto"), dict(tool_choice="required"), dict(top_logprobs=2),
                  dict(response_format={"type": "json_schema"})]:
        with pytest.raises(APIError):
            ChatCompletionRequest(**CHAT, **extra).to_sampling_params(LIMITS)
    parts = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": [
        {"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}])
    assert parts.messages[0].template_dict()["content"] == "ab"


def test_error_body_is_openai_shaped():
    body = APIError(404, "no such model", param="model", code="model_not_found").body()
    assert body == {"error": {"message": "no such model", "type": "invalid_request_error", "param": "model",
                              "code": "model_not_found"}}


def test_sse_events_stay_on_one_line_whatever_the_text():
    import json

    from cluster.protocol import CompletionChoice, CompletionChunk
    from cluster.responses import sse

    text = "a\u2028b\u2029c\x85d\x1ce\nf\rg"
    event = sse(CompletionChunk(id="x", model="m", choices=[CompletionChoice(index=0, text=text)]))
    lines = event.splitlines()
    assert len(lines) == 2 and lines[1] == "" and lines[0].startswith("data: ")
    assert json.loads(lines[0].removeprefix("data: "))["choices"][0]["text"] == text
