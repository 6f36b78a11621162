"""What every tool-call parser shares: the call it returns, the stream it feeds, JSON read off the front of text."""
from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any

_DECODER = json.JSONDecoder()


@dataclass
class ToolCall:
    name: str
    arguments: str  # JSON text
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")


class ToolCallStream:
    """One completion's content and tool calls as its text streams in: `feed` returns the new content and the
    calls completed by this piece. Each parser holds back text that may still become a call, and sends a call
    once it is whole; text that turns out not to be a call is content after all."""

    def __init__(self):
        self.pending = ""  # text not yet sent as content or calls
        self.calls: list[ToolCall] = []

    def feed(self, delta: str, final: bool) -> tuple[str, list[ToolCall]]:
        self.pending += delta
        content, calls = self.scan(final)
        self.calls += calls
        return content, calls

    def scan(self, final: bool) -> tuple[str, list[ToolCall]]:
        """Send what `pending` now allows; with `final`, everything."""
        raise NotImplementedError


def call_from_object(obj: Any, arguments_required: bool = False) -> ToolCall | None:
    """{"name": ..., "arguments" or "parameters": {...} or JSON text} as a call; None for anything else."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    key = "arguments" if "arguments" in obj else "parameters" if "parameters" in obj else None
    if key is None and arguments_required:
        return None
    arguments = obj[key] if key else {}
    if not isinstance(arguments, (dict, str)):
        return None
    return ToolCall(obj["name"], arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False))


def json_prefix(text: str) -> tuple[Any, int] | None:
    """The JSON value that `text` opens with and where it ends; None while it is incomplete (or not JSON)."""
    try:
        return _DECODER.raw_decode(text)
    except ValueError:
        return None
