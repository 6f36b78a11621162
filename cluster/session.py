"""RequestSession: one API request from its submission to its last token, answered whole or as server-sent events.

It sends one engine request per prompt to the model's replicas, folds their deltas into the response
(cluster/responses.py) and keeps the request's metrics. It holds the request path's one retry loop: when a
replica fails (its actor, node or engine is gone) before any of the request's output reached the client, the
request moves to another replica, `request_retries` times at most, whether the failure came before the replica
accepted it or while it ran. A whole response can always move; a stream until its first token, after which
it ends with an error event and `data: [DONE]`.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator

from fastapi.responses import JSONResponse, StreamingResponse

from cluster.errors import APIError
from cluster.metrics import ServingMetrics
from cluster.model_endpoint import ModelEndpoint, ReplicaFailure, ReplicaStream, merge_streams
from cluster.protocol import SamplingRequest
from cluster.responses import ResponseBuilder, sse
from engine import InvalidRequestError, SamplingParams, StreamDelta

logger = logging.getLogger("strata")


class RequestTiming:
    """Latency metrics of one request: TTFT, inter-token latency per completion, end-to-end."""

    def __init__(self, metrics: ServingMetrics, model: str, arrival: float, num_choices: int):
        self.metrics, self.model, self.arrival = metrics, model, arrival
        self.last_token: list[float | None] = [None] * num_choices
        self.first_token_seen = False

    def on_delta(self, choice: int, delta: StreamDelta) -> None:
        now = time.monotonic()
        if delta.token_ids and not self.first_token_seen:
            self.first_token_seen = True
            self.metrics.time_to_first_token.labels(self.model).observe(now - self.arrival)
        last = self.last_token[choice]
        if last is not None and delta.token_ids:  # a delta may carry several tokens that piled up
            for _ in delta.token_ids:
                self.metrics.inter_token_latency.labels(self.model).observe((now - last) / len(delta.token_ids))
        self.last_token[choice] = now
        if delta.finish_reason is not None:
            self.metrics.finished.labels(self.model, delta.finish_reason).inc()

    def done(self, status: str) -> None:
        self.metrics.requests.labels(self.model, status).inc()
        if status == "200":
            self.metrics.e2e_latency.labels(self.model).observe(time.monotonic() - self.arrival)


class RequestSession:
    def __init__(self, endpoint: ModelEndpoint, body: SamplingRequest, builder: ResponseBuilder,
                 params: SamplingParams, metrics: ServingMetrics):
        self.endpoint, self.body, self.builder, self.params = endpoint, body, builder, params
        self.metrics = metrics
        self.arrival = time.monotonic()
        self.deadline = self.arrival + endpoint.config.queue_timeout_s
        self.timing = RequestTiming(metrics, endpoint.name, self.arrival, len(builder.choices))
        self.streams: list[ReplicaStream] = []
        self.attempts = 0
        self.sent = False  # some output reached the client: the request can no longer move

    async def respond(self, stream: bool) -> JSONResponse | StreamingResponse:
        """Submit the request (errors before the response starts become its HTTP status), then answer."""
        await self._submit()
        if stream:
            return StreamingResponse(self._events(), media_type="text/event-stream", headers=self._replica_header())
        try:
            async for prompt_index, delta in self._deltas():
                if delta.error is not None:
                    raise APIError(500, delta.error, "internal_error")
                self.timing.on_delta(self.builder.add(prompt_index, delta), delta)
        finally:
            self._cancel()
        self.timing.done("200")
        return JSONResponse(self.builder.response().model_dump(), headers=self._replica_header())

    # -- the retry loop -------------------------------------------------------------------------------------
    async def _submit(self) -> None:
        """One engine request per prompt, submitted one after another: Serve gives all handle calls made within
        one HTTP request the same internal request id, and its router loses track of concurrent ones."""
        while True:
            try:
                self.streams = []
                for rid, prompt in zip(self._request_ids(), self.builder.prompts):
                    self.streams.append(await self.endpoint.submit(rid, prompt.token_ids, self.params,
                                                                   self.deadline))
                break
            except ReplicaFailure as e:
                await self._retry_after(e)
            except InvalidRequestError as e:
                self._cancel()
                raise self.body.api_error(e) from None
            except BaseException:
                self._cancel()  # requests accepted before another failed must not keep running
                raise
        for s in self.streams:
            self.metrics.queue_time.labels(self.endpoint.name).observe(s.queue_time)

    async def _deltas(self) -> AsyncIterator[tuple[int, StreamDelta]]:
        """Every prompt's deltas, tagged with the prompt's position, moving to another replica on a failure."""
        while True:
            try:
                async for item in merge_streams(self.streams):
                    yield item
                return
            except ReplicaFailure as e:
                if self.sent:
                    raise self.endpoint.unavailable(str(e)) from None
                await self._retry_after(e)
                await self._submit()

    async def _retry_after(self, failure: ReplicaFailure) -> None:
        """Forget the failed attempt, or raise 503 once the request's retries or its deadline are spent."""
        self._cancel()
        self.attempts += 1
        if self.attempts > self.endpoint.config.request_retries or time.monotonic() >= self.deadline:
            raise self.endpoint.unavailable(f"{failure} (tried {self.attempts} times)") from None
        logger.warning("request %s: %s; sending it to another replica", self.builder.request_id, failure)
        self.builder.reset()
        await asyncio.sleep(0.05 * 2 ** (self.attempts - 1))  # lets the router learn that the replica is gone

    # -- server-sent events ---------------------------------------------------------------------------------
    async def _events(self) -> AsyncIterator[str]:
        status = "200"
        try:
            if self.builder.kind == "chat":
                yield sse(self.builder.role_chunk())
            try:
                async for prompt_index, delta in self._deltas():
                    if delta.error is not None:
                        status = "500"
                        yield sse(APIError(500, delta.error, "internal_error").body())
                        break
                    chunk = self.builder.chunk(prompt_index, delta)
                    self.timing.on_delta(prompt_index * self.builder.n + delta.index, delta)
                    if _has_content(chunk):
                        self.sent = True
                        yield sse(chunk)
            except APIError as error:  # the request could not move to another replica
                status = str(error.status)
                yield sse(error.body())
            if self.body.include_usage_in_stream and status == "200":
                yield sse(self.builder.usage_chunk())
            yield "data: [DONE]\n\n"
        except asyncio.CancelledError:
            status = "499"  # the client went away
            raise
        finally:
            self._cancel()  # aborts the engine requests still running, which frees their KV blocks
            self.timing.done(status)

    # -- helpers --------------------------------------------------------------------------------------------
    def _request_ids(self) -> list[str]:
        rid = self.builder.request_id
        n = len(self.builder.prompts)
        return [rid] if n == 1 else [f"{rid}-{i}" for i in range(n)]

    def _cancel(self) -> None:
        for s in self.streams:
            s.cancel()

    def _replica_header(self) -> dict[str, str]:
        return {"X-Strata-Replica": ",".join(s.replica_id for s in self.streams)}


def _has_content(chunk) -> bool:
    c = chunk.choices[0]
    text = (c.delta.content or c.delta.reasoning_content or c.delta.tool_calls) if hasattr(c, "delta") else c.text
    return bool(text) or c.finish_reason is not None or c.logprobs is not None
