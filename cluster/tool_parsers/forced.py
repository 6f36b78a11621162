"""`tool_choice` "required" or a named function: the answer is constrained to JSON (see
cluster/structured_outputs.py) that is the named function's arguments, or a list of {"name", "parameters"}.
Streamed, the named function's call goes out at once and its arguments as the model writes them; "required"
reads the list as the mistral parser reads what follows its tag."""
from __future__ import annotations

import uuid
from dataclasses import dataclass

from cluster.tool_parsers.base import ToolCall, ToolCallDelta, ToolCallStream
from cluster.tool_parsers.mistral import MistralToolCallStream


@dataclass
class ForcedToolCalls:
    function: str | None = None  # the named function; None: "required"


class NamedToolCallStream(ToolCallStream):
    """The whole answer is the arguments of one call to a function known in advance."""

    def __init__(self, function: str):
        super().__init__()
        self.function, self.id, self.sent = function, f"call_{uuid.uuid4().hex[:24]}", None

    def scan(self, final: bool) -> tuple[str, list[ToolCall]]:
        return "", [ToolCall(self.function, self.pending.strip(), self.id)] if final else []

    def stream(self, delta: str, final: bool) -> tuple[str, list[ToolCallDelta]]:
        self.pending += delta
        # Trailing whitespace waits: the call's arguments are the answer without it.
        written = self.pending.strip() if final else self.pending.lstrip().rstrip(" \t\r\n")
        fragment = written[len(self.sent or ""):]
        deltas = [ToolCallDelta(0, fragment, self.id, self.function)] if self.sent is None else \
            [ToolCallDelta(0, fragment)] if fragment else []
        self.sent = written
        if final:
            self.calls = [ToolCall(self.function, written, self.id)]
        return "", deltas


class RequiredToolCallStream(MistralToolCallStream):
    """The whole answer is a list of calls: the mistral parser's list, with no tag before it."""

    def __init__(self):
        super().__init__()
        self.in_list = True


def forced_tool_call_stream(forced: ForcedToolCalls) -> ToolCallStream:
    return NamedToolCallStream(forced.function) if forced.function is not None else RequiredToolCallStream()
