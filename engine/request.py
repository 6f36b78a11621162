"""One sequence being generated: its tokens, how many have KV in the cache, and its blocks."""
from __future__ import annotations

import enum
import time

from engine.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Request:
    """A sequence. `n > 1` fans out into one Request per completion; children share the parent's prompt blocks."""

    def __init__(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                 eos_token_ids: set[int], max_tokens: int, index: int = 0, parent: Request | None = None):
        self.request_id = request_id  # unique per sequence: "<id>" or "<id>#<index>"
        self.index = index
        self.parent = parent
        self.params = params
        self.prompt_token_ids = prompt_token_ids
        self.output_token_ids: list[int] = []
        self.eos_token_ids = eos_token_ids
        self.max_tokens = max_tokens
        self.arrival_time = time.monotonic()
        self.arrival_seq = 0  # set by the scheduler
        self.status = RequestStatus.WAITING
        self.num_computed_tokens = 0
        self.num_cached_tokens = 0  # prompt tokens served from the prefix cache at admission
        self.block_ids: list[int] = []
        self.block_hashes: list[int] = []  # hashes of this sequence's full blocks, in order
        self.num_published_blocks = 0  # leading blocks already in the prefix cache
        self.in_flight = 0  # pipeline-parallel steps launched with this sequence whose results have not come back
        self.last_step = 0  # the number of the last launched step with this sequence (Scheduler.advance)
        self.num_pending = 0  # tokens sampled by launched steps but not yet known here (async scheduling)
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self.seed = None if params.seed is None else params.seed + index
        self.grammar = None  # structured outputs: its SequenceGrammar, once the grammar is compiled
        self.waits_for_grammar = params.structured_outputs is not None

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def can_decode_ahead(self) -> bool:
        """May run a step on its pending token before the token is known: the sampler needs no token history
        (penalties, min_tokens, a grammar's state), and the pending token is not its last."""
        p = self.params
        return (not p.needs_penalties and p.min_tokens == 0 and p.structured_outputs is None
                and len(self.output_token_ids) + self.num_pending < self.max_tokens)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status == RequestStatus.FINISHED

    def token_slice(self, start: int, end: int) -> list[int]:
        n = len(self.prompt_token_ids)
        if end <= n:
            return self.prompt_token_ids[start:end]
        return (self.prompt_token_ids[start:] if start < n else []) + self.output_token_ids[max(0, start - n):end - n]

    def check_stop_token(self, token_id: int) -> bool:
        """After appending `token_id`: finish on EOS, a stop token id, or the length limit."""
        p = self.params
        n_out = len(self.output_token_ids)
        if n_out >= p.min_tokens:
            if token_id in p.stop_token_ids:
                self.finish("stop", token_id)
                return True
            if not p.ignore_eos and token_id in self.eos_token_ids:
                self.finish("stop", None)
                return True
        if n_out >= self.max_tokens:
            self.finish("length")
            return True
        return False

    def finish(self, reason: str, stop_reason: int | str | None = None) -> None:
        self.status = RequestStatus.FINISHED
        self.finish_reason = reason
        self.stop_reason = stop_reason
