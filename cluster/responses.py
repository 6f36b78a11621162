"""ResponseBuilder: turns one API request's engine deltas into OpenAI responses — whole, or as SSE chunks.

Choice `index` is prompt_position * n + completion index, as in OpenAI's batched completions. Text comes from the
engine (completions and the tokens logprobs name), and an echoed prompt's from the request.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Literal

from cluster.protocol import (ChatChoice, ChatChunkChoice, ChatCompletionChunk, ChatCompletionResponse, ChatLogprobs,
                              ChatResponseMessage, CompletionChoice, CompletionChunk, CompletionLogprobs,
                              CompletionResponse, DeltaFunctionCall, DeltaMessage, DeltaToolCall, FunctionCall,
                              PromptTokensDetails,
                              TokenLogprob, ToolCallInfo, TopLogprob, UsageInfo)
from cluster.reasoning import ReasoningParserName, ReasoningStream, split_reasoning
from cluster.tool_calls import (ForcedToolCalls, ToolCallParserName, ToolCallStream, parse_tool_calls,
                                tool_call_stream)
from engine import StreamDelta


@dataclass
class Prompt:
    token_ids: list[int]
    text: str | None = None  # the prompt's text, for echo


@dataclass
class ChoiceState:
    text: str = ""
    num_tokens: int = 0
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    completion_logprobs: CompletionLogprobs | None = None
    chat_logprobs: list[TokenLogprob] = field(default_factory=list)
    started: bool = False
    reasoning: ReasoningStream | None = None  # the reasoning/answer split as the text streams
    tools: ToolCallStream | None = None  # the tool calls in the answer as it streams


class ResponseBuilder:
    def __init__(self, kind: Literal["chat", "completion"], request_id: str, model: str,
                 prompts: list[Prompt], n: int, logprobs: int | None = None, echo: bool = False,
                 reasoning_parser: ReasoningParserName | None = None,
                 tool_call_parser: ToolCallParserName | ForcedToolCalls | None = None):
        self.kind, self.request_id, self.model = kind, request_id, model
        self.reasoning_parser, self.tool_call_parser = reasoning_parser, tool_call_parser
        self.prompts, self.n, self.top_n, self.echo = prompts, n, logprobs, echo
        self.choices = [ChoiceState() for _ in range(len(prompts) * n)]
        self.cached_tokens = [0] * len(prompts)

    def reset(self) -> None:
        """Forget every delta (the request starts over on another replica)."""
        self.choices = [ChoiceState() for _ in self.choices]
        self.cached_tokens = [0] * len(self.prompts)

    @property
    def finished(self) -> bool:
        return all(c.finish_reason is not None for c in self.choices)

    # -- whole responses ------------------------------------------------------------------------------------
    def add(self, prompt_index: int, delta: StreamDelta) -> int:
        """Fold one delta into its choice; returns the choice index."""
        self.chunk(prompt_index, delta)
        return prompt_index * self.n + delta.index

    def response(self) -> CompletionResponse | ChatCompletionResponse:
        if self.kind == "chat":
            return ChatCompletionResponse(id=self.request_id, model=self.model, usage=self.usage(), choices=[
                ChatChoice(index=i, message=(m := self._message(c.text)),
                           finish_reason="tool_calls" if m.tool_calls and c.finish_reason == "stop" else c.finish_reason,
                           stop_reason=c.stop_reason,
                           logprobs=ChatLogprobs(content=c.chat_logprobs) if self.top_n is not None else None)
                for i, c in enumerate(self.choices)])
        return CompletionResponse(id=self.request_id, model=self.model, usage=self.usage(), choices=[
            CompletionChoice(index=i, text=c.text, logprobs=c.completion_logprobs, finish_reason=c.finish_reason,
                             stop_reason=c.stop_reason) for i, c in enumerate(self.choices)])

    def _message(self, text: str) -> ChatResponseMessage:
        reasoning, answer = split_reasoning(text, self.reasoning_parser) if self.reasoning_parser else ("", text)
        calls = []
        if self.tool_call_parser:
            answer, calls = parse_tool_calls(answer, self.tool_call_parser)
        return ChatResponseMessage(content=(answer.strip() or None) if calls else answer,
                                   reasoning_content=reasoning or None, tool_calls=[
                                       ToolCallInfo(id=t.id, function=FunctionCall(name=t.name, arguments=t.arguments))
                                       for t in calls] or None)

    def _delta_message(self, c: ChoiceState, delta: StreamDelta) -> DeltaMessage:
        """A chat delta: the text, or with the model's parsers its reasoning, answer and completed tool calls."""
        if not (self.reasoning_parser or self.tool_call_parser):
            return DeltaMessage(content=delta.text)
        final = delta.finish_reason is not None
        reasoning, answer = "", delta.text
        if self.reasoning_parser:
            c.reasoning = c.reasoning or ReasoningStream(self.reasoning_parser)
            reasoning, answer = c.reasoning.feed(delta.text, final)
        calls = []
        if self.tool_call_parser:
            c.tools = c.tools or tool_call_stream(self.tool_call_parser)
            answer, deltas = c.tools.stream(answer, final)
            calls = [DeltaToolCall(index=d.index, id=d.id, type="function" if d.id else None,
                                   function=DeltaFunctionCall(name=d.name, arguments=d.arguments)) for d in deltas]
        return DeltaMessage(content=answer or None, reasoning_content=reasoning or None, tool_calls=calls or None)

    def usage(self) -> UsageInfo:
        prompt_tokens = sum(len(p.token_ids) for p in self.prompts)
        completion_tokens = sum(c.num_tokens for c in self.choices)
        return UsageInfo(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                         total_tokens=prompt_tokens + completion_tokens,
                         prompt_tokens_details=PromptTokensDetails(cached_tokens=sum(self.cached_tokens)))

    # -- streams --------------------------------------------------------------------------------------------
    def role_chunk(self) -> ChatCompletionChunk:
        """Chat streams open with the assistant role for every choice, before any token exists."""
        return ChatCompletionChunk(id=self.request_id, model=self.model, choices=[
            ChatChunkChoice(index=i, delta=DeltaMessage(role="assistant", content=""))
            for i in range(len(self.choices))])

    def usage_chunk(self) -> ChatCompletionChunk | CompletionChunk:
        cls = ChatCompletionChunk if self.kind == "chat" else CompletionChunk
        return cls(id=self.request_id, model=self.model, choices=[], usage=self.usage())

    def chunk(self, prompt_index: int, delta: StreamDelta) -> ChatCompletionChunk | CompletionChunk:
        """Fold one delta into its choice and return the stream chunk that carries it."""
        index = prompt_index * self.n + delta.index
        c = self.choices[index]
        self.cached_tokens[prompt_index] = max(self.cached_tokens[prompt_index], delta.num_cached_tokens)
        c.num_tokens += len(delta.token_ids)
        c.finish_reason, c.stop_reason = delta.finish_reason, delta.stop_reason
        if self.kind == "chat":
            logprobs = self._chat_logprobs(delta) if self.top_n is not None else None
            c.text += delta.text
            if logprobs:
                c.chat_logprobs.extend(logprobs)
            message, finish_reason = self._delta_message(c, delta), delta.finish_reason
            if finish_reason == "stop" and c.tools is not None and c.tools.calls:
                finish_reason = "tool_calls"
            return ChatCompletionChunk(id=self.request_id, model=self.model, choices=[ChatChunkChoice(
                index=index, delta=message, finish_reason=finish_reason,
                stop_reason=delta.stop_reason,
                logprobs=ChatLogprobs(content=logprobs) if logprobs is not None else None)])
        text, logprobs = "", CompletionLogprobs() if self.top_n is not None else None
        if not c.started and self.echo:
            prompt = self.prompts[prompt_index]
            text = prompt.text or ""
            if logprobs is not None:
                self._add_completion_logprobs(logprobs, prompt.token_ids, delta.prompt_logprobs, len(c.text),
                                              delta.token_texts or {})
        text += delta.text
        if logprobs is not None:
            offset = len(c.text) + len(text) - len(delta.text)  # where this delta's text starts in the choice
            self._add_completion_logprobs(logprobs, delta.token_ids, delta.logprobs, offset, delta.token_texts or {})
            c.completion_logprobs = c.completion_logprobs or CompletionLogprobs()
            for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
                getattr(c.completion_logprobs, key).extend(getattr(logprobs, key))
        c.started = True
        c.text += text
        return CompletionChunk(id=self.request_id, model=self.model, choices=[CompletionChoice(
            index=index, text=text, logprobs=logprobs, finish_reason=delta.finish_reason,
            stop_reason=delta.stop_reason)])

    # -- logprobs (the engine decoded their tokens: delta.token_texts) -----------------------------------------
    def _top(self, entry: dict[int, float]) -> list[tuple[int, float]]:
        return sorted(entry.items(), key=lambda kv: -kv[1])[: self.top_n]

    def _chat_logprobs(self, delta: StreamDelta) -> list[TokenLogprob]:
        out, texts = [], delta.token_texts or {}
        for token_id, entry in zip(delta.token_ids, delta.logprobs or []):
            token = texts[token_id]
            out.append(TokenLogprob(token=token, logprob=entry.get(token_id, float("-inf")),
                                    bytes=list(token.encode()), top_logprobs=[
                                        TopLogprob(token=texts[tid], logprob=lp, bytes=list(texts[tid].encode()))
                                        for tid, lp in self._top(entry)]))
        return out

    def _add_completion_logprobs(self, out: CompletionLogprobs, token_ids: list[int],
                                 entries: list | None, offset: int, texts: dict[int, str]) -> None:
        entries = entries or [None] * len(token_ids)
        for token_id, entry in zip(token_ids, entries):
            token = texts[token_id]
            out.tokens.append(token)
            out.token_logprobs.append(entry.get(token_id) if entry else None)
            out.top_logprobs.append({texts[t]: lp for t, lp in self._top(entry)} if entry else None)
            out.text_offset.append(offset)
            offset += len(token)


# Characters that str.splitlines() (and so some SSE clients' line readers) treat as line breaks, which JSON
# serializers leave raw inside strings; escaped, the event stays on one line for every client.
_LINE_BREAKS = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029",
                              "\x1c": "\\u001c", "\x1d": "\\u001d", "\x1e": "\\u001e"})


def sse(payload) -> str:
    """One server-sent event: a pydantic model or a dict (an error body), serialized as JSON on one line."""
    data = payload.model_dump_json() if hasattr(payload, "model_dump_json") else json.dumps(payload)
    return f"data: {data.translate(_LINE_BREAKS)}\n\n"
