"""The engine's checks of one request against the model it serves: every model-dependent check lives here
(the request's own fields are checked by SamplingParams, the API's shape by the server)."""
from __future__ import annotations

from dataclasses import dataclass

from engine.errors import InvalidRequestError
from engine.sampling_params import SamplingParams
from engine.structured_output import check_grammar


@dataclass(frozen=True)
class RequestLimits:
    max_model_len: int
    vocab_size: int
    max_logprobs: int

    def checked_prompt(self, tokenizer, prompt: str | list[int], params: SamplingParams,
                       max_tokens_must_fit: bool) -> list[int]:
        """The prompt's token ids (text is tokenized), once `check` passed."""
        ids = tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        self.check(ids, params, max_tokens_must_fit)
        return ids

    def check(self, ids: list[int], params: SamplingParams, max_tokens_must_fit: bool) -> None:
        """Raise InvalidRequestError for a request this model cannot serve. `max_tokens_must_fit`: a max_tokens
        beyond the context is an error (servers) instead of being capped at the context (offline `LLM`)."""
        n_prompt, limit = len(ids), self.max_model_len
        if not ids:
            raise InvalidRequestError("the prompt is empty", "prompt")
        if n_prompt >= limit:
            raise InvalidRequestError(f"the prompt has {n_prompt} tokens but max_model_len is {limit}: shorten "
                                      "the prompt", "prompt", code="context_length_exceeded")
        if max_tokens_must_fit and params.max_tokens is not None and n_prompt + params.max_tokens > limit:
            raise InvalidRequestError(
                f"the prompt has {n_prompt} tokens and max_tokens asks for {params.max_tokens} more, but "
                f"max_model_len is {limit}: lower max_tokens to at most {limit - n_prompt}", "max_tokens",
                code="context_length_exceeded")
        if min(ids) < 0 or max(ids) >= self.vocab_size:
            raise InvalidRequestError(f"prompt token ids must be in [0, {self.vocab_size})", "prompt")
        for n, name in ((params.logprobs, "logprobs"), (params.prompt_logprobs, "prompt_logprobs")):
            if n is not None and n > self.max_logprobs:
                raise InvalidRequestError(f"{name} must be at most {self.max_logprobs}, got {n}", name)
        if any(not 0 <= t < self.vocab_size for t in params.stop_token_ids):
            raise InvalidRequestError(f"stop_token_ids must be in [0, {self.vocab_size})", "stop_token_ids")
        if any(not 0 <= t < self.vocab_size for t in params.logit_bias or {}):
            raise InvalidRequestError(f"logit_bias token ids must be in [0, {self.vocab_size})", "logit_bias")
        if params.structured_outputs is not None:
            check_grammar(params.structured_outputs)

