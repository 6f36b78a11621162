"""`mistral` (Mistral 7B Instruct v0.3 and other models whose template writes this form): the calls follow
`[TOOL_CALLS]` as a JSON list, `[TOOL_CALLS] [{"name": ..., "arguments": {...}}, ...]`; the text before is
content. `[TOOL_CALLS]` is a special token, so requests that may call tools keep special tokens in the text
(`KEEPS_SPECIAL_TOKENS`, as vLLM's parser does). What follows the tag and is not a list of calls is content,
without the tag; so is text after the list."""
from __future__ import annotations

import re

from cluster.reasoning import partial_tag
from cluster.tool_parsers.base import ToolCall, ToolCallStream, call_from_object, json_prefix

TAG = "[TOOL_CALLS]"


def writes_mistral_calls(chat_template: str) -> bool:
    """The template writes past calls as `[TOOL_CALLS] [...]` (newer Mistral templates write `name[ARGS]{...}`,
    which this parser does not read)."""
    return re.search(r"\[TOOL_CALLS\] ?\[", chat_template) is not None


class MistralToolCallStream(ToolCallStream):
    arguments_required = True

    def __init__(self):
        super().__init__()
        self.in_list = False  # pending follows a tag: the list, or the rest of it
        self.expect = "["  # what opens the next call: "[" (the list's start) or "," (after a call)

    def scan(self, final: bool) -> tuple[str, list[ToolCall]]:
        content, calls = "", []
        while True:
            if not self.in_list:
                start = self.pending.find(TAG)
                if start < 0:
                    keep = 0 if final else partial_tag(self.pending, TAG)
                    content += self.pending[:len(self.pending) - keep]
                    self.pending = self.pending[len(self.pending) - keep:]
                    return content, calls
                content += self.pending[:start]
                self.pending = self.pending[start + len(TAG):]
                self.in_list, self.expect = True, "["
                continue
            step = self._next_call(final)
            if step is None:  # wait for more text
                return content, calls
            if isinstance(step, ToolCall):
                calls.append(step)
            else:  # the list closed, or what follows is no list of calls: back to content
                self.in_list = False

    def _next_call(self, final: bool) -> ToolCall | bool | None:
        """The next call off the front of pending (consumed with its `[` or `,`); True when the list closed
        or turned out not to be one (pending is then content); None while undecided."""
        rest = self.pending.lstrip()
        if self.expect == "," and rest.startswith("]"):
            self.pending = rest[1:]
            return True
        if not rest[1:].strip():  # nothing, or only the opener, yet
            return True if final or (rest and rest[0] != self.expect) else None
        if rest[0] != self.expect:
            return True
        item = rest[1:].lstrip()
        if self.expect == "[" and item.startswith("]"):  # an empty list
            self.pending = item[1:]
            return True
        if not item.startswith("{"):
            return True
        decoded = json_prefix(item)
        if decoded is None:
            return True if final else None
        call = call_from_object(decoded[0], True, item[:decoded[1]])
        if call is None:
            return True
        self.pending, self.expect = item[decoded[1]:], ","
        return call

    def partial_call(self) -> str | None:
        if not self.in_list:
            return None
        rest = self.pending.lstrip()
        item = rest[1:].lstrip() if rest[:1] == self.expect else ""
        return item if item.startswith("{") else None
