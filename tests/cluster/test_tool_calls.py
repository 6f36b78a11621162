"""Tool calls: the hermes parser on tricky text, whole and streamed in pieces of any size; chat responses and
chunks in OpenAI's shape; tools reaching the template of a real engine's model."""
from __future__ import annotations

import asyncio
import json

import jsonschema
import pytest

from cluster.config import LimitsConfig, ModelConfig
from cluster.errors import APIError
from cluster.metrics import ServingMetrics
from cluster.model_endpoint import LocalModelEndpoint
from cluster.protocol import ChatCompletionRequest
from cluster.responses import Prompt, ResponseBuilder
from cluster.session import RequestSession
from cluster.tool_calls import ForcedToolCalls, default_parser, parse_tool_calls, tool_call_stream
from engine import StreamDelta

WEATHER = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}\n</tool_call>'
PARIS = ("get_weather", {"city": "Paris", "unit": "c"})
HERMES = [  # text, content, [(name, arguments)]
    ("Let me look. " + WEATHER, "Let me look. ", [PARIS]),
    (WEATHER + "\n" + WEATHER.replace("Paris", "Oslo"), "\n", [PARIS, ("get_weather", {"city": "Oslo", "unit": "c"})]),
    ('<tool_call>{"name": "now", "arguments": "{}"}</tool_call>', "", [("now", {})]),
    ("<tool_call>not json</tool_call> done", "<tool_call>not json</tool_call> done", []),
    ('a < b <tool_call>{"name": "cut', 'a < b <tool_call>{"name": "cut', []),
    ("no calls at all", "no calls at all", []),
]
LLAMA3_JSON = [
    ('{"name": "get_weather", "parameters": {"city": "Paris", "unit": "c"}}', "", [PARIS]),
    ('<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris", "unit": "c"}}; {"name": "now", '
     '"arguments": {}}', "", [PARIS, ("now", {})]),
    ('\n {"name": "f", "parameters": {"x": [1, {"y": "};{"}]}}\n', "", [("f", {"x": [1, {"y": "};{"}]})]),
    ('{"name": "now", "parameters": {}} Done.', " Done.", [("now", {})]),
    ('{"answer": 42}', '{"answer": 42}', []),  # a plain JSON answer
    ('{"name": "Bob", "age": 3}', '{"name": "Bob", "age": 3}', []),
    ('Sure: {"name": "now", "parameters": {}}', 'Sure: {"name": "now", "parameters": {}}', []),
    ('{"name": "cut", "parameters": {"x": ', '{"name": "cut", "parameters": {"x": ', []),
    ("<|python_ta", "<|python_ta", []),
    ("no calls at all", "no calls at all", []),
]
MISTRAL = [
    ('[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}]', "", [PARIS]),
    ('Let me check.[TOOL_CALLS][{"name": "f", "arguments": {"x": "]"}}, {"name": "now", "arguments": {}}]',
     "Let me check.", [("f", {"x": "]"}), ("now", {})]),
    ('[TOOL_CALLS] [{"name": "now", "arguments": {}}] Done.', " Done.", [("now", {})]),
    ("[TOOL_CALLS] not a list", " not a list", []),
    ('[TOOL_CALLS] [{"name": "cut", "arguments": {', ' [{"name": "cut", "arguments": {', []),
    ('[TOOL_CALLS] [{"name": "now", "arguments": {}}, oops', ", oops", [("now", {})]),
    ("a [TOOL_CALL] b [TOOL_CA", "a [TOOL_CALL] b [TOOL_CA", []),
]
CASES = [(parser, *case) for parser, cases in (("hermes", HERMES), ("llama3_json", LLAMA3_JSON), ("mistral", MISTRAL))
         for case in cases]


def calls_of(calls) -> list[tuple[str, dict]]:
    return [(c.name, json.loads(c.arguments)) for c in calls]


@pytest.mark.parametrize("parser, text, content, calls", CASES)
def test_whole_text(parser, text, content, calls):
    got_content, got_calls = parse_tool_calls(text, parser)
    assert (got_content, calls_of(got_calls)) == (content, calls)


