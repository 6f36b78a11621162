"""`hermes` (Hermes, Qwen2.5, Qwen3): each call is `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`;
the text outside the blocks is the message's content. A block that does not parse as a call stays content."""
from __future__ import annotations

from cluster.reasoning import partial_tag
from cluster.tool_parsers.base import ToolCall, ToolCallStream, call_from_object, json_prefix

START, END = "<tool_call>", "</tool_call>"


def writes_hermes_calls(chat_template: str) -> bool:
    return START in chat_template


def parse_block(block: str) -> ToolCall | None:
    decoded = json_prefix(block)
    return call_from_object(decoded[0], text=block) if decoded and not block[decoded[1]:].strip() else None


class HermesToolCallStream(ToolCallStream):
    def __init__(self):
        super().__init__()
        self.in_block = False  # pending holds an open block

    def scan(self, final: bool) -> tuple[str, list[ToolCall]]:
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
        return content, calls

    def partial_call(self) -> str | None:
        return self.pending.lstrip() if self.in_block else None
