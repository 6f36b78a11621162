"""Tool-call parsers: the function calls a model writes, as OpenAI's `tool_calls`, whole or as the text streams.

One parser per format, each in cluster/tool_parsers/ with vLLM's name: `hermes` (`<tool_call>{json}</tool_call>`),
`llama3_json` (`{"name": ..., "parameters": ...}` answers, `;`-separated), `mistral` (`[TOOL_CALLS] [...]`).
The model's config chooses the parser (`tool_call_parser`); by default, the one whose format the chat template
writes. `tool_choice` "required" or a named function uses ForcedToolCalls instead (constrained JSON).
"""
from __future__ import annotations

from typing import Literal

from cluster.tool_parsers.base import ToolCall, ToolCallDelta, ToolCallStream
from cluster.tool_parsers.forced import ForcedToolCalls, forced_tool_call_stream
from cluster.tool_parsers.hermes import HermesToolCallStream, writes_hermes_calls
from cluster.tool_parsers.llama3_json import Llama3JsonToolCallStream, writes_llama3_json_calls
from cluster.tool_parsers.mistral import MistralToolCallStream, writes_mistral_calls

__all__ = ["ToolCall", "ToolCallDelta", "ToolCallStream", "ForcedToolCalls", "ToolCallParserName",
           "PARSERS", "KEEPS_SPECIAL_TOKENS", "default_parser", "parse_tool_calls", "tool_call_stream"]

ToolCallParserName = Literal["hermes", "llama3_json", "mistral"]
PARSERS: dict[str, type[ToolCallStream]] = {
    "hermes": HermesToolCallStream, "llama3_json": Llama3JsonToolCallStream, "mistral": MistralToolCallStream}
TEMPLATE_MARKS = {"hermes": writes_hermes_calls, "llama3_json": writes_llama3_json_calls,
                  "mistral": writes_mistral_calls}
# Parsers whose calls open with a special token: requests that may call tools keep special tokens in the text.
KEEPS_SPECIAL_TOKENS = {"mistral"}


def default_parser(chat_template: str | None) -> ToolCallParserName | None:
    """The parser whose format the template writes; None where no format, or more than one, matches."""
    found = [name for name, writes in TEMPLATE_MARKS.items() if chat_template and writes(chat_template)]
    return found[0] if len(found) == 1 else None


def parse_tool_calls(text: str, parser: ToolCallParserName | ForcedToolCalls = "hermes") -> tuple[str, list[ToolCall]]:
    """(content, calls) of a whole answer."""
    return tool_call_stream(parser).feed(text, final=True)


def tool_call_stream(parser: ToolCallParserName | ForcedToolCalls) -> ToolCallStream:
    return forced_tool_call_stream(parser) if isinstance(parser, ForcedToolCalls) else PARSERS[parser]()
