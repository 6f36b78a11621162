"""Reasoning parsers: the split of `<think>` reasoning from the answer, whole and streamed in pieces of any size,
and through a chat response of a real engine."""
from __future__ import annotations

import asyncio
import json

import pytest

from cluster.config import LimitsConfig, ModelConfig
from cluster.metrics import ServingMetrics
from cluster.model_endpoint import LocalModelEndpoint
from cluster.protocol import ChatCompletionRequest
from cluster.reasoning import ReasoningStream, split_reasoning
from cluster.responses import Prompt, ResponseBuilder
from cluster.session import RequestSession
from engine import LLM, SamplingParams, StreamDelta

CASES = [  # text, parser, (reasoning, answer)
    ("<think>Say hi.</think>\n\nHello!", "qwen3", ("Say hi.", "\n\nHello!")),
    ("\n<think>a < b, so </think>yes", "qwen3", ("a < b, so ", "yes")),
    ("Hello, no thinking here. </think>", "qwen3", ("", "Hello, no thinking here. </think>")),
    ("<think>still thinking", "qwen3", ("still thinking", "")),
    ("The template opened it.</think>Answer", "deepseek_r1", ("The template opened it.", "Answer")),
    ("<think>Both ways.</think>Answer", "deepseek_r1", ("Both ways.", "Answer")),
    ("never closed", "deepseek_r1", ("never closed", "")),
    ("", "qwen3", ("", "")),
]


@pytest.mark.parametrize("text, parser, expected", CASES)
def test_whole_text(text, parser, expected):
    assert split_reasoning(text, parser) == expected


@pytest.mark.parametrize("text, parser, expected", CASES)
@pytest.mark.parametrize("piece", [1, 2, 3, 7])
def test_streamed_in_pieces_of_any_size_adds_up_to_the_whole(text, parser, expected, piece):
    """Tags split across deltas ("</th" + "ink>") are held back, never sent as text of either part."""
    stream = ReasoningStream(parser)
    pieces = [text[i:i + piece] for i in range(0, len(text), piece)] or [""]
    reasoning = answer = ""
    for i, part in enumerate(pieces):
        r, a = stream.feed(part, final=i == len(pieces) - 1)
        assert "<think>" not in r and "</think>" not in r
        reasoning, answer = reasoning + r, answer + a
    assert (reasoning, answer) == expected


def test_chat_chunks_carry_reasoning_then_content():
    builder = ResponseBuilder("chat", "chatcmpl-x", "m", [Prompt([1, 2])], 1, reasoning_parser="qwen3")
    texts = ["<thi", "nk>Let me", " see.</th", "ink>\n\nIt is", " 4."]
    chunks = [builder.chunk(0, StreamDelta("r", 0, [i], t, finish_reason="stop" if i == len(texts) - 1 else None))
              for i, t in enumerate(texts)]
    deltas = [c.choices[0].delta for c in chunks]
    assert "".join(d.reasoning_content or "" for d in deltas) == "Let me see."
    assert "".join(d.content or "" for d in deltas) == "\n\nIt is 4."
    message = builder.response().choices[0].message
    assert (message.reasoning_content, message.content) == ("Let me see.", "\n\nIt is 4.")


def test_a_real_engines_chat_answer_is_split():
    """deepseek_r1 with no `</think>` in the output: all of it is reasoning, the answer is empty; the text is the
    offline engine's for the same prompt."""
    config = ModelConfig(model="demo", num_kv_blocks=64, max_num_seqs=4, reasoning_parser="deepseek_r1")
    endpoint = LocalModelEndpoint(config, LimitsConfig())
    body = ChatCompletionRequest(model="demo", messages=[{"role": "user", "content": "Hi"}], max_tokens=12,
                                 temperature=0)
    params = body.to_sampling_params(LimitsConfig())
    ids = endpoint.encode_chat([m.template_dict() for m in body.messages], True, None)
    builder = ResponseBuilder("chat", "chatcmpl-r", "demo", [Prompt(ids)], 1, reasoning_parser="deepseek_r1")
    try:
        response = asyncio.run(RequestSession(endpoint, body, builder, params, ServingMetrics()).respond(False))
    finally:
        endpoint.replica.engine.shutdown()
    message = json.loads(response.body)["choices"][0]["message"]
    llm = LLM("demo", num_kv_blocks=64)
    try:
        expected = llm.generate([ids], SamplingParams(temperature=0, max_tokens=12), use_tqdm=False)[0]
    finally:
        llm.shutdown()
    assert "</think>" not in expected.outputs[0].text
    assert message["reasoning_content"] == expected.outputs[0].text.lstrip().removeprefix("<think>")
    assert message["content"] == ""
