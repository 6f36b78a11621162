"""AsyncEngine: the server-facing engine. The model runs on its own thread; asyncio callers get streams of deltas."""
from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable

from engine.config import EngineConfig
from engine.core import EngineCore
from engine.errors import EngineDeadError, InvalidRequestError
from engine.outputs import EngineStats, StreamDelta
from engine.sampling_params import SamplingParams

logger = logging.getLogger("strata")


class AsyncEngine:
    def __init__(self, config: EngineConfig | None = None, **kwargs):
        self.config = config or EngineConfig(**kwargs)
        self.core = EngineCore(self.config)
        self.tokenizer = self.core.tokenizer
        self._commands: collections.deque = collections.deque()
        self._wake = threading.Event()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._stats = self.core.stats()
        self._step_started: float | None = None
        self._stopped = False
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="strata-engine-loop", daemon=True)
        self._thread.start()

    @property
    def max_model_len(self) -> int:
        return self.core.max_model_len

    @property
    def max_num_seqs(self) -> int:
        return self.core.setup.max_num_seqs

    # -- public API -----------------------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams,
                    stream_interval: Callable[[], float] | None = None,
                    max_tokens_must_fit: bool = False) -> AsyncIterator[StreamDelta]:
        """Check and queue a request; returns its stream of deltas. Raises InvalidRequestError for a request the
        model cannot serve, and EngineDeadError when the engine is down. A max_tokens beyond the context is capped
        at it, or with `max_tokens_must_fit` (an API server, which must say so) refused.
        Closing the stream early (e.g. a client that went away) aborts the request and frees its blocks.
        `stream_interval()`: least seconds between two deltas after the first (a server that pays per message
        spaces them, merging the tokens in between); the first delta always goes at once."""
        self._raise_if_dead()
        if request_id in self._streams:
            raise InvalidRequestError(f"request id {request_id!r} is already in use")
        ids = self.core.check_request(prompt, params, max_tokens_must_fit)
        queue: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = (asyncio.get_running_loop(), queue)
        self._commands.append(("add", request_id, ids, params))
        self._wake.set()
        return self._stream(request_id, queue, params.n, stream_interval)

    async def generate(self, request_id: str, prompt: str | list[int], params: SamplingParams) -> list[StreamDelta]:
        return [d async for d in self.add_request(request_id, prompt, params)]

    def abort(self, request_id: str) -> None:
        self._commands.append(("abort", request_id))
        self._wake.set()

    def stats(self) -> EngineStats:
        return self._stats

    @property
    def errored(self) -> bool:
        """The engine cannot serve any more (its loop died or its workers failed); one failed request does not
        count. Cheap: no worker is pinged."""
        return self._error is not None or not self._thread.is_alive()

    def check_health(self, stall_seconds: float = 60.0) -> None:
        """Raises if the engine loop died or one step has run longer than `stall_seconds`."""
        self._raise_if_dead()
        started = self._step_started
        if started is not None and time.monotonic() - started > stall_seconds:
            raise EngineDeadError(f"engine loop stalled: one step has run for {time.monotonic() - started:.0f} s")
        try:
            self.core.executor.check_health()
        except Exception as e:  # noqa: BLE001 - any worker failure makes the replica unhealthy
            raise EngineDeadError(str(e)) from e

    def shutdown(self) -> None:
        self._stopped = True
        self._wake.set()
        self._thread.join(timeout=30)
        self.core.shutdown()

    # -- the loop thread ------------------------------------------------------------------------------------
    def _raise_if_dead(self) -> None:
        if self.errored:
            raise EngineDeadError(f"the engine is down: {self._error!r}")

    async def _stream(self, request_id: str, queue: asyncio.Queue, n: int,
                      stream_interval: Callable[[], float] | None) -> AsyncIterator[StreamDelta]:
        """Deltas as they come; a consumer that falls behind (a busy server loop) gets the deltas that piled up
        for one completion as one, so it catches up instead of handling one message per token."""
        done = 0
        held: StreamDelta | None = None  # taken from the queue but belonging to another completion
        last_sent: float | None = None
        try:
            while done < n:
                delta, held = held or await queue.get(), None
                if stream_interval and last_sent is not None and delta.finish_reason is None and delta.error is None:
                    wait = last_sent + stream_interval() - time.monotonic()
                    if wait > 0:  # sleep rather than wait on the queue: a cancelled get could drop a delta
                        await asyncio.sleep(wait)
                while delta.finish_reason is None and delta.error is None and not queue.empty():
                    later = queue.get_nowait()
                    if later.index != delta.index or later.error is not None:
                        held = later
                        break
                    delta = delta.followed_by(later)
                if delta.finish_reason is not None or delta.error is not None:
                    done += 1 if delta.error is None else n
                last_sent = time.monotonic()
                yield delta
        finally:
            if done < n:
                self.abort(request_id)
            self._streams.pop(request_id, None)

    def _run(self) -> None:
        try:
            while not self._stopped:
                self._apply_commands()
                if not self.core.has_work:
                    self._stats = self.core.stats()
                    self._wake.wait(timeout=1.0)
                    self._wake.clear()
                    continue
                self._step_started = time.monotonic()
                try:
                    deltas = self.core.step()
                except Exception as e:  # noqa: BLE001 - fail the batch's requests (core.step isolates what it can)
                    logger.exception("engine step failed")
                    deltas = self._fail_all(f"engine step failed: {e}")
                    if self.core.executor_down:  # no later step can run: refuse new requests, fail health checks
                        self._error = e
                self._step_started = None
                self._stats = self.core.stats()
                self._publish(deltas)
        except BaseException as e:  # noqa: BLE001
            self._error = e
            logger.exception("engine loop died")
            self._publish([StreamDelta(rid, 0, [], "", error=f"engine loop died: {e!r}") for rid in list(self._streams)])

    def _apply_commands(self) -> None:
        while self._commands:
            cmd = self._commands.popleft()
            if cmd[0] == "add":
                _, rid, ids, params = cmd
                try:
                    self.core.add_checked(rid, ids, params)
                except Exception as e:  # noqa: BLE001
                    self._publish([StreamDelta(rid, 0, [], "", error=str(e))])
            else:
                self.core.abort(cmd[1])

    def _fail_all(self, message: str) -> list[StreamDelta]:
        ids = list(self.core.groups)
        for rid in ids:
            self.core.abort(rid)
        return [StreamDelta(rid, 0, [], "", error=message) for rid in ids]

    def _publish(self, deltas: list[StreamDelta]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for d in deltas:
            target = self._streams.get(d.request_id)
            if target is not None:
                by_loop.setdefault(target[0], []).append((target[1], d))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, items)
            except RuntimeError:  # that event loop has closed
                pass


def _deliver(items) -> None:
    for queue, delta in items:
        queue.put_nowait(delta)