@pytest.mark.parametrize("parser, text, content, calls", CASES)
def test_streamed_in_pieces_of_every_size(parser, text, content, calls):
    """JSON and tags split across deltas: the content never shows a tag, each call comes once, whole."""
    for piece in range(1, len(text) + 1):
        stream = tool_call_stream(parser)
        pieces = [text[i:i + piece] for i in range(0, len(text), piece)]
        got_content, got_calls = "", []
        for i, part in enumerate(pieces):
            c, new = stream.feed(part, final=i == len(pieces) - 1)
            got_content, got_calls = got_content + c, got_calls + new
        assert (got_content, calls_of(got_calls)) == (content, calls), piece


def merged(deltas) -> dict[int, list]:
    """Each call's pieces, by index, as a client puts them together: [id, name, arguments]."""
    calls: dict[int, list] = {}
    for d in deltas:
        if d.index not in calls:
            assert d.id and d.name, d  # a call opens with its id and name
            calls[d.index] = [d.id, d.name, ""]
        else:
            assert d.id is None and d.name is None, d
        calls[d.index][2] += d.arguments
    return calls


@pytest.mark.parametrize("parser, text, content, calls", [c for c in CASES if c[3]])
@pytest.mark.parametrize("piece", [1, 2, 7])
def test_streamed_calls_open_with_their_name_and_then_stream_their_arguments(parser, text, content, calls, piece):
    stream = tool_call_stream(parser)
    pieces = [text[i:i + piece] for i in range(0, len(text), piece)]
    got_content, deltas, named_before_whole = "", [], False
    for i, part in enumerate(pieces):
        c, new = stream.stream(part, final=i == len(pieces) - 1)
        got_content, deltas = got_content + c, deltas + new
        named_before_whole |= bool(merged(deltas)) and not stream.calls
    assert got_content == content
    got = merged(deltas)
    assert [(name, json.loads(arguments)) for _, name, arguments in got.values()] == calls
    assert [(call_id, c.arguments) for (call_id, _, _), c in zip(got.values(), stream.calls)] == \
        [(c.id, c.arguments) for c in stream.calls]
    if piece == 1:
        assert named_before_whole  # the first call's name went out before the call was whole
        if '"arguments": {"' in text or '"parameters": {"' in text:  # the first call's arguments: a non-empty object
            assert len([d for d in deltas if d.index == 0]) > 3  # in many fragments


@pytest.mark.parametrize("forced, text", [
    (ForcedToolCalls("get_weather"), '{"city": "Paris", "unit": "c"} '),
    (ForcedToolCalls(), '[{"name": "get_weather", "parameters": {"city": "Paris"}}, {"name": "now", '
                        '"parameters": {}}]')])
def test_forced_calls_stream_their_arguments(forced, text):
    stream = tool_call_stream(forced)
    deltas = [d for ch in text for d in stream.stream(ch, final=False)[1]] + stream.stream("", final=True)[1]
    got = merged(deltas)
    assert [(name, arguments) for _, name, arguments in got.values()] == [(c.name, c.arguments) for c in stream.calls]
    assert stream.calls and all(json.loads(c.arguments) is not None for c in stream.calls)
    assert len([d for d in deltas if d.index == 0]) > 3


def test_a_call_is_sent_as_soon_as_it_is_whole_and_text_that_may_be_one_is_held_back():
    for parser, first, second in (
            ("llama3_json", '{"name": "a", "parameters": {}}', '; {"name": "b", "parameters": {}}'),
            ("mistral", 'Hi[TOOL_CALLS] [{"name": "a", "arguments": {}}', ', {"name": "b", "arguments": {}}]')):
        stream = tool_call_stream(parser)
        content, calls = stream.feed(first[:-1], final=False)
        assert calls == [] and "[TOOL" not in content and "{" not in content
        content, calls = stream.feed(first[-1], final=False)
        assert [c.name for c in calls] == ["a"]
        assert [c.name for c in stream.feed(second, final=True)[1]] == ["b"]


