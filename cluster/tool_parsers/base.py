"""What every tool-call parser shares: the call it returns, the stream it feeds, JSON read off the front of text.

Streamed, a call goes out as OpenAI streams it: its index, id and name once the name is whole, then fragments of
its arguments' JSON text as the model writes them, which concatenate to the call's `arguments`."""
from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any

from cluster.tool_parsers.partial_json import object_fields

_DECODER = json.JSONDecoder()
ARGUMENT_KEYS = ("arguments", "parameters")


@dataclass
class ToolCall:
    name: str
    arguments: str  # JSON text
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")


@dataclass
class ToolCallDelta:
    """A piece of a streamed call: the first one of a call carries its id and name."""

    index: int
    arguments: str = ""
    id: str | None = None
    name: str | None = None


class ToolCallStream:
    """One completion's content and tool calls as its text streams in: `feed` returns the new content and the
    calls completed by this piece, `stream` the same with the calls as deltas. Each parser holds back text that
    may still become a call; text that turns out not to be a call is content after all."""

    arguments_required = False  # an object is a call only with its arguments (a plain JSON answer is not)

    def __init__(self):
        self.pending = ""  # text not yet sent as content or calls
        self.calls: list[ToolCall] = []
        self._streaming: dict[int, tuple[str, str]] = {}  # index of a call being streamed -> (its id, args sent)

    def feed(self, delta: str, final: bool) -> tuple[str, list[ToolCall]]:
        self.pending += delta
        content, calls = self.scan(final)
        self.calls += calls
        return content, calls

    def stream(self, delta: str, final: bool) -> tuple[str, list[ToolCallDelta]]:
        first = len(self.calls)
        content, calls = self.feed(delta, final)
        deltas = [d for k, call in enumerate(calls) for d in self._rest_of(first + k, call)]
        if not final and (partial := self.partial_call()) is not None:
            deltas += self._progress(len(self.calls), partial)
        return content, deltas

    def scan(self, final: bool) -> tuple[str, list[ToolCall]]:
        """Send what `pending` now allows; with `final`, everything."""
        raise NotImplementedError

    def partial_call(self) -> str | None:
        """The JSON object text of the call being written, while it is not whole; None when there is none."""
        return None

    def _progress(self, index: int, partial: str) -> list[ToolCallDelta]:
        fields = object_fields(partial)
        key = next((k for k in ARGUMENT_KEYS if k in fields), None)
        head = None
        if index not in self._streaming:
            start, end = fields.get("name", (0, None))
            if end is None or (key is None and self.arguments_required):
                return []
            name = json.loads(partial[start:end])
            if not isinstance(name, str):
                return []
            self._streaming[index] = (f"call_{uuid.uuid4().hex[:24]}", "")
            head = ToolCallDelta(index, "", self._streaming[index][0], name)
        arguments = ""
        if key is not None and partial[fields[key][0]] == "{":  # an object's text: every prefix of it is final
            start, end = fields[key]
            call_id, sent = self._streaming[index]
            arguments = partial[start:end][len(sent):]
            self._streaming[index] = (call_id, sent + arguments)
        if head is not None:
            head.arguments = arguments
            return [head]
        return [ToolCallDelta(index, arguments)] if arguments else []

    def _rest_of(self, index: int, call: ToolCall) -> list[ToolCallDelta]:
        """What a completed call still has to send: all of it, or the end of its arguments."""
        if index not in self._streaming:
            return [ToolCallDelta(index, call.arguments, call.id, call.name)]
        call.id, sent = self._streaming.pop(index)
        if not call.arguments.startswith(sent):  # not expected: the arguments are the text streamed so far
            raise ValueError(f"tool call {index}: its arguments {call.arguments!r} do not begin with the "
                             f"streamed {sent!r}")
        rest = call.arguments[len(sent):]
        return [ToolCallDelta(index, rest)] if rest else []


def call_from_object(obj: Any, arguments_required: bool = False, text: str | None = None) -> ToolCall | None:
    """{"name": ..., "arguments" or "parameters": {...} or JSON text} as a call; None for anything else. `text`:
    the object as the model wrote it, whose arguments' text is then the call's, as it was streamed."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    key = next((k for k in ARGUMENT_KEYS if k in obj), None)
    if key is None and arguments_required:
        return None
    arguments = obj[key] if key else {}
    if isinstance(arguments, str):
        return ToolCall(obj["name"], arguments)
    if not isinstance(arguments, dict):
        return None
    span = object_fields(text).get(key) if text is not None else None
    written = text[span[0]:span[1]] if span and span[1] is not None else None
    return ToolCall(obj["name"], written or json.dumps(arguments, ensure_ascii=False))


def json_prefix(text: str) -> tuple[Any, int] | None:
    """The JSON value that `text` opens with and where it ends; None while it is incomplete (or not JSON)."""
    try:
        return _DECODER.raw_decode(text)
    except ValueError:
        return None
