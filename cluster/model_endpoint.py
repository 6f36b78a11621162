"""ModelEndpoint: the ingress's side of one served model — its tokenizer, and one request sent to its replicas.

A request is submitted through the model's streaming DeploymentHandle (whose router is PrefixAwareRouter) and
the ingress waits for the replica's `Accepted` before it answers the client, so every failure to start becomes
a proper HTTP status: 429 when the model's queue is full, 503 (with Retry-After) when no replica took the
request by its deadline — the model is scaled to zero and a replica is starting, or all replicas are busy —
and 400 when the engine refused the input (raised as the engine's InvalidRequestError, which the request model
names in the API's terms).

A replica that dies (its actor or node is gone) or whose engine went down is not the request's fault: `submit`
and the stream raise `ReplicaFailure`, and the request's session (cluster/session.py) decides whether to send it
to another replica. This module makes one attempt at a time and never retries.

LocalModelEndpoint: the same for an engine in the ingress's own process (`engine_in_ingress`): the replica's
protocol, called directly.
"""
from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass

from grpc.aio import AioRpcError
from ray.exceptions import (ActorUnavailableError, NodeDiedError, ObjectLostError, RayActorError, RayError,
                            WorkerCrashedError)
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve._private.constants import RAY_SERVE_USE_GRPC_BY_DEFAULT
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator

from cluster.config import LimitsConfig, ModelConfig
from cluster.errors import APIError
from cluster.replica import Accepted, GenerateRequest, Rejected, ReplicaFailed
from cluster.responses import Prompt
from cluster.tool_calls import ToolCallParserName, default_parser
from engine import InvalidRequestError, SamplingParams, StreamDelta, apply_chat_template, get_tokenizer

logger = logging.getLogger("strata")

# What a replica's death looks like from a handle call (the actor, its worker process or its node is gone); over
# Serve's gRPC path Serve turns an unreachable replica into ActorUnavailableError, and a stream cut off in another
# way is a raw gRPC error.
REPLICA_GONE = (RayActorError, ActorUnavailableError, WorkerCrashedError, NodeDiedError, ObjectLostError,
                AioRpcError)


class ReplicaFailure(Exception):
    """The replica serving a request failed (not the request's fault): another replica may serve it."""


@dataclass
class ReplicaStream:
    """An accepted request: the replica's stream of StreamDeltas (the first may have come with `Accepted`)."""

    generator: DeploymentResponseGenerator | AsyncGenerator
    replica_id: str
    queue_time: float
    first_delta: StreamDelta | None = None

    def cancel(self) -> None:
        cancel_quietly(self.generator)


def cancel_quietly(generator: DeploymentResponseGenerator | AsyncGenerator) -> None:
    """Cancel a handle call, or close a local replica's stream (aborting its engine request); Serve's cancel()
    re-raises the call's own error."""
    if inspect.isasyncgen(generator):
        asyncio.ensure_future(_close(generator))
        return
    try:
        generator.cancel()
    except Exception:  # noqa: BLE001 - the call already failed or finished: nothing left to cancel
        pass


async def _close(generator: AsyncGenerator) -> None:
    try:
        await generator.aclose()
    except RuntimeError:  # a task iterating it is being cancelled, which closes it as well
        pass


