"""EngineReplica: the Serve deployment that owns one AsyncEngine and streams its outputs to the ingress.

Wire protocol of `generate` (a streaming method, called through `handle.options(stream=True)`):
the first item is `Accepted` (the replica took the request) or `Rejected` (bad input, queue full, engine
down); after `Accepted` come the engine's `StreamDelta`s until every completion has finished, or, when the
engine itself went down meanwhile, one `ReplicaFailed` (the request was not at fault: the ingress may send it
to another replica). A delta with `error` set is the engine failing on this request alone. Cancelling the call
(the client went away) aborts the engine request, which frees its KV blocks.

`Accepted` carries the first delta when the engine makes it within `ACCEPT_WAIT_S` (a short prompt on an idle
engine): every streamed item costs a message through Serve, and this one then no longer comes before the first
token. A request that waits longer is accepted alone, its deltas following, so the ingress still learns soon
that a replica took it (the ingress bounds queue time by it, and retries on another replica only before it).

The engine checks each request against the model (context length, vocabulary, max_logprobs); its
InvalidRequestError comes back as `Rejected(400)` with the field and code it names, in the engine's field names.

Besides serving, the replica reports:
- `record_routing_stats`: load and recently cached prefix-block hashes, pulled by the Serve controller and
  handed to every router (cluster/routing.py); only where prefix-aware routing has replicas to choose between
  (`UnroutedEngineReplica` otherwise: a report costs CPU in the replica, the controller and every router);
- `record_autoscaling_stats`: queue depth and KV usage, pushed to the controller for QueueDepthPolicy;
- `engine_stats`: everything for /metrics and `strata status`, fetched with `handle.broadcast`;
- `check_health`: Serve restarts the replica when the engine loop died or stalled.
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

import ray
from ray import serve
from ray.serve.exceptions import RayServeException

from cluster.config import ModelConfig
from engine import InvalidRequestError, SamplingParams, StreamDelta

logger = logging.getLogger("strata")

# How long a replica holds `Accepted` back for the request's first delta, to send both as one streamed item.
ACCEPT_WAIT_S = 0.05


@dataclass
class GenerateRequest:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams


@dataclass
class Accepted:
    replica_id: str
    first_delta: StreamDelta | None = None  # the engine's first delta, when it came within ACCEPT_WAIT_S
    held_s: float = 0.0  # how long the replica waited for it (not queue time)


@dataclass
class Rejected:
    status: int  # the HTTP status the ingress answers with
    message: str
    type: str = "invalid_request_error"
    param: str | None = None  # the request field at fault, as the engine names it
    code: str | None = None

    @property
    def retryable(self) -> bool:
        """The replica cannot serve (its engine is down); another replica may."""
        return self.status == 503


@dataclass
class ReplicaFailed:
    """The engine went down while the request ran (it was not the request's fault)."""

    message: str


class EngineReplica:
    def __init__(self, model_config: dict):
        self.config = ModelConfig.model_validate(model_config)
        try:
            self.replica_id = serve.get_replica_context().replica_id.unique_id
        except RayServeException:  # outside a Serve deployment (a test, a script)
            self.replica_id = "local"
        self.node_id = ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
        from engine import AsyncEngine  # torch loads here, in the replica, not in the ingress that imports this module

        self.engine = AsyncEngine(self.config.engine_config())
        self.max_ongoing_requests = self.config.max_ongoing_requests or self.engine.max_num_seqs
        self.num_active = 0
        logger.info("replica %s of %r ready", self.replica_id, self.config.served_name)

    async def generate(self, request: GenerateRequest):
        if self.num_active >= self.max_ongoing_requests:  # Serve's own limit normally stops requests earlier
            yield Rejected(429, f"model {self.config.served_name!r} holds {self.num_active} requests, as many as it "
                                f"can; retry later", "rate_limit_error", code="queue_full")
            return
        try:
            stream = self.engine.add_request(request.request_id, request.prompt_token_ids, request.params,
                                             self._stream_interval if self.config.stream_chunk_rate else None,
                                             max_tokens_must_fit=True)
        except InvalidRequestError as e:
            yield Rejected(400, e.message, param=e.param, code=e.code)
            return
        except Exception as e:  # noqa: BLE001 - the engine is down; Serve's health check will replace us
            logger.warning("replica %s refused request %s: %s", self.replica_id, request.request_id, e)
            yield Rejected(503, "the model replica's engine is down", "service_unavailable")
            return
        self.num_active += 1
        finished = False
        accepted = time.monotonic()
        first = asyncio.ensure_future(anext(stream, None))  # a task: a timed-out wait must not cancel the stream
        try:
            await asyncio.wait((first,), timeout=ACCEPT_WAIT_S)
            delta = first.result() if first.done() else None
            if delta is not None and not self._engine_failed(delta):
                yield Accepted(self.replica_id, delta, time.monotonic() - accepted)
                delta = await anext(stream, None)
            else:
                yield Accepted(self.replica_id)
                delta = await first
            while delta is not None:
                if self._engine_failed(delta):  # the details stay in the replica's log
                    yield ReplicaFailed("its engine went down")
                    break
                yield delta
                delta = await anext(stream, None)
            finished = True
        finally:
            self.num_active -= 1
            if not finished:  # cancelled: the stream may never have started, so abort explicitly too
                self.engine.abort(request.request_id)
                if not first.done():
                    first.cancel()
                    await asyncio.wait((first,))
                await stream.aclose()

    def _engine_failed(self, delta: StreamDelta) -> bool:
        return delta.error is not None and self.engine.errored

    def _stream_interval(self) -> float:
        """Each stream's share of the replica's chunk rate: a message per token is what costs a server most."""
        return self.num_active / self.config.stream_chunk_rate

    # -- reports --------------------------------------------------------------------------------------------
    def record_routing_stats(self) -> dict:
        s = self.engine.stats()
        return {"waiting": s.waiting, "running": s.running, "kv_blocks_free": s.kv_blocks_total - s.kv_blocks_used,
                "cached_block_hashes": s.cached_block_hashes}

    def record_autoscaling_stats(self) -> dict[str, float]:
        s = self.engine.stats()
        return {"queue_depth": float(max(s.waiting + s.running, self.num_active)),
                "kv_cache_usage": float(s.kv_cache_usage)}

    def engine_stats(self) -> dict:
        s = self.engine.stats()
        stats = {k: v for k, v in vars(s).items() if k != "cached_block_hashes"}
        healthy, error = True, None
        try:
            self.engine.check_health()
        except Exception as e:  # noqa: BLE001
            healthy, error = False, str(e)
        return {**stats, "model": self.config.served_name, "replica": self.replica_id, "node_id": self.node_id,
                "healthy": healthy, "error": error, "active_requests": self.num_active,
                "max_model_len": self.engine.max_model_len, "kv_cache_usage": s.kv_cache_usage,
                "prefix_cache_hit_rate": s.prefix_cache_hit_rate}

    def check_health(self) -> None:
        self.engine.check_health()

    def __del__(self):
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()


class UnroutedEngineReplica(EngineReplica):
    """An EngineReplica whose routing stats nobody reads: its model has one replica at most, or Serve's own router.
    Serve asks a replica for routing stats only when its class has `record_routing_stats`."""

    record_routing_stats = None
