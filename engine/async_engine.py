"""AsyncEngine: the server-facing engine. asyncio callers get streams of deltas; the engine loop runs on a thread
of this process or, with `engine_core_process`, in a process of its own (engine/core_runner.py, core_process.py)."""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable

from engine.config import EngineConfig
from engine.core_process import CoreProcess
from engine.core_runner import CoreThread
from engine.errors import EngineDeadError, InvalidRequestError
from engine.model_setup import shard_device
from engine.tokenizer import get_tokenizer
from engine.outputs import EngineStats, StreamDelta
from engine.sampling_params import SamplingParams

logger = logging.getLogger("strata")


class AsyncEngine:
    def __init__(self, config: EngineConfig | None = None, **kwargs):
        self.config = config or EngineConfig(**kwargs)
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        own_process = self.config.engine_core_process
        if own_process is None and self.config.world_size == 1:  # on one H100 the whole stack at concurrency 256
            own_process = shard_device(self.config).type == "cuda"  # made 99.1% of an in-process engine so, 86.6%
        in_process = bool(own_process) and self.config.world_size == 1  # with the loop on a thread
        loop_class = CoreProcess if in_process else CoreThread
        self._loop = loop_class(self.config, self._publish, self._fail_streams)
        self.tokenizer = get_tokenizer(self.config)

    @property
    def max_model_len(self) -> int:
        return self._loop.limits.max_model_len

    @property
    def max_num_seqs(self) -> int:
        return self._loop.max_num_seqs

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
        ids = self._loop.limits.checked_prompt(self.tokenizer, prompt, params, max_tokens_must_fit)
        queue: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = (asyncio.get_running_loop(), queue)
        self._loop.send(("add", request_id, ids, params))
        return self._stream(request_id, queue, params.n, stream_interval)

    async def generate(self, request_id: str, prompt: str | list[int], params: SamplingParams) -> list[StreamDelta]:
        return [d async for d in self.add_request(request_id, prompt, params)]

    def abort(self, request_id: str) -> None:
        try:
            self._loop.send(("abort", request_id))
        except EngineDeadError:  # nothing runs any more
            pass

    def stats(self) -> EngineStats:
        return self._loop.stats()

    @property
    def errored(self) -> bool:
        """The engine cannot serve any more (its loop died or its workers failed); one failed request does not
        count. Cheap: no worker is pinged."""
        return self._loop.error is not None

    def check_health(self, stall_seconds: float = 60.0) -> None:
        """Raises if the engine loop died, one step has run longer than `stall_seconds`, or a worker failed."""
        self._raise_if_dead()
        self._loop.check_health(stall_seconds)

    def shutdown(self) -> None:
        self._loop.shutdown()

    def _raise_if_dead(self) -> None:
        if self.errored:
            raise EngineDeadError(f"the engine is down: {self._loop.error!r}")

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

    def _fail_streams(self, error: BaseException) -> None:
        """The loop died: every open stream ends with an error."""
        self._publish([StreamDelta(rid, 0, [], "", error=f"engine loop died: {error!r}") for rid in list(self._streams)])

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
