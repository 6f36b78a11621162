"""The OpenAI API as pydantic models: requests, responses, streaming chunks; requests -> SamplingParams.

The request models hold every check of the API's own shape and of the cluster's limits; what depends on the model
(context length, vocabulary, max_logprobs) the engine checks, and `api_error` names its errors' fields as the
API does."""
from __future__ import annotations

import time
import uuid
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_serializer

from cluster.config import LimitsConfig
from cluster.errors import APIError
from cluster.structured_outputs import StructuredOutputFields, forced_tool_call_schema
from cluster.tool_calls import ForcedToolCalls
from engine import InvalidRequestError, SamplingParams, StructuredOutputsParams


def invalid_text_field(data: Any, path: str = "") -> str | None:
    """The first field (dotted path) whose text is not valid Unicode (a lone surrogate, which JSON escapes can
    spell and tokenizers reject), or None."""
    if isinstance(data, str):
        try:
            data.encode("utf-8")
        except UnicodeEncodeError:
            return path or "body"
        return None
    items = data.items() if isinstance(data, dict) else enumerate(data) if isinstance(data, list) else ()
    for key, value in items:
        where = f"{path}.{key}" if path else str(key)
        found = (isinstance(key, str) and invalid_text_field(key, path or "body")) or invalid_text_field(value, where)
        if found:
            return found
    return None


def request_body_schemas(routes: dict[str, type[BaseModel]], models: list[str] | None = None) -> tuple[dict, dict]:
    """OpenAPI request bodies of the routes' models: (component schemas, path -> requestBody); `models`, when
    given, are the values `model` may take."""
    components, bodies = {}, {}
    for path, model in routes.items():
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        if models:
            schema["properties"]["model"]["enum"] = list(models)
        components.update(schema.pop("$defs", {}))
        components[model.__name__] = schema
        bodies[path] = {"required": True, "content": {"application/json": {
            "schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}}
    return components, bodies


# -- requests -------------------------------------------------------------------------------------------------
class StrictModel(BaseModel):
    # Unknown keys are rejected (as OpenAI does), so a typo such as `max_token` is an error, not a silent default.
    model_config = ConfigDict(extra="forbid")


class StreamOptions(StrictModel):
    include_usage: bool = False


class SamplingRequest(StrictModel, StructuredOutputFields):
    """Fields shared by /v1/completions and /v1/chat/completions (OpenAI's plus vLLM's extensions)."""

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0, le=1)
    n: int = Field(1, ge=1)
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    seed: int | None = None
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    repetition_penalty: float | None = Field(None, gt=0)
    ignore_eos: bool = False
    min_tokens: int = Field(0, ge=0)
    skip_special_tokens: bool = True
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    logit_bias: dict[str, float] | None = None
    priority: int = Field(0, description="Lower runs first where the model's scheduling_policy is priority.")
    best_of: int | None = Field(None, ge=1)

    @property
    def include_usage_in_stream(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def sampling_params(self, limits: LimitsConfig, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
        """The engine's SamplingParams; raises APIError(400) naming the offending parameter."""
        if self.n > limits.max_n:
            raise APIError(400, f"n must be at most {limits.max_n}, got {self.n}", param="n")
        if self.best_of is not None and self.best_of != self.n:
            raise APIError(400, "best_of other than n is not supported", param="best_of")
        try:
            logit_bias = {int(k): v for k, v in self.logit_bias.items()} if self.logit_bias else None
        except ValueError:
            raise APIError(400, "logit_bias keys must be token ids", param="logit_bias") from None
        if self.stream_options is not None and not self.stream:
            raise APIError(400, "stream_options is only allowed when stream is true", param="stream_options")
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stop) > limits.max_stop_strings:
            raise APIError(400, f"at most {limits.max_stop_strings} stop strings are allowed, got {len(stop)}",
                           param="stop")
        if any(len(s) > limits.max_stop_length for s in stop):
            raise APIError(400, f"stop strings must be at most {limits.max_stop_length} characters", param="stop")
        try:
            return SamplingParams(
                n=self.n, temperature=1.0 if self.temperature is None else self.temperature,
                top_p=1.0 if self.top_p is None else self.top_p, top_k=self.top_k or 0,
                min_p=self.min_p or 0.0, repetition_penalty=self.repetition_penalty or 1.0,
                presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty, seed=self.seed,
                stop=stop, stop_token_ids=list(self.stop_token_ids or []), ignore_eos=self.ignore_eos,
                max_tokens=max_tokens, min_tokens=self.min_tokens, logprobs=logprobs,
                skip_special_tokens=self.skip_special_tokens, logit_bias=logit_bias, priority=self.priority,
                structured_outputs=self.structured_output_params())
        except InvalidRequestError as e:
            raise self.api_error(e) from None

    # The engine's names of request fields that this request calls otherwise.
    engine_field_names: ClassVar[dict[str, str]] = {"prompt_logprobs": "logprobs"}

    def api_error(self, error: InvalidRequestError) -> APIError:
        """The API's 400 for an engine error, naming the field as this request does."""
        param = self.engine_field_names.get(error.param, error.param) if error.param else None
        if param == "structured_outputs":
            param = self.structured_output_field or ("tools" if getattr(self, "forced_tool_calls", None) else param)
        return APIError(400, error.message, param=param, code=error.code)


class CompletionRequest(SamplingRequest):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1)
    echo: bool = False
    logprobs: int | None = Field(None, ge=0)
    suffix: str | None = None

    def prompts(self, limits: LimitsConfig) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            prompts = [p]
        else:
            prompts = list(p)
        if not prompts or any(len(x) == 0 for x in prompts):
            raise APIError(400, "prompt must not be empty", param="prompt")
        if len(prompts) > limits.max_prompts:
            raise APIError(400, f"at most {limits.max_prompts} prompts per request, got {len(prompts)}", param="prompt")
        if self.suffix:
            raise APIError(400, "suffix is not supported", param="suffix")
        return prompts

    def to_sampling_params(self, limits: LimitsConfig) -> SamplingParams:
        params = self.sampling_params(limits, self.max_tokens, self.logprobs)
        if self.echo and self.logprobs is not None:
            params.prompt_logprobs = self.logprobs
        return params


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")  # name, tool_call_id, ... pass through to the chat template
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None

    def template_dict(self) -> dict:
        content = self.content
        if isinstance(content, list):
            if any(part.type != "text" for part in content):
                raise APIError(400, "only text content parts are supported", param="messages")
            content = "".join(part.text or "" for part in content)
        return {**self.model_dump(exclude_none=True), "content": content or ""}


class FunctionDefinition(BaseModel):
    model_config = ConfigDict(extra="allow")  # description, parameters, strict: passed on to the chat template
    name: str = Field(min_length=1)


class Tool(BaseModel):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class NamedFunction(BaseModel):
    name: str


class NamedToolChoice(BaseModel):
    type: Literal["function"] = "function"
    function: NamedFunction


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    add_generation_prompt: bool = True
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None

    @property
    def template_tools(self) -> list[dict] | None:
        """The tools the chat template shows the model (none with tool_choice "none")."""
        if not self.tools or self.tool_choice == "none":
            return None
        return [t.model_dump(exclude_none=True) for t in self.tools]

    @property
    def engine_field_names(self) -> dict[str, str]:
        return {"prompt": "messages", "logprobs": "top_logprobs",
                "max_tokens": "max_completion_tokens" if self.max_completion_tokens else "max_tokens"}

    def to_sampling_params(self, limits: LimitsConfig) -> SamplingParams:
        if self.tool_choice not in (None, "none") and not self.tools:
            raise APIError(400, "tool_choice needs tools", param="tool_choice")
        if self.top_logprobs is not None and not self.logprobs:
            raise APIError(400, "top_logprobs requires logprobs to be true", param="top_logprobs")
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        # With no limit given, a chat reply may run to the end of the context (as in vLLM).
        params = self.sampling_params(limits, self.max_completion_tokens or self.max_tokens, logprobs)
        if self.forced_tool_calls is not None:
            # This answer is a call: the shape asked of a text answer (response_format) yields to the call's, as in
            # vLLM (agent SDKs send both). An explicit constraint of vLLM's cannot be combined with it.
            if params.structured_outputs is not None and self.structured_output_field != "response_format":
                raise APIError(400, "tool_choice 'required' or a named function cannot be combined with "
                                    f"{self.structured_output_field}", param="tool_choice")
            choice = self.tool_choice.model_dump() if isinstance(self.tool_choice, NamedToolChoice) else "required"
            params.structured_outputs = StructuredOutputsParams(
                json=forced_tool_call_schema(self.template_tools, choice, self.parallel_tool_calls))
        return params

    @property
    def forced_tool_calls(self) -> ForcedToolCalls | None:
        """tool_choice "required" or a named function: the answer is JSON for the calls (constrained decoding)."""
        if isinstance(self.tool_choice, NamedToolChoice):
            return ForcedToolCalls(self.tool_choice.function.name)
        return ForcedToolCalls() if self.tool_choice == "required" else None


# -- responses ------------------------------------------------------------------------------------------------
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0


class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: PromptTokensDetails | None = None


class CompletionLogprobs(BaseModel):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=now)
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob] | None = None


