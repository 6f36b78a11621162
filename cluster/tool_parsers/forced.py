"""`tool_choice` "required" or a named function: the answer is constrained to JSON (see
cluster/structured_outputs.py) that is the named function's arguments, or a list of {"name", "parameters"}.
Its calls are sent whole when the answer ends."""
from __future__ import annotations

import json
from dataclasses import dataclass

from cluster.tool_parsers.base import ToolCall, ToolCallStream


@dataclass
class ForcedToolCalls:
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


class ForcedToolCallStream(ToolCallStream):
    def __init__(self, forced: ForcedToolCalls):
        super().__init__()
        self.forced = forced

    def scan(self, final: bool) -> tuple[str, list[ToolCall]]:
        if not final:
            return "", []
        text, self.pending = self.pending, ""
        return self.forced.parse(text)
