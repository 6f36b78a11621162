"""Tool calls: the hermes parser on tricky text, whole and streamed in pieces of any size; chat responses and
chunks in OpenAI's shape; tools reaching the template of a real engine's model."""
from __future__ import annotations

import asyncio
import json

import pytest

from cluster.config import LimitsConfig, ModelConfig
from cluster.errors import APIError
from cluster.metrics import ServingMetrics
from cluster.model_endpoint import LocalModelEndpoint
from cluster.protocol import ChatCompletionRequest
from cluster.responses import Prompt, ResponseBuilder
from cluster.session import RequestSession
from cluster.tool_calls import ToolCallStream, parse_tool_calls
from engine import StreamDelta

WEATHER = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}\n</tool_call>'
CASES = [  # text, content, [(name, arguments)]
    ("Let me look. " + WEATHER, "Let me look. ", [("get_weather", {"city": "Paris", "unit": "c"})]),
    (WEATHER + "\n" + WEATHER.replace("Paris", "Oslo"), "\n",
     [("get_weather", {"city": "Paris", "unit": "c"}), ("get_weather", {"city": "Oslo", "unit": "c"})]),
    ('<tool_call>{"name": "now", "arguments": "{}"}</tool_call>', "", [("now", {})]),
    ("<tool_call>not json</tool_call> done", "<tool_call>not json</tool_call> done", []),
    ('a < b <tool_call>{"name": "cut', 'a < b <tool_call>{"name": "cut', []),
    ("no calls at all", "no calls at all", []),
]


def calls_of(calls) -> list[tuple[str, dict]]:
    return [(c.name, json.loads(c.arguments)) for c in calls]


@pytest.mark.parametrize("text, content, calls", CASES)
def test_whole_text(text, content, calls):
    got_content, got_calls = parse_tool_calls(text)
    assert (got_content, calls_of(got_calls)) == (content, calls)


@pytest.mark.parametrize("text, content, calls", CASES)
@pytest.mark.parametrize("piece", [1, 2, 3, 7])
def test_streamed_in_pieces_of_any_size(text, content, calls, piece):
    """JSON and tags split across deltas: the content never shows a tag, each call comes once, whole."""
    stream = ToolCallStream()
    pieces = [text[i:i + piece] for i in range(0, len(text), piece)]
    got_content, got_calls = "", []
    for i, part in enumerate(pieces):
        c, new = stream.feed(part, final=i == len(pieces) - 1)
        got_content, got_calls = got_content + c, got_calls + new
    assert (got_content, calls_of(got_calls)) == (content, calls)


def test_chat_response_and_chunks_are_openai_shaped():
    text = "Checking. " + WEATHER
    pieces = [text[i:i + 5] for i in range(0, len(text), 5)]
    whole = ResponseBuilder("chat", "c", "m", [Prompt([1])], 1, tool_call_parser="hermes")
    streamed = ResponseBuilder("chat", "c", "m", [Prompt([1])], 1, tool_call_parser="hermes")
    chunks = []
    for i, part in enumerate(pieces):
        delta = StreamDelta("r", 0, [i], part, finish_reason="stop" if i == len(pieces) - 1 else None)
        whole.add(0, delta)
        chunks.append(streamed.chunk(0, delta).choices[0])
    choice = whole.response().choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content == "Checking."
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_") and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris", "unit": "c"}
    deltas = [c.delta.tool_calls for c in chunks if c.delta.tool_calls]
    assert len(deltas) == 1 and deltas[0][0].index == 0 and deltas[0][0].function.name == "get_weather"
    assert json.loads(deltas[0][0].function.arguments) == {"city": "Paris", "unit": "c"}
    assert "".join(c.delta.content or "" for c in chunks) == "Checking. "
    assert chunks[-1].finish_reason == "tool_calls"


TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_modes_that_need_constrained_decoding_are_a_400_naming_tool_choice(choice):
    body = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}], tools=TOOLS,
                                 tool_choice=choice)
    with pytest.raises(APIError) as e:
        body.to_sampling_params(LimitsConfig())
    assert e.value.status == 400 and e.value.param == "tool_choice"


def test_tools_and_tool_results_reach_the_template_of_a_real_engine():
    """A template that shows the tools and a tool result's call id: both are in the prompt the engine ran;
    the random model writes no call, so the answer is content."""
    template = ("{{ tools | tojson }}{% for m in messages %}[{{ m.role }}:{{ m.tool_call_id or '' }}:"
                "{{ m.content }}]{% endfor %}")
    endpoint = LocalModelEndpoint(ModelConfig(model="demo", num_kv_blocks=64, max_num_seqs=4,
                                              tool_call_parser="hermes"), LimitsConfig())
    messages = [{"role": "user", "content": "Weather?"},
                {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
                    "name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]
    body = ChatCompletionRequest(model="demo", messages=messages, tools=TOOLS, chat_template=template,
                                 max_tokens=4, temperature=0)
    ids = endpoint.encode_chat([m.template_dict() for m in body.messages], True, template,
                               {"tools": body.template_tools})
    prompt = endpoint.decode(ids)
    assert '"name": "get_weather"' in prompt and "[tool:call_1:sunny]" in prompt
    builder = ResponseBuilder("chat", "c", "demo", [Prompt(ids)], 1, tool_call_parser="hermes")
    try:
        response = asyncio.run(RequestSession(endpoint, body, builder, body.to_sampling_params(LimitsConfig()),
                                              ServingMetrics()).respond(False))
    finally:
        endpoint.replica.engine.shutdown()
    choice = json.loads(response.body)["choices"][0]
    assert choice["message"]["tool_calls"] is None and choice["finish_reason"] in ("length", "stop")
