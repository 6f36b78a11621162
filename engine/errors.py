"""The engine's error types: what a caller may catch and act on."""
from __future__ import annotations


class InvalidRequestError(ValueError):
    """A request the engine will not take. `param` is the request field at fault, in the engine's names
    (`prompt`, `max_tokens`, `logprobs`, `prompt_logprobs`, `stop_token_ids`, or any SamplingParams field);
    `code` a machine-readable reason where one applies (`context_length_exceeded`). Servers turn this into
    their own error shape from these attributes, never from the message."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message, self.param, self.code = message, param, code


class EngineDeadError(RuntimeError):
    """The engine cannot serve any more: its loop died or its workers failed."""