class ModelEndpoint:
    def __init__(self, config: ModelConfig, handle: DeploymentHandle, limits: LimitsConfig):
        self.config = config
        self.name = config.served_name
        self.limits = limits
        self.handle = handle
        # The handle arrives pickled with the options of the process that built the app (a driver that keeps
        # Serve's defaults: Ray actor calls); the transport is this process's, so Serve's gRPC path where the
        # cluster's environment turns it on (cluster/serve_env.py).
        self.stream_handle = handle and handle.options(stream=True, method_name="generate",
                                                       _by_reference=not RAY_SERVE_USE_GRPC_BY_DEFAULT)
        self.tokenizer = get_tokenizer(config.engine_config())
        self._max_model_len: int | None = None

    # -- prompts --------------------------------------------------------------------------------------------
    def prompt(self, prompt: str | list[int], echo: bool = False) -> Prompt:
        """A completion prompt as token ids, with its text when the response echoes it."""
        if isinstance(prompt, str):
            return Prompt(self.tokenizer.encode(prompt), prompt)
        ids = list(prompt)
        # Ids no tokenizer knows get no text: the engine refuses the request, naming them.
        return Prompt(ids, self.decode(ids) if echo and self.known_ids(ids) else None)

    def known_ids(self, ids: list[int]) -> bool:
        size = len(self.tokenizer)
        return all(0 <= t < size for t in ids)

    def decode(self, ids: list[int]) -> str:
        """The text of prompt token ids (echo, /detokenize); what the model writes, the engine decodes."""
        return self.tokenizer.decode(ids)

    @property
    def tool_call_parser(self) -> ToolCallParserName | None:
        return self.config.tool_call_parser or default_parser(getattr(self.tokenizer, "chat_template", None))

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool, chat_template: str | None,
                    template_kwargs: dict | None = None) -> list[int]:
        try:
            return apply_chat_template(self.tokenizer, messages, add_generation_prompt=add_generation_prompt,
                                       chat_template=chat_template, **(template_kwargs or {}))
        except ValueError as e:
            raise APIError(400, str(e), param="messages") from e
        except Exception as e:  # noqa: BLE001 - a template error (jinja) is the request's fault
            raise APIError(400, f"cannot apply the chat template: {e}", param="messages") from e

    # -- requests -------------------------------------------------------------------------------------------
    async def submit(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                     deadline: float) -> ReplicaStream:
        """Send a request to a replica and wait (until `deadline`, time.monotonic()) for one to accept it.
        Raises ReplicaFailure when the replica failed, InvalidRequestError when the engine refused the input,
        and APIError for the rest (queue full, no replica in time)."""
        start = time.monotonic()
        request = GenerateRequest(request_id, prompt_token_ids, params)
        generator: DeploymentResponseGenerator | None = None
        try:
            # Serve raises BackPressureError from .remote() itself or from the first item, depending on its loop.
            generator = self._call(request)
            first = await asyncio.wait_for(generator.__anext__(), timeout=max(0.0, deadline - time.monotonic()))
        except BaseException as e:  # includes cancellation: the client went away while we waited
            if generator is not None:
                cancel_quietly(generator)
            error = self._submit_error(e) if isinstance(e, Exception) else e
            if error is e:
                raise
            raise error from None
        if isinstance(first, Rejected):
            cancel_quietly(generator)
            if first.retryable:
                raise ReplicaFailure(f"a replica of model {self.name!r} is down: {first.message}")
            if first.status == 400:
                raise InvalidRequestError(first.message, first.param, first.code)
            headers = self._retry_after() if first.status in (429, 503) else None
            raise APIError(first.status, first.message, first.type, param=first.param, code=first.code,
                           headers=headers)
        assert isinstance(first, Accepted), f"unexpected first item from a replica: {first!r}"
        # The replica may have held Accepted back for the first delta: that time is the engine's, not queue time.
        return ReplicaStream(generator, first.replica_id, max(0.0, time.monotonic() - start - first.held_s),
                             first.first_delta)

    def _call(self, request: GenerateRequest) -> DeploymentResponseGenerator | AsyncGenerator:
        return self.stream_handle.remote(request)

    def check_health(self) -> None:
        """The ingress's health check: replicas in other processes have their own."""

    async def engine_stats(self, timeout_s: float = 5.0) -> list[dict] | None:
        """Every replica's `engine_stats`, or None when the model has no replica right now."""
        try:
            results = await self.handle.broadcast("engine_stats").results_async(
                timeout_s=timeout_s, return_exceptions=True)
        except (DeploymentUnavailableError, TimeoutError):
            return None
        return [r for r in results if isinstance(r, dict)]

    async def max_model_len(self) -> int | None:
        """The context length the model's engines serve (they may cap the configured one to their KV cache);
        the configured one while no replica has said."""
        if self._max_model_len is None:
            stats = await self.engine_stats(timeout_s=2.0)
            self._max_model_len = next((s["max_model_len"] for s in stats or [] if s.get("max_model_len")), None)
        return self._max_model_len or self.config.max_model_len

    async def health(self) -> dict:
        stats = await self.engine_stats()
        healthy = sum(1 for s in stats or [] if s["healthy"])
        # A model allowed to scale to zero is healthy with no replica: its first request starts one.
        ok = healthy > 0 or (not stats and self.config.min_replicas == 0)
        return {"healthy": ok, "replicas": len(stats or []), "healthy_replicas": healthy}

    def _submit_error(self, e: Exception) -> Exception:
        if isinstance(e, asyncio.TimeoutError):
            return self.unavailable(f"no replica of model {self.name!r} could take the request within "
                                    f"{self.config.queue_timeout_s:g} s (replicas busy or starting)")
        if isinstance(e, BackPressureError):
            return APIError(429, f"model {self.name!r} has {self.config.max_queue_size} requests queued; retry "
                            "later", "rate_limit_error", code="queue_full", headers=self._retry_after())
        if isinstance(e, DeploymentUnavailableError):
            return self.unavailable(f"model {self.name!r} is unavailable (its deployment failed)")
        if isinstance(e, (StopAsyncIteration, *REPLICA_GONE)):
            return ReplicaFailure(f"the replica of model {self.name!r} failed: {type(e).__name__}")
        if isinstance(e, RayError):
            logger.warning("submitting to %s failed: %s", self.name, e)
            return self.unavailable(f"the replica of model {self.name!r} failed: {type(e).__name__}")
        return e

    def _retry_after(self) -> dict[str, str]:
        return {"Retry-After": str(self.limits.retry_after_s)}

    def unavailable(self, message: str) -> APIError:
        return APIError(503, message, "service_unavailable", code="model_unavailable", headers=self._retry_after())


