"""What the engine hands back: vLLM-shaped `RequestOutput` / `CompletionOutput`."""
from __future__ import annotations

from dataclasses import dataclass, field, replace

# One position's logprobs: token id -> logprob, the sampled token always included.
TokenLogprobs = dict[int, float]


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error" | None while running
    stop_reason: int | str | None = None  # the stop string or stop token id that ended it
    logprobs: list[TokenLogprobs] | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = False
    prompt_logprobs: list[TokenLogprobs | None] | None = None
    num_cached_tokens: int = 0


@dataclass(slots=True)  # one a token: slots make it cheaper to build
class StreamDelta:
    """One increment of one completion, as `AsyncEngine.add_request` yields them."""

    request_id: str
    index: int  # which of the n completions
    token_ids: list[int]
    text: str
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    logprobs: list[TokenLogprobs] | None = None
    prompt_token_ids: list[int] | None = None  # set on the first delta of a request
    num_cached_tokens: int = 0
    prompt_logprobs: list[TokenLogprobs | None] | None = None  # set on the first delta when asked for
    error: str | None = None  # set when the request failed inside the engine
    # Every token id in `logprobs` and `prompt_logprobs` (and the prompt's, with prompt_logprobs) -> its text.
    token_texts: dict[int, str] | None = None

    def followed_by(self, later: StreamDelta) -> StreamDelta:
        """This delta and the next one of the same completion, as one."""
        logprobs = None if self.logprobs is None and later.logprobs is None else (self.logprobs or []) + (
            later.logprobs or [])
        texts = None if self.token_texts is None and later.token_texts is None else {
            **(self.token_texts or {}), **(later.token_texts or {})}
        return replace(self, token_ids=self.token_ids + later.token_ids, text=self.text + later.text,
                       finish_reason=later.finish_reason, stop_reason=later.stop_reason, logprobs=logprobs,
                       token_texts=texts)


@dataclass
class EngineStats:
    waiting: int = 0
    running: int = 0
    kv_blocks_used: int = 0
    kv_blocks_total: int = 0
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    preemptions: int = 0
    prompt_tokens: int = 0
    generation_tokens: int = 0
    steps: int = 0
    cached_block_hashes: list[int] = field(default_factory=list)

    @property
    def prefix_cache_hit_rate(self) -> float:
        return self.prefix_cache_hits / self.prefix_cache_queries if self.prefix_cache_queries else 0.0

    @property
    def kv_cache_usage(self) -> float:
        return self.kv_blocks_used / self.kv_blocks_total if self.kv_blocks_total else 0.0
