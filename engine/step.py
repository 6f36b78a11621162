"""The step contract between the scheduler's side (EngineCore) and the executors: what one step computes and what
it returns, as plain picklable dataclasses of ints, floats and lists. No torch here: device tensors stay inside
the model runner, behind the executor's opaque step handle."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from engine.sampling_params import SamplingParams

PENDING_TOKEN = -1  # in BatchInput.token_ids: the token the previous step sampled for this sequence (async)


@dataclass
class NewSequence:
    """Sent to the workers once, the first time a sequence is scheduled."""

    req_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    seed: int | None
    stop_ids: list[int]


@dataclass
class BatchInput:
    """One step: what each scheduled sequence computes, and where its KV lives."""

    req_ids: list[str] = field(default_factory=list)
    token_ids: list[list[int]] = field(default_factory=list)  # tokens whose KV this step computes
    start_positions: list[int] = field(default_factory=list)  # position of each sequence's first new token
    block_tables: list[list[int]] = field(default_factory=list)
    sample: list[bool] = field(default_factory=list)
    new_sequences: list[NewSequence] = field(default_factory=list)
    finished_ids: list[str] = field(default_factory=list)
    # Structured outputs: the tokens each constrained row may sample, as xgrammar's bitmask (a numpy int32 array,
    # one row of ceil(vocab / 32) words per entry of bitmask_rows, bit set = allowed).
    bitmask_rows: list[int] = field(default_factory=list)
    token_bitmask: Any = None


@dataclass
class SampleResult:
    token_id: int
    logprobs: dict[int, float] | None = None  # the sampled token's, plus the top-N


@dataclass
class StepOutput:
    sampled: dict[str, SampleResult] = field(default_factory=dict)
    # req id -> (first position, logprobs of the prompt tokens after each computed position of this chunk)
    prompt_logprobs: dict[str, tuple[int, list[dict[int, float]]]] = field(default_factory=dict)