class LocalModelEndpoint(ModelEndpoint):
    """A model whose one engine replica lives in this process (`engine_in_ingress`). It holds what the model's
    replicas and queue would hold together; beyond that the API answers 429."""

    def __init__(self, config: ModelConfig, limits: LimitsConfig):
        from cluster.replica import EngineReplica

        super().__init__(config, None, limits)
        self.replica = EngineReplica(config.model_dump())
        self.replica.max_ongoing_requests += config.max_queue_size

    def _call(self, request: GenerateRequest) -> AsyncGenerator:
        return self.replica.generate(request)

    def check_health(self) -> None:
        self.replica.check_health()

    async def engine_stats(self, timeout_s: float = 5.0) -> list[dict] | None:
        return [self.replica.engine_stats()]


async def stream_deltas(stream: ReplicaStream) -> AsyncIterator[StreamDelta]:
    """The replica's deltas. Raises ReplicaFailure when the replica dies or its engine goes down mid-stream."""
    first, stream.first_delta = stream.first_delta, None
    if first is not None:
        yield first
    try:
        async for item in stream.generator:
            if isinstance(item, ReplicaFailed):
                raise ReplicaFailure(f"the model replica failed: {item.message}")
            yield item
    except REPLICA_GONE as e:
        raise ReplicaFailure(f"the model replica failed: {type(e).__name__}") from None
    except RayError as e:  # the replica's own code failed on this request
        logger.warning("replica %s failed a request: %s", stream.replica_id, e)
        yield StreamDelta("", 0, [], "", error=f"the model replica failed: {type(e).__name__}")


async def merge_streams(streams: list[ReplicaStream]) -> AsyncIterator[tuple[int, StreamDelta]]:
    """Deltas of several requests (one per prompt) as they come, tagged with the prompt's position.
    A ReplicaFailure of any of them is raised here."""
    if len(streams) == 1:
        async for delta in stream_deltas(streams[0]):
            yield 0, delta
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, stream: ReplicaStream) -> None:
        end = None
        try:
            async for delta in stream_deltas(stream):
                queue.put_nowait((i, delta))
        except Exception as e:  # noqa: BLE001 - handed to the consumer
            end = e
        finally:
            queue.put_nowait((i, end))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(streams)
        while remaining:
            i, item = await queue.get()
            if isinstance(item, Exception):
                raise item
            if item is None:
                remaining -= 1
            else:
                yield i, item
    finally:
        for task in tasks:
            task.cancel()
