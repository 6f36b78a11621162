"""Phase-less token-budget scheduler (continuous batching, chunked prefill, preemption by recompute).

Every step spends `max_num_batched_tokens` on running requests first (one token for a decode, a
chunk for an unfinished prompt), then admits waiting ones. A request whose known tokens all have KV
after the step is sampled. When the pool runs out of blocks, the last running request in priority
order (the newest, under FCFS) is preempted: its blocks are freed and it recomputes later, often
from its own blocks still sitting in the prefix cache.
"""
from __future__ import annotations

import bisect
import itertools
from dataclasses import dataclass, field

from engine.kv_cache import KVCacheManager
from engine.request import Request, RequestStatus


@dataclass
class ScheduledRequest:
    req: Request
    num_new_tokens: int
    sample: bool  # the step computes the last known token, so it yields the next one


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest] = field(default_factory=list)
    finished_ids: list[str] = field(default_factory=list)  # ended since the last step (the worker drops their state)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)


class Scheduler:
    def __init__(self, kv: KVCacheManager, max_num_seqs: int, max_num_batched_tokens: int, policy: str = "fcfs",
                 micro_batches: int = 1):
        self.kv = kv
        self.max_num_seqs = max_num_seqs
        self.micro_batches = micro_batches
        self.steps_launched = 0
        self.max_num_batched_tokens = max_num_batched_tokens
        self.policy = policy
        self.waiting: list[Request] = []  # sorted by _order
        self.running: list[Request] = []  # sorted by _order: the last one is preempted first
        self.requests: dict[str, Request] = {}
        self.num_preemptions = 0
        self._arrivals = itertools.count()
        self._finished_ids: list[str] = []

    def _order(self, req: Request) -> tuple:
        return (req.params.priority if self.policy == "priority" else 0, req.arrival_seq, req.index)

    def add(self, req: Request) -> None:
        req.arrival_seq = req.parent.arrival_seq if req.parent else next(self._arrivals)
        self.requests[req.request_id] = req
        bisect.insort(self.waiting, req, key=self._order)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self, ahead: bool = False) -> SchedulerOutput | None:
        """The next step. `ahead`: a step launched before the previous one's tokens are known (async
        scheduling): a request whose token is pending decodes it as a placeholder (the worker reads it from the
        step that sampled it) when `_decodes_ahead`, and a request still in a pipeline step may join (its next
        prompt chunk); returns None, changing nothing, where the step would need a preemption (the caller then
        waits for a step in flight and schedules normally)."""
        out = SchedulerOutput(finished_ids=self._finished_ids)
        self._finished_ids = []
        budget = self.max_num_batched_tokens
        preempted = False
        step_seqs = self._seqs_per_step()
        round_steps = self._steps_per_round(step_seqs)
        i = 0
        while i < len(self.running) and budget > 0 and len(out.scheduled) < step_seqs:
            req = self.running[i]
            i += 1
            if req.in_flight and not ahead:  # its previous step is still in the pipeline
                continue
            if req.num_pending and not (ahead and self._decodes_ahead(req, round_steps)):
                continue
            n = min(req.num_tokens + req.num_pending - req.num_computed_tokens, budget)
            if n <= 0:
                continue
            while not self.kv.allocate(req, n):
                if ahead:
                    self.requeue_finished_ids(out)
                    return None
                victim = next((r for r in reversed(self.running) if not r.in_flight), None)
                if victim is None:  # everything else is in flight: try again next step
                    break
                self._preempt(victim)
                preempted = True
                if victim is req:
                    break
            else:
                sample = req.num_computed_tokens + n == req.num_tokens + req.num_pending
                out.scheduled.append(ScheduledRequest(req, n, sample))
                budget -= n
                continue
            if req.status == RequestStatus.WAITING:  # preempted itself: the list shifted under the index
                i -= 1
        if preempted:  # no room for newcomers this step
            return out
        j = 0
        while (j < len(self.waiting) and budget > 0 and len(self.running) < self.max_num_seqs
               and len(out.scheduled) < step_seqs):
            req = self.waiting[j]
            if req.waits_for_grammar:  # it waits for its grammar, not the batch
                j += 1
                continue
            if req.parent is not None and not self._parent_ready(req.parent):
                j += 1  # a sibling waits until the shared prompt is computed
                continue
            if not req.block_ids:
                first_time = req.num_cached_tokens == 0 and not req.output_token_ids
                if req.parent is not None and req.parent.block_ids and not req.parent.is_finished:
                    cached = self.kv.share_prefix(req, req.parent)
                else:
                    cached = self.kv.admit_cached_prefix(req, count_stats=first_time)
                req.num_computed_tokens = cached
                if first_time:
                    req.num_cached_tokens = cached
            n = min(req.num_tokens - req.num_computed_tokens, budget)
            if not self.kv.allocate(req, n):
                self.kv.free(req)
                req.num_computed_tokens = 0
                break
            self.waiting.pop(j)
            req.status = RequestStatus.RUNNING
            bisect.insort(self.running, req, key=self._order)
            out.scheduled.append(ScheduledRequest(req, n, req.num_computed_tokens + n == req.num_tokens))
            budget -= n
        return out

    def _seqs_per_step(self) -> int:
        """Pipeline parallel: a step takes 1/pp of the sequences, so the pp steps in flight (each skips the
        sequences of the others) split the batch between them and every stage has work."""
        if self.micro_batches == 1:
            return self.max_num_seqs
        active = len(self.running) + len(self.waiting)
        return max(1, min(-(-self.max_num_seqs // self.micro_batches), -(-active // self.micro_batches)))

    def _steps_per_round(self, step_seqs: int) -> int:
        """Steps until every active sequence had one: pp, or fewer when fewer sequences than that run."""
        active = len(self.running) + len(self.waiting)
        return max(1, min(self.micro_batches, -(-active // step_seqs)))

    def _decodes_ahead(self, req: Request, round_steps: int) -> bool:
        """Whether a request with a token pending may decode it as a placeholder in the next step. Under pipeline
        parallelism the first stage waits for that token to leave the last stage, so the step that sampled it
        should be one micro-batch round older (batch 1: each step follows the previous one straight from the last
        stage to the first, without the driver)."""
        return (req.can_decode_ahead and req.num_pending == 1
                and self.steps_launched + 1 - req.last_step >= round_steps)

    def requeue_finished_ids(self, out: SchedulerOutput) -> None:
        """An unsent empty step hands its finished ids back for the next one."""
        self._finished_ids = out.finished_ids + self._finished_ids

    @staticmethod
    def _parent_ready(parent: Request) -> bool:
        return bool(parent.output_token_ids) or parent.is_finished

    def _preempt(self, req: Request) -> None:
        assert not req.num_pending, "a request with a step in flight cannot be preempted"
        self.running.remove(req)
        self.kv.free(req)
        req.num_computed_tokens = 0
        req.status = RequestStatus.WAITING
        bisect.insort(self.waiting, req, key=self._order)
        self.num_preemptions += 1

    def advance(self, out: SchedulerOutput) -> None:
        """A step was launched: its tokens count as computed, and each sampled sequence has a token pending."""
        self.steps_launched += 1
        for s in out.scheduled:
            s.req.num_computed_tokens += s.num_new_tokens
            s.req.num_pending += s.sample
            s.req.last_step = self.steps_launched

    def rewind(self, out: SchedulerOutput) -> None:
        """Undo `advance` for a launched step whose output was dropped (it failed, or one before it did)."""
        for s in out.scheduled:
            s.req.num_computed_tokens -= s.num_new_tokens
            s.req.num_pending -= s.sample

    def update(self, out: SchedulerOutput, sampled: dict[str, int]) -> list[Request]:
        """Append an advanced step's sampled tokens. Returns requests that finished."""
        finished = []
        for s in out.scheduled:
            req = s.req
            if req.is_finished:  # aborted (or stopped by an earlier step) while the step ran
                continue
            if s.sample:
                token = sampled[req.request_id]
                req.num_pending -= 1
                req.output_token_ids.append(token)
                if req.check_stop_token(token):
                    finished.append(req)
            self.kv.cache_computed_blocks(req)
        for req in finished:
            self._release(req)
        return finished

    def finish(self, request_id: str, reason: str, stop_reason: int | str | None = None) -> Request | None:
        """End a request early (stop string, abort). Returns it, or None if unknown or already finished."""
        req = self.requests.get(request_id)
        if req is None or req.is_finished:
            return None
        req.finish(reason, stop_reason)
        self._release(req)
        return req

    def _release(self, req: Request) -> None:
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        self.kv.free(req)
        self.requests.pop(req.request_id, None)
        self._finished_ids.append(req.request_id)