@pytest.mark.parametrize("template, parser", [
    ("{% for m in messages %}<tool_call>{{ m }}</tool_call>{% endfor %}", "hermes"),
    ("{{- 'Respond in the format {\"name\": function name, \"parameters\": dictionary of argument name and its "
     "value}.' }}", "llama3_json"),
    ('{{- "[TOOL_CALLS] [" }}{{ tool_call.function|tojson }}', "mistral"),
    ('{{- "[TOOL_CALLS][" }}', "mistral"),
    ("{{- '[TOOL_CALLS]' + name + '[ARGS]' + arguments }}", None),  # newer Mistral format: not read
    ("{% for m in messages %}{{ m.content }}{% endfor %}", None),
    ('<tool_call> and {{- "[TOOL_CALLS] [" }}', None),  # two formats: ambiguous
])
def test_the_chat_template_chooses_the_default_parser(template, parser):
    assert default_parser(template) == parser


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
    pieces = [p for c in chunks for p in c.delta.tool_calls or []]  # the id and name, then argument fragments
    assert len(pieces) > 2 and {p.index for p in pieces} == {0}
    assert pieces[0].id.startswith("call_") and pieces[0].type == "function" and pieces[0].function.name == "get_weather"
    assert all(p.id is p.type is p.function.name is None for p in pieces[1:])
    assert "name" not in pieces[1].model_dump() and "id" not in pieces[1].model_dump()  # not sent as null
    assert json.loads("".join(p.function.arguments for p in pieces)) == {"city": "Paris", "unit": "c"}
    assert "".join(c.delta.content or "" for c in chunks) == "Checking. "
    assert chunks[-1].finish_reason == "tool_calls"


TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]


FORCING_TOOLS = TOOLS + [{"type": "function", "function": {"name": "add", "parameters": {
    "type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99},
                                     "b": {"type": "integer", "minimum": 0, "maximum": 99}},
    "required": ["a", "b"], "additionalProperties": False}}}]
FORCING_TOOLS[0]["function"]["parameters"]["properties"]["city"]["maxLength"] = 8


@pytest.fixture(scope="module")
def demo_endpoint():
    endpoint = LocalModelEndpoint(ModelConfig(model="demo", num_kv_blocks=64, max_num_seqs=8), LimitsConfig())
    yield endpoint
    endpoint.replica.engine.shutdown()


def chat_response(endpoint, stream: bool, tool_choice="auto", parser=None, parallel=None, **extra):
    """[(content, tool calls, finish_reason)] of each of 2 choices, from the whole response or its chunks."""
    body = ChatCompletionRequest(model="demo", messages=[{"role": "user", "content": "Weather in Paris?"}],
                                 tools=FORCING_TOOLS, tool_choice=tool_choice, max_tokens=200, temperature=1.0,
                                 seed=2, n=2, parallel_tool_calls=parallel, stream=stream, **extra)
    ids = endpoint.encode_chat([m.template_dict() for m in body.messages], True, None, {"tools": body.template_tools})
    builder = ResponseBuilder("chat", "c", "demo", [Prompt(ids)], 2, tool_call_parser=body.forced_tool_calls or parser)
    async def run():
        response = await RequestSession(endpoint, body, builder, body.to_sampling_params(LimitsConfig()),
                                        ServingMetrics()).respond(stream)
        return response, [chunk async for chunk in response.body_iterator] if stream else []

    response, chunks = asyncio.run(run())
    if not stream:
        return [(c["message"]["content"], c["message"]["tool_calls"], c["finish_reason"])
                for c in json.loads(response.body)["choices"]]
    events = [json.loads(line[6:]) for chunk in chunks for line in
              (chunk if isinstance(chunk, str) else chunk.decode()).splitlines() if line.startswith("data: {")]
    choices = {}
    for event in events:
        for c in event["choices"]:
            content, calls, _ = choices.setdefault(c["index"], ("", {}, None))
            for piece in c["delta"].get("tool_calls") or []:  # a call's id and name, then its arguments' pieces
                if piece["index"] not in calls:
                    calls[piece["index"]] = {"id": piece["id"], "type": piece["type"],
                                             "function": {"name": piece["function"]["name"], "arguments": ""}}
                calls[piece["index"]]["function"]["arguments"] += piece["function"]["arguments"]
            choices[c["index"]] = (content + (c["delta"].get("content") or ""), calls,
                                   c.get("finish_reason") or choices[c["index"]][2])
    return [(content, [calls[i] for i in sorted(calls)], finish) for content, calls, finish in
            (choices[i] for i in sorted(choices))]


