"""Tool-call parsers: the function calls a model writes, as OpenAI's `tool_calls`, whole or as the text streams.

`hermes` (Hermes, Qwen2.5, Qwen3): each call is `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`; the
text outside the blocks is the message's content. A block that does not parse as a call stays in the content.
The model's config chooses the parser (`tool_call_parser`); by default, `hermes` where the chat template
writes `<tool_call>`.
"""
from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Literal

from cluster.reasoning import partial_tag

ToolCallParserName = Literal["hermes"]
START, END = "<tool_call>", "</tool_call>"


@dataclass
class ToolCall:
    name: str
    arguments: str  # JSON text
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")


def default_parser(chat_template: str | None) -> ToolCallParserName | None:
    return "hermes" if chat_template and START in chat_template else None


def parse_block(block: str) -> ToolCall | None:
    try:
        call = json.loads(block)
    except ValueError:
        return None
    if not isinstance(call, dict) or not isinstance(call.get("name"), str):
        return None
    arguments = call.get("arguments", call.get("parameters", {}))
    return ToolCall(call["name"], arguments if isinstance(arguments, str) else json.dumps(arguments))


def parse_tool_calls(text: str, parser: ToolCallParserName | ForcedToolCalls = "hermes") -> tuple[str, list[ToolCall]]:
    """(content, calls) of a whole answer."""
    return tool_call_stream(parser).feed(text, final=True)


class ToolCallStream:
    """One completion's content and tool calls as its text streams in: `feed` returns the new content and the
    calls completed by this piece. Text that may still open a block is held back; a block is sent once closed."""

    def __init__(self):
        self.pending = ""  # text not yet sent: a possible opening tag, or an open block
        self.in_block = False
        self.calls: list[ToolCall] = []

    def feed(self, delta: str, final: bool) -> tuple[str, list[ToolCall]]:
        self.pending += delta
        content, calls = "", []
        while True:
            if self.in_block:
                end = self.pending.find(END)
                if end < 0:
                    break
                block, self.pending = self.pending[:end], self.pending[end + len(END):]
                self.in_block = False
                call = parse_block(block.strip())
                if call is None:
                    content += START + block + END
                else:
                    calls.append(call)
                continue
            start = self.pending.find(START)
            if start < 0:
                keep = 0 if final else partial_tag(self.pending, START)
                content += self.pending[:len(self.pending) - keep]
                self.pending = self.pending[len(self.pending) - keep:]
                break
            content += self.pending[:start]
            self.pending = self.pending[start + len(START):]
            self.in_block = True
        if final and self.in_block:  # never closed: what the model wrote stays text
            content += START + self.pending
            self.pending, self.in_block = "", False
        self.calls += calls
        return content, calls



@dataclass
class ForcedToolCalls:
    """`tool_choice` "required" or a named function: the answer is constrained to JSON (see
    cluster/structured_outputs.py) that is the named function's arguments, or a list of {"name", "parameters"}.
    Its calls are sent whole when the answer ends."""

    function: str | None = None  # the named function; None: "required"

    def parse(self, text: str) -> tuple[str, list[ToolCall]]:
        if self.function is not None:
            return "", [ToolCall(self.function, text.strip())]
        try:
            calls = json.loads(text)
        except ValueError:  # cut short (max_tokens): the text stays content
            return text, []
        return "", [ToolCall(c["name"], json.dumps(c.get("parameters", {}))) for c in calls
                    if isinstance(c, dict) and isinstance(c.get("name"), str)]


class ForcedToolCallStream:
    def __init__(self, forced: ForcedToolCalls):
        self.forced, self.text, self.calls = forced, "", []

    def feed(self, delta: str, final: bool) -> tuple[str, list[ToolCall]]:
        self.text += delta
        if not final:
            return "", []
        content, calls = self.forced.parse(self.text)
        self.calls += calls
        return content, calls


def tool_call_stream(parser: ToolCallParserName | ForcedToolCalls) -> ToolCallStream | ForcedToolCallStream:
    return ForcedToolCallStream(parser) if isinstance(parser, ForcedToolCalls) else ToolCallStream()
