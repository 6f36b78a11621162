"""One rank of a tensor/pipeline-parallel replica: the ModelRunner of its (stage, TP rank) shard.

The driver (engine/executor/ray.py) runs one Worker per device as an asyncio Ray actor. All torch work runs on
a single thread, in the order the driver numbered the steps, so the event loop stays free to answer pings while
a step runs, and the next batches can arrive and queue while this stage still works on an earlier one.

When the driver shares the host, steps come through shared memory instead (`serve_channel`): a loop on that
thread reads each batch as it arrives and writes the outputs back, with no Ray call per step."""
from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from engine.executor.shm_channel import ShmChannel
from engine.model_runner import LaunchedStep, ModelRunner
from engine.parallel_state import DistributedInitError, PPStage, TPGroup, init_distributed, open_store
from engine.step import BatchInput, StepOutput

BATCH_POLL_S = 20e-6  # while a launched step runs: how often to look for the next batch


class Worker:
    def __init__(self):
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="strata-rank")
        self.turn = asyncio.Condition()
        self.next_seq = 0
        self.step_started: float | None = None
        self.store = None
        self.runner: ModelRunner | None = None
        self.tp, self.pp = TPGroup(), PPStage()
        self.device = torch.device("cpu")

    async def _run(self, fn, *args):
        return await asyncio.wrap_future(self.pool.submit(fn, *args))

    # -- setup ----------------------------------------------------------------------------------------------
    async def open_store(self, world: int, timeout_s: float) -> int:
        """Rank 0 hosts the rendezvous store; returns its port."""
        self.store = await self._run(open_store, world, timeout_s)
        return self.store.port

    async def init_distributed(self, rank: int, world: int, tp: int, addr: str, port: int, timeout_s: float,
                               device: str, node_ip: str, device_index: int = 0) -> list[int]:
        """Join the process group. Returns the ranks that did not join in time (empty on success)."""
        self.device = torch.device(device, device_index) if device == "cuda" else torch.device(device)
        try:
            self.tp, self.pp = await self._run(init_distributed, rank, world, tp, addr, port, timeout_s, self.device,
                                               node_ip, self.store)
        except DistributedInitError as e:
            return e.missing
        return []

    async def load(self, runner_kwargs: dict, layer_range: tuple[int, int]) -> None:
        kwargs = dict(runner_kwargs, device=self.device, tp=self.tp, layer_range=layer_range)
        self.runner = await self._run(lambda: ModelRunner(**kwargs))

    async def call(self, method: str, *args):
        """A ModelRunner method (kv_block_bytes, profile, allocate_kv_cache)."""
        return await self._run(getattr(self.runner, method), *args)

    # -- steps ----------------------------------------------------------------------------------------------
    async def execute(self, seq: int, batch: BatchInput) -> StepOutput | None:
        """Run step `seq` after every earlier step. Only the last stage's TP rank 0 returns the output.

        Without pipeline stages a step is launched and finished as two jobs of the rank's thread, so a next step
        that has already arrived (async scheduling sends it early) is launched before this one is waited for:
        the GPU gets step n+1 queued while the host waits for step n's tokens."""
        split = self.pp.size == 1 and bool(batch.req_ids) and not self._gathers_when_finishing(batch)
        async with self.turn:
            await self.turn.wait_for(lambda: self.next_seq == seq)
            done = self.pool.submit(self._timed, self.runner.launch if split else self._step, batch)
            self.next_seq += 1
            self.turn.notify_all()
        if not split:
            return await asyncio.wrap_future(done)
        launched = await asyncio.wrap_future(done)
        out = await asyncio.wrap_future(self.pool.submit(self._timed, self.runner.finish, launched))
        return out if self.tp.rank == 0 else None

    async def serve_channel(self, batches: str, reader: int, outputs: str | None) -> None:
        """Run the steps of the shared-memory channel `batches` (this rank reads as `reader`) until a None comes,
        with `execute`'s semantics; the rank that reports outputs writes one per step (None for an empty batch)
        to the channel `outputs`. Returns when stopped, raises when a step fails."""
        await self._run(self._serve, batches, reader, outputs)

    def _gathers_when_finishing(self, batch: BatchInput) -> bool:
        """Prompt logprobs gather logits over the TP group when the step finishes. Such a step runs as one job in
        step order: split, one rank could launch the next step (its all-reduces) before finishing this one while
        another finishes first, and the two ranks' collectives would not pair up."""
        params = [seq.params for seq in batch.new_sequences]
        params += [state.params for r in batch.req_ids if (state := self.runner.states.get(r)) is not None]
        return any(p.prompt_logprobs is not None for p in params)

    def _serve(self, batches_name: str, reader: int, outputs_name: str | None) -> None:
        batches = ShmChannel.attach(batches_name, reader)
        outputs = outputs_name and ShmChannel.attach(outputs_name)

        def report(out: StepOutput | None) -> None:
            if outputs:
                outputs.write(out)

        # A launched step not finished yet (one stage, or the last pipeline stage): the next step is launched
        # before it is finished, so the device has work queued while this thread waits for the sampled tokens. It
        # is finished first when the device is done with it before the next batch comes, and at once when it has
        # prompt logprobs, whose logits gather over the TP group (every rank must do that before launching the next
        # step, whatever each has received by then). The first stage does not wait for it: it receives the sampled
        # tokens device to device.
        pending = None

        def finish_pending() -> None:
            nonlocal pending
            if pending is not None:
                report(self._timed(self.runner.finish, pending))
                pending = None

        try:
            while True:
                if pending is not None and (pending.hidden is not None
                                            or not self._batch_comes_first(batches, pending)):
                    finish_pending()
                batch = batches.read()
                launched = None
                if batch is not None and batch.req_ids and self.pp.is_last:
                    launched = self._timed(self._launch, batch)
                finish_pending()
                pending = launched
                if batch is None:
                    return
                if launched is None:
                    report(self._timed(self._step, batch))
        finally:
            for channel in (batches, outputs):
                if channel:
                    channel.close()

    @staticmethod
    def _batch_comes_first(batches: ShmChannel, step: LaunchedStep) -> bool:
        """Wait for the next batch or for the device to finish `step`, whichever comes first; True for the batch.
        Launched before `step` is finished, the next step is queued behind it and the device never idles (finished
        first, it would wait out this thread's reading and launching of the next step: batch-1 decode at TP=2 on two
        H200s took 3.81 ms a step that way, 3.40 this way). On CPU a launched step is already done."""
        done = step.sampled.ready if step.sampled is not None else None
        while not batches.ready():
            if done is None or done.query():
                return False
            time.sleep(BATCH_POLL_S)
        return True

    def _timed(self, fn, *args):
        """Run fn on the rank's thread, marking when it started (ping reports a step that hangs)."""
        self.step_started = time.monotonic()
        try:
            return fn(*args)
        finally:
            self.step_started = None

    def _receive(self, batch: BatchInput) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The previous stage's hidden states and residuals for this batch (None on the first stage)."""
        if self.pp.is_first:
            return None
        n = sum(len(t) for t in batch.token_ids)
        return self.pp.recv(n, self.runner.hf_config.hidden_size, self.runner.dtype, self.device)

    def _launch(self, batch: BatchInput) -> LaunchedStep | None:
        """Queue a step's work on the device. A stage before the last sends its hidden states on (and the first
        stage expects the tokens its sampling rows get); the last stage sends the first its sampled tokens,
        which steps scheduled ahead decode before the driver has seen them."""
        out = self.runner.launch(batch, self._receive(batch))
        if not self.pp.is_last:
            self.pp.send(*out.to_next_stage)
            if self.pp.is_first and any(batch.sample):
                self.runner.expect_tokens(batch, self.pp.recv_tokens(sum(batch.sample), self.device))
            return None
        if self.pp.size > 1 and out.sampled is not None:
            self.pp.send_tokens(out.sampled.tokens)
        return out

    def _step(self, batch: BatchInput) -> StepOutput | None:
        if not batch.req_ids:
            self.runner.update_states(batch)
            return None
        step = self._launch(batch)
        if step is None:
            return None
        out = self.runner.finish(step)
        return out if self.tp.rank == 0 else None

    async def ping(self) -> float:
        """Seconds the current step has been running (0 when idle): a hung step shows up here."""
        started = self.step_started
        return 0.0 if started is None else time.monotonic() - started
