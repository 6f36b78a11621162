"""`llama3_json` (Llama 3.1, 3.2, 3.3): an answer that is tool calls opens with `{` (after `<|python_tag|>`,
where special tokens are kept) and is `{"name": ..., "parameters": {...}}` objects ("arguments" is read too),
several separated by `;`. Any other answer is content. Text after the calls that is not one is content, as is
an opening object that is not a call (a plain JSON answer)."""
from __future__ import annotations

from cluster.tool_parsers.base import ToolCall, ToolCallStream, call_from_object, json_prefix

PYTHON_TAG = "<|python_tag|>"


def writes_llama3_json_calls(chat_template: str) -> bool:
    """Meta's Llama 3.1-3.3 templates (and vLLM's tool_chat_template_llama3.*_json) ask for this format."""
    return '"parameters": dictionary of argument name and its value' in chat_template


class Llama3JsonToolCallStream(ToolCallStream):
    arguments_required = True

    def __init__(self):
        super().__init__()
        self.mode = "start"  # start: undecided; calls: the answer is calls; content: the rest is content

    def scan(self, final: bool) -> tuple[str, list[ToolCall]]:
        if self.mode == "start":
            head = self.pending.lstrip()
            if head.startswith(PYTHON_TAG):
                self.pending, self.mode = head[len(PYTHON_TAG):], "calls"
            elif head.startswith("{"):
                self.mode = "calls"
            elif final or (head and not PYTHON_TAG.startswith(head)):
                self.mode = "content"
            else:  # blank so far, or the tag's first characters
                return "", []
        calls = []
        while self.mode == "calls":
            rest = self.pending.lstrip()
            if self.calls or calls:  # after a call: `;` or whitespace, then the next one
                rest = rest.removeprefix(";").lstrip()
            if not rest:
                break
            decoded = json_prefix(rest) if rest.startswith("{") else None
            if decoded is None and not final and rest.startswith("{"):
                break  # an object still being written
            call = call_from_object(decoded[0], True, rest[:decoded[1]]) if decoded else None
            if call is None:
                self.mode = "content"
            else:
                calls.append(call)
                self.pending = rest[decoded[1]:]
        content = ""
        if self.mode == "content" or final:
            content = self.pending if self.mode == "content" else ""
            self.pending = ""
        return content, calls

    def partial_call(self) -> str | None:
        if self.mode != "calls":
            return None
        rest = self.pending.lstrip()
        rest = rest.removeprefix(";").lstrip() if self.calls else rest
        return rest if rest.startswith("{") else None
