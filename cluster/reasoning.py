"""Reasoning parsers: split a model's `<think>…</think>` reasoning from its answer, whole or as it streams.

The model's config chooses one (`reasoning_parser`), as vLLM's `--reasoning-parser` does:
- `deepseek_r1`: the chat template opens the reasoning, so the output is reasoning until `</think>` (a leading
  `<think>` the model writes itself is dropped), and the answer after it;
- `qwen3`: reasoning only when the output opens with `<think>` (with `enable_thinking: false` the template
  closes it in the prompt and the output is all answer).
"""
from __future__ import annotations

from typing import Literal

ReasoningParserName = Literal["deepseek_r1", "qwen3"]
START, END = "<think>", "</think>"


def split_reasoning(text: str, parser: ReasoningParserName, final: bool = True) -> tuple[str, str] | None:
    """(reasoning, answer) of `text`. Before the output has ended (`final` False) text that may still become a
    tag is held back, and None means it is too early to tell whether the output reasons at all."""
    body = text.lstrip()
    if body.startswith(START):
        body = body[len(START):]
    elif not final and START.startswith(body):
        return None  # nothing yet, or "<thi", which may still become the opening tag
    elif parser == "qwen3":
        return "", text
    end = body.find(END)
    if end >= 0:
        return body[:end], body[end + len(END):]
    if not final:
        body = body[: len(body) - partial_tag(body, END)]
    return body, ""


def partial_tag(text: str, tag: str) -> int:
    """Length of the longest end of `text` that begins `tag`."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


class ReasoningStream:
    """One completion's reasoning and answer as its text streams in: each `feed` returns what is new of each."""

    def __init__(self, parser: ReasoningParserName):
        self.parser = parser
        self.text = ""
        self.sent_reasoning = 0
        self.sent_answer = 0

    def feed(self, delta: str, final: bool) -> tuple[str, str]:
        self.text += delta
        split = split_reasoning(self.text, self.parser, final)
        if split is None:
            return "", ""
        reasoning, answer = split
        new = reasoning[self.sent_reasoning:], answer[self.sent_answer:]
        self.sent_reasoning, self.sent_answer = len(reasoning), len(answer)
        return new
