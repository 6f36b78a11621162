"""The engine loop: apply the callers' commands, step the EngineCore while it has work, hand out each step's deltas.

One loop, run in one of two places (`EngineConfig.engine_core_process`):
- CoreThread: a thread of the caller's process (the offline engine's companion, tests, CPU laptops);
- a process of its own (engine/core_process.py), so the step loop never waits for the GIL that a web server's
  event loop holds while it streams every token (vLLM v1's layout).
"""
from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable

from engine.config import EngineConfig
from engine.core import EngineCore
from engine.errors import EngineDeadError
from engine.outputs import EngineStats, StreamDelta

logger = logging.getLogger("strata")

# Commands: ("add", request_id, prompt_token_ids, SamplingParams) and ("abort", request_id).
Command = tuple


class CoreRunner:
    """Runs `core` until stopped. `take_commands(wait)` returns the commands queued since the last call, waiting
    (briefly) for one when `wait`; `publish(deltas, stats)` hands out a step's results."""

    def __init__(self, core: EngineCore, take_commands: Callable[[bool], list[Command]],
                 publish: Callable[[list[StreamDelta], EngineStats], None]):
        self.core, self.take_commands, self.publish = core, take_commands, publish
        self.step_started: float | None = None  # monotonic time the running step began
        self.error: BaseException | None = None  # set when no later step can run
        self.stopped = False

    def run(self) -> None:
        core = self.core
        while not self.stopped and self.error is None:
            deltas = []
            for command in self.take_commands(not core.has_work):
                deltas += self._apply(command)
            if core.has_work:
                self.step_started = time.monotonic()
                try:
                    deltas += core.step()
                except Exception as e:  # noqa: BLE001 - fail the batch's requests (core.step isolates what it can)
                    logger.exception("engine step failed")
                    deltas += self._fail_all(f"engine step failed: {e}")
                    if core.executor_down:  # no later step can run: refuse new requests, fail health checks
                        self.error = e
                self.step_started = None
            if deltas or not core.has_work:
                self.publish(deltas, core.stats())

    def _apply(self, command: Command) -> list[StreamDelta]:
        if command[0] == "abort":
            self.core.abort(command[1])
            return []
        _, rid, ids, params = command
        try:
            self.core.add_checked(rid, ids, params)
        except Exception as e:  # noqa: BLE001 - this request alone fails
            return [StreamDelta(rid, 0, [], "", error=str(e))]
        return []

    def _fail_all(self, message: str) -> list[StreamDelta]:
        ids = list(self.core.groups)
        for rid in ids:
            self.core.abort(rid)
        return [StreamDelta(rid, 0, [], "", error=message) for rid in ids]


class CoreThread:
    """The engine loop on a thread of this process. `publish(deltas)` is called from that thread; `on_death(error)`
    once if the loop dies."""

    def __init__(self, config: EngineConfig, publish: Callable[[list[StreamDelta]], None],
                 on_death: Callable[[BaseException], None]):
        self.core = EngineCore(config)
        self.limits, self.max_num_seqs = self.core.limits, self.core.setup.max_num_seqs
        self._commands: collections.deque = collections.deque()
        self._wake = threading.Event()
        self._stats = self.core.stats()
        self._publish, self._on_death = publish, on_death
        self.runner = CoreRunner(self.core, self._take, self._deliver)
        self._thread = threading.Thread(target=self._run, name="strata-engine-loop", daemon=True)
        self._thread.start()

    def send(self, command: Command) -> None:
        self._commands.append(command)
        self._wake.set()

    def stats(self) -> EngineStats:
        return self._stats

    @property
    def error(self) -> BaseException | None:
        if self.runner.error is None and not self._thread.is_alive():
            return EngineDeadError("the engine loop thread ended")
        return self.runner.error

    def check_health(self, stall_seconds: float) -> None:
        started = self.runner.step_started
        if started is not None and time.monotonic() - started > stall_seconds:
            raise EngineDeadError(f"engine loop stalled: one step has run for {time.monotonic() - started:.0f} s")
        try:
            self.core.executor.check_health()
        except Exception as e:  # noqa: BLE001 - any worker failure makes the replica unhealthy
            raise EngineDeadError(str(e)) from e

    def shutdown(self) -> None:
        self.runner.stopped = True
        self._wake.set()
        self._thread.join(timeout=30)
        self.core.shutdown()

    def _take(self, wait: bool) -> list[Command]:
        if wait and not self._commands:
            self._wake.wait(timeout=1.0)
        self._wake.clear()
        taken = []
        while self._commands:
            taken.append(self._commands.popleft())
        return taken

    def _deliver(self, deltas: list[StreamDelta], stats: EngineStats) -> None:
        self._stats = stats
        if deltas:
            self._publish(deltas)

    def _run(self) -> None:
        try:
            self.runner.run()
        except BaseException as e:  # noqa: BLE001
            self.runner.error = e
            logger.exception("engine loop died")
        if self.runner.error is not None:
            self._on_death(self.runner.error)
