"""EngineCore: one replica's step loop — schedule, execute on the model, detokenize, report deltas."""
from __future__ import annotations

import collections
import logging
import time
from concurrent.futures import FIRST_COMPLETED, Future, wait

import numpy as np

from engine.config import EngineConfig
from engine.detokenizer import IncrementalDetokenizer, token_texts
from engine.errors import InvalidRequestError
from engine.kv_cache import KVCacheManager
from engine.model_setup import ModelSetup
from engine.outputs import EngineStats, StreamDelta
from engine.request import Request
from engine.request_validation import RequestLimits
from engine.sampling_params import SamplingParams
from engine.scheduler import ScheduledRequest, Scheduler, SchedulerOutput
from engine.step import PENDING_TOKEN, BatchInput, NewSequence, StepOutput
from engine.structured_output import GrammarCompiler, SequenceGrammar, reasoning_ended, reasoning_tag_ids

logger = logging.getLogger("strata")


class EngineCore:
    def __init__(self, config: EngineConfig):
        t0 = time.perf_counter()
        self.config = config
        self.setup = setup = ModelSetup.from_config(config)
        self.tokenizer = setup.tokenizer
        self.executor = setup.make_executor()
        try:
            num_blocks = setup.size_kv_cache(self.executor)
            self.executor.allocate_kv_cache(num_blocks)
        except BaseException:  # e.g. no memory left for the KV cache: release the workers before raising
            self.executor.shutdown()
            raise
        self.max_model_len = min(setup.max_model_len, num_blocks * config.block_size)
        if self.max_model_len < setup.max_model_len:
            logger.warning("KV cache holds %d tokens, so max_model_len drops from %d to %d",
                           num_blocks * config.block_size, setup.max_model_len, self.max_model_len)
        self.limits = RequestLimits(self.max_model_len, setup.hf_config.vocab_size, config.max_logprobs)
        self.kv = KVCacheManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self.pipeline_depth = config.pipeline_parallel_size  # micro-batches, so no stage waits for another
        self.scheduler = Scheduler(self.kv, setup.max_num_seqs, setup.max_num_batched_tokens,
                                   config.scheduling_policy, micro_batches=self.pipeline_depth,
                                   bitmask_later=self.executor.samples_later)
        self.detokenizers: dict[str, IncrementalDetokenizer] = {}
        self.grammars = GrammarCompiler(self.tokenizer, setup.hf_config.vocab_size, setup.eos_token_ids)
        self.reasoning_tags = reasoning_tag_ids(self.tokenizer) if config.reasoning_parser else None
        self._compiling: list[tuple[Future, str, list[Request]]] = []  # (grammar, request id, its sequences)
        self.groups: dict[str, list[Request]] = {}  # request id -> its n sequences
        self._unsent: list[NewSequence] = []
        self._prompt_logprobs: dict[str, list] = {}
        self.in_flight: collections.deque = collections.deque()  # (SchedulerOutput, BatchInput, handle)
        # Async scheduling: while step n runs, schedule and launch n+1, so the GPU never waits for the host.
        self.async_scheduling = self.pipeline_depth == 1 and (
            config.async_scheduling if config.async_scheduling is not None
            else setup.on_gpus)
        # Pipeline parallel, async: each micro-batch's next step is launched before its tokens reach the driver
        # (the last stage sends them to the first, device to device), so the first stage never waits for the
        # driver's round trip: pp + 1 steps in flight.
        self.pipeline_ahead = self.pipeline_depth > 1 and config.async_scheduling is not False
        self.max_in_flight = self.pipeline_depth + self.pipeline_ahead
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.steps = 0
        self.startup_seconds = time.perf_counter() - t0
        logger.info("engine ready in %.1f s: %s, %d KV blocks of %d tokens, max_model_len %d", self.startup_seconds,
                    setup.model_dir.name, num_blocks, config.block_size, self.max_model_len)

    # -- requests -------------------------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams,
                    max_tokens_must_fit: bool = False) -> list[int]:
        """Queue a request (its n sequences). Returns the prompt token ids. Raises InvalidRequestError for a
        request this model cannot serve."""
        if request_id in self.groups:
            raise InvalidRequestError(f"request id {request_id!r} is already in use")
        ids = self.check_request(prompt, params, max_tokens_must_fit)
        self.add_checked(request_id, ids, params)
        return ids

    def check_request(self, prompt: str | list[int], params: SamplingParams,
                      max_tokens_must_fit: bool = False) -> list[int]:
        """Tokenize and check a request without queueing it; returns the prompt token ids."""
        return self.limits.checked_prompt(self.tokenizer, prompt, params, max_tokens_must_fit)

    def add_checked(self, request_id: str, ids: list[int], params: SamplingParams) -> None:
        max_tokens = min(params.max_tokens or self.max_model_len, self.max_model_len - len(ids))
        stop_ids = [] if params.ignore_eos else sorted(self.setup.eos_token_ids)
        seqs, parent = [], None
        for i in range(params.n):
            req = Request(f"{request_id}#{i}", ids, params, self.setup.eos_token_ids, max_tokens, index=i, parent=parent)
            parent = parent or req
            seqs.append(req)
            self.detokenizers[req.request_id] = IncrementalDetokenizer(self.tokenizer, ids, params)
            self._unsent.append(NewSequence(req.request_id, ids, params, req.seed, stop_ids + params.stop_token_ids))
            self.scheduler.add(req)
        self.groups[request_id] = seqs
        self.prompt_tokens += len(ids)
        if params.structured_outputs is not None:
            self._compiling.append((self.grammars.submit(params.structured_outputs), request_id, seqs))

    def abort(self, request_id: str) -> bool:
        seqs = self.groups.pop(request_id, None)
        if seqs is None:
            return False
        for req in seqs:
            self.scheduler.finish(req.request_id, "abort")
            self.detokenizers.pop(req.request_id, None)
            self._prompt_logprobs.pop(req.request_id, None)
        return True

    def fail(self, request_id: str, message: str) -> StreamDelta:
        """End a request (all its sequences) with an error; returns the delta that reports it."""
        self.abort(request_id)
        return StreamDelta(request_id, 0, [], "", error=message)

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work or bool(self.in_flight)

    @property
    def executor_down(self) -> bool:
        """The workers failed (a dead or stuck rank): no step can run any more."""
        return self.executor.is_dead

    # -- the step -------------------------------------------------------------------------------------------
    def step(self) -> list[StreamDelta]:
        """Run one step: finish the oldest step and return its deltas.

        Synchronous: schedule, run, finish. Async scheduling: launch the next step before finishing the one in
        flight; a constrained sequence's bitmask for it follows once the step in flight is read (executors that
        sample later), or the sequence waits a step (the others). Pipeline parallel:
        keep up to pp steps in flight. A step that raises while the executor is still up is run again one request
        at a time, so only the request at fault (a NaN-producing input, ...) fails."""
        failed = self._take_compiled_grammars() if self._compiling else []
        if self.pipeline_depth > 1:
            return failed + self._step_pipelined()
        if not self.async_scheduling or not self.in_flight:
            sched = self.scheduler.schedule()
            if not self.async_scheduling or not sched.scheduled:
                return failed + self._step_sync(sched)
            self._launch(sched)
        ahead = self.scheduler.schedule(ahead=True)
        if ahead is not None and ahead.scheduled:
            self._launch(ahead)
        elif ahead is not None:
            self.scheduler.requeue_finished_ids(ahead)
        sched, batch, handle = self.in_flight.popleft()
        try:
            result = self.executor.wait(handle)
        except Exception as e:
            for later, _, later_handle in self.in_flight:  # launched on top of the failed step: drop them
                self.executor.discard(later_handle)
                self.scheduler.rewind(later)
            self.in_flight.clear()
            self.scheduler.rewind(sched)
            return failed + self._recover(sched, batch, e)
        deltas = self._finish_step(sched, result)
        if self.in_flight and self.in_flight[0][1].bitmask_later:  # its grammars have now read this step's tokens
            later, later_batch, later_handle = self.in_flight[0]
            self.executor.sample(later_handle, self._bitmask(later.scheduled, later_batch.bitmask_rows))
        return failed + deltas

    def _take_compiled_grammars(self) -> list[StreamDelta]:
        """Give compiled grammars to their sequences, which may then be scheduled; fail the requests whose grammar
        did not compile. With nothing else to run, wait a little for one rather than spin."""
        s = self.scheduler
        if not s.running and not self.in_flight and all(r.waits_for_grammar for r in s.waiting):
            wait([future for future, _, _ in self._compiling], timeout=0.01, return_when=FIRST_COMPLETED)
        failed, compiling = [], []
        for future, request_id, seqs in self._compiling:
            if not future.done():
                compiling.append((future, request_id, seqs))
            elif request_id in self.groups:  # not aborted meanwhile
                try:
                    compiled = future.result()
                except Exception as e:  # noqa: BLE001 - a grammar xgrammar parsed but cannot compile
                    failed.append(self.fail(request_id, f"cannot compile the structured output's grammar: {e}"))
                    continue
                for req in seqs:
                    req.grammar, req.waits_for_grammar = SequenceGrammar(compiled, self._grammar_start(req)), False
        self._compiling = compiling
        return failed

    def _grammar_start(self, req: Request) -> int | None:
        """The token after which a reasoning model's structured output begins (None: from the first token)."""
        if self.reasoning_tags is None or reasoning_ended(req.prompt_token_ids, self.reasoning_tags):
            return None
        return self.reasoning_tags[1]

    def _step_sync(self, sched: SchedulerOutput) -> list[StreamDelta]:
        batch = self._batch(sched)
        try:
            result = self.executor.execute(batch)
        except Exception as e:
            return self._recover(sched, batch, e)
        self.scheduler.advance(sched)
        return self._finish_step(sched, result)

    def _launch(self, sched: SchedulerOutput) -> None:
        batch = self._batch(sched)
        self.in_flight.append((sched, batch, self.executor.execute_async(batch)))
        self.scheduler.advance(sched)

    def _recover(self, sched: SchedulerOutput, batch: BatchInput, error: Exception) -> list[StreamDelta]:
        if self.executor_down or not sched.scheduled:
            raise error
        logger.warning("a step of %d sequences failed (%s: %s); rerunning them one at a time",
                       len(sched.scheduled), type(error).__name__, error)
        return self._isolate(sched, batch)

    def _step_pipelined(self) -> list[StreamDelta]:
        while len(self.in_flight) < self.max_in_flight:
            sched = self.scheduler.schedule(ahead=True) if self.pipeline_ahead else None
            if sched is None:  # synchronous, or an ahead step would need a preemption
                sched = self.scheduler.schedule()
            if not sched.scheduled and self.in_flight:
                self.scheduler.requeue_finished_ids(sched)
                break
            for s in sched.scheduled:
                s.req.in_flight += 1
            self._launch(sched)
        sched, _, handle = self.in_flight.popleft()
        result = self.executor.wait(handle)
        for s in sched.scheduled:
            s.req.in_flight -= 1
        return self._finish_step(sched, result)

    def _batch(self, sched) -> BatchInput:
        batch = BatchInput(new_sequences=self._unsent, finished_ids=sched.finished_ids)
        self._unsent = []
        for s in sched.scheduled:
            _add_to_batch(batch, s)
        self._add_bitmask(batch, sched.scheduled)
        return batch

    def _add_bitmask(self, batch: BatchInput, scheduled: list[ScheduledRequest]) -> None:
        """The allowed next tokens of the constrained sequences that sample in this step; later (after the step
        in flight is read) where one decodes ahead of a token its grammar has not seen."""
        batch.bitmask_rows = [i for i, s in enumerate(scheduled) if s.sample and s.req.grammar is not None]
        if any(scheduled[i].req.num_pending for i in batch.bitmask_rows):
            batch.bitmask_later = True
        elif batch.bitmask_rows:
            batch.token_bitmask = self._bitmask(scheduled, batch.bitmask_rows)

    def _bitmask(self, scheduled: list[ScheduledRequest], rows: list[int]) -> np.ndarray:
        bitmask = np.empty((len(rows), self.grammars.bitmask_words), dtype=np.int32)
        for j, i in enumerate(rows):
            scheduled[i].req.grammar.fill_bitmask(bitmask, j)
        return bitmask

    def _isolate(self, sched: SchedulerOutput, batch: BatchInput) -> list[StreamDelta]:
        """Rerun a failed step's sequences one by one; fail the requests whose sequence fails on its own.

        Nothing of the failed step was applied (it was not advanced, or was rewound, and the sampler raises
        before it changes any state), so each rerun recomputes exactly what the step would have."""
        scheduled = {s.req.request_id for s in sched.scheduled}
        new = {seq.req_id: seq for seq in batch.new_sequences}
        # Sequences added but not scheduled in this step go out with the next one.
        self._unsent = [seq for seq in batch.new_sequences if seq.req_id not in scheduled] + self._unsent
        self.executor.execute(BatchInput(finished_ids=batch.finished_ids))  # the worker forgets finished ones
        ok, merged, errors = [], StepOutput(), []
        for s in sched.scheduled:
            req = s.req
            if req.is_finished:  # a sibling (n > 1) already failed the request
                continue
            one = BatchInput(new_sequences=[new[req.request_id]] if req.request_id in new else [])
            _add_to_batch(one, s)
            self._add_bitmask(one, [s])
            try:
                result = self.executor.execute(one)
            except Exception as e:
                if self.executor_down:
                    raise
                group_id = req.request_id.rpartition("#")[0]
                logger.error("request %s failed in the engine: %s: %s", group_id, type(e).__name__, e)
                errors.append(self.fail(group_id, f"the engine failed on this request: {type(e).__name__}: {e}"))
                continue
            ok.append(s)
            merged.sampled.update(result.sampled)
            merged.prompt_logprobs.update(result.prompt_logprobs)
        self.scheduler.advance(SchedulerOutput(scheduled=ok))
        return errors + self._finish_step(SchedulerOutput(scheduled=ok), merged)

    def _finish_step(self, sched, result) -> list[StreamDelta]:
        self.steps += 1
        rejected = self._advance_grammars(sched, result)
        self.scheduler.update(sched, {rid: r.token_id for rid, r in result.sampled.items()})
        for s in sched.scheduled:  # the grammar took a stop token: the output is complete
            if s.req.grammar is not None and s.req.grammar.is_terminated and not s.req.is_finished:
                self.scheduler.finish(s.req.request_id, "stop")
        for rid, (start, lps) in result.prompt_logprobs.items():
            self._prompt_logprobs.setdefault(rid, [None])[start + 1: start + 1 + len(lps)] = lps
        deltas = []
        for s in sched.scheduled:
            req = s.req
            sample = result.sampled.get(req.request_id)
            if not s.sample or sample is None or req.request_id not in self.detokenizers:
                continue
            try:
                deltas.append(self._delta(req, sample))
            except Exception as e:  # noqa: BLE001 - e.g. the tokenizer failed on this output: fail this request only
                group_id = req.request_id.rpartition("#")[0]
                logger.error("request %s failed in the engine: %s: %s", group_id, type(e).__name__, e)
                deltas.append(self.fail(group_id, f"the engine failed on this request: {type(e).__name__}: {e}"))
        for group_id in rejected:
            deltas.append(self.fail(group_id, "the engine sampled a token its grammar does not allow"))
        return deltas

    def _advance_grammars(self, sched: SchedulerOutput, result: StepOutput) -> set[str]:
        """Move each constrained sequence's matcher past its new token; the ids of requests whose token the
        grammar refused (a bug, never the user's: the bitmask allowed only grammar tokens)."""
        rejected = set()
        for s in sched.scheduled:
            sample = result.sampled.get(s.req.request_id)
            if s.req.grammar is not None and s.sample and sample is not None and not s.req.is_finished:
                if not s.req.grammar.accept(sample.token_id):
                    logger.error("request %s: token %d is outside its grammar", s.req.request_id, sample.token_id)
                    rejected.add(s.req.request_id.rpartition("#")[0])
        return rejected

    def _delta(self, req: Request, sample) -> StreamDelta:
        self.generation_tokens += 1
        detok = self.detokenizers[req.request_id]
        if req.finish_reason == "stop" and not isinstance(req.stop_reason, str):
            text, stop = "", None  # ended on EOS or a stop token id: its own text is not output (as vLLM)
        else:
            text, stop = detok.add([sample.token_id])
        if stop is not None:
            self.scheduler.finish(req.request_id, "stop", stop)
        elif req.is_finished:
            text += detok.flush()
        first = len(req.output_token_ids) == 1
        logprobs = [sample.logprobs] if sample.logprobs is not None else None
        prompt_logprobs = self._prompt_logprobs.pop(req.request_id, None) if first else None
        delta = StreamDelta(request_id=req.request_id.rpartition("#")[0], index=req.index, token_ids=[sample.token_id],
                            text=text, finish_reason=req.finish_reason, stop_reason=req.stop_reason,
                            logprobs=logprobs, prompt_token_ids=req.prompt_token_ids if first else None,
                            num_cached_tokens=req.num_cached_tokens, prompt_logprobs=prompt_logprobs)
        if logprobs is not None or prompt_logprobs is not None:
            delta.token_texts = token_texts(self.tokenizer, req.prompt_token_ids if prompt_logprobs else [],
                                            [*(prompt_logprobs or []), *(logprobs or [])])
        if req.is_finished:
            self._forget(req)
        return delta

    def _forget(self, req: Request) -> None:
        self.detokenizers.pop(req.request_id, None)
        self._prompt_logprobs.pop(req.request_id, None)
        group_id = req.request_id.rpartition("#")[0]
        seqs = self.groups.get(group_id)
        if seqs is not None and all(r.is_finished for r in seqs):
            del self.groups[group_id]

    def stats(self) -> EngineStats:
        s = self.scheduler
        return EngineStats(waiting=len(s.waiting), running=len(s.running), kv_blocks_used=self.kv.num_used,
                           kv_blocks_total=self.kv.pool.num_blocks, prefix_cache_queries=self.kv.prefix_queries,
                           prefix_cache_hits=self.kv.prefix_hits, preemptions=s.num_preemptions,
                           prompt_tokens=self.prompt_tokens, generation_tokens=self.generation_tokens,
                           steps=self.steps, cached_block_hashes=self.kv.cached_hashes())

    def shutdown(self) -> None:
        self.grammars.shutdown()
        self.executor.shutdown()


def _add_to_batch(batch: BatchInput, s: ScheduledRequest) -> None:
    req = s.req
    batch.req_ids.append(req.request_id)
    tokens = req.token_slice(req.num_computed_tokens, req.num_computed_tokens + s.num_new_tokens)
    batch.token_ids.append(tokens + [PENDING_TOKEN] * (s.num_new_tokens - len(tokens)))  # sampled, not yet seen
    batch.start_positions.append(req.num_computed_tokens)
    batch.block_tables.append(list(req.block_ids))
    batch.sample.append(s.sample)