class FunctionCall(BaseModel):
    name: str | None = None
    arguments: str | None = None


class ToolCallInfo(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class DeltaFunctionCall(BaseModel):
    """A streamed call's piece: the name comes once, with the call's first piece; later pieces carry arguments only
    (no `"name": null` that a client appending strings would trip on)."""

    name: str | None = None
    arguments: str = ""

    @model_serializer(mode="wrap")
    def _without_missing_name(self, handler):
        data = handler(self)
        if data.get("name") is None:
            data.pop("name", None)
        return data


class DeltaToolCall(BaseModel):
    """One call's piece in a stream chunk: index always; id and type with the call's first piece only."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunctionCall

    @model_serializer(mode="wrap")
    def _without_missing_id(self, handler):
        return {k: v for k, v in handler(self).items() if v is not None or k not in ("id", "type")}


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    reasoning_content: str | None = None  # with the model's reasoning_parser
    tool_calls: list[ToolCallInfo] | None = None


class ChatChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=now)
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo | None = None


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=now)
    model: str
    choices: list[ChatChunkChoice]
    usage: UsageInfo | None = None


class CompletionChunk(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=now)
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=now)
    owned_by: str = "strata"
    root: str | None = None
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# -- tokenization (vLLM's /tokenize and /detokenize) -------------------------------------------------------
class TokenizeCompletionRequest(StrictModel):
    model: str
    prompt: str
    add_special_tokens: bool = True


class TokenizeChatRequest(StrictModel):
    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    add_generation_prompt: bool = True
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int | None
    tokens: list[int]


class DetokenizeRequest(StrictModel):
    model: str
    tokens: list[int]


class DetokenizeResponse(BaseModel):
    prompt: str