def forced_response(endpoint, tool_choice, stream: bool, parallel=None):
    return [(calls, finish_reason) for _, calls, finish_reason in chat_response(endpoint, stream, tool_choice,
                                                                                 parallel=parallel)]


ADD = r'"add", "(arguments|parameters)": \{"a": [0-9], "b": [0-9]\}'


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("parser, regex, content", [
    ("hermes", r'Sure\. <tool_call>\{"name": ' + ADD + r'\}</tool_call>', "Sure."),
    ("llama3_json", r'\{"name": ' + ADD + r'\}', None),
    ("mistral", r'Sure\.\[TOOL_CALLS\] \[\{"name": ' + ADD + r'\}\]', "Sure."),
])
def test_each_parser_reads_the_calls_an_engine_writes(demo_endpoint, parser, regex, content, stream):
    """The random demo model writes each parser's format because a regex constrains it (tool_choice auto)."""
    for got_content, calls, finish_reason in chat_response(demo_endpoint, stream, parser=parser,
                                                           structured_outputs={"regex": regex}):
        (call,) = calls
        assert call["function"]["name"] == "add" and finish_reason == "tool_calls"
        jsonschema.validate(json.loads(call["function"]["arguments"]), FORCING_TOOLS[1]["function"]["parameters"])
        assert (got_content.strip() or None if stream else got_content) == content


@pytest.mark.parametrize("stream", [False, True])
def test_a_named_function_is_always_called_with_valid_arguments(demo_endpoint, stream):
    """The random demo model calls the named function with arguments its schema accepts: the constraint does it."""
    for calls, finish_reason in forced_response(demo_endpoint, {"type": "function", "function": {"name": "add"}},
                                                stream):
        (call,) = calls
        assert call["function"]["name"] == "add" and finish_reason == "tool_calls"
        jsonschema.validate(json.loads(call["function"]["arguments"]), FORCING_TOOLS[1]["function"]["parameters"])


@pytest.mark.parametrize("stream", [False, True])
def test_required_calls_at_least_one_tool(demo_endpoint, stream):
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in FORCING_TOOLS}
    for calls, finish_reason in forced_response(demo_endpoint, "required", stream, parallel=False):
        assert len(calls) == 1 and finish_reason == "tool_calls"
        for call in calls:
            jsonschema.validate(json.loads(call["function"]["arguments"]), schemas[call["function"]["name"]])


def test_forced_calls_are_checked():
    base = dict(model="m", messages=[{"role": "user", "content": "hi"}], tools=TOOLS)
    for extra, param in (({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
                         ({"tool_choice": "required", "guided_regex": "[a-z]+"}, "tool_choice")):
        with pytest.raises(APIError) as e:
            ChatCompletionRequest(**base, **extra).to_sampling_params(LimitsConfig())
        assert e.value.status == 400 and e.value.param == param


def test_a_forced_call_takes_precedence_over_response_format():
    """As in vLLM: response_format shapes a text answer, and this answer is a call (agent SDKs send both)."""
    body = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}], tools=FORCING_TOOLS,
                                 tool_choice={"type": "function", "function": {"name": "add"}},
                                 response_format={"type": "json_schema", "json_schema": {"name": "r", "schema": {
                                     "type": "object", "properties": {"x": {"type": "string"}}}}})
    assert body.to_sampling_params(LimitsConfig()).structured_outputs.json == FORCING_TOOLS[1]["function"]["parameters"]


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
