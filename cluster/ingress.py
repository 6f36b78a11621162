"""OpenAIIngress: the HTTP front of the cluster, a FastAPI app inside a Serve deployment.

POST /v1/completions, POST /v1/chat/completions (whole or SSE, ending with `data: [DONE]`), GET /v1/models,
GET /health (200 only when every model can serve), GET /metrics (Prometheus). Errors are OpenAI-shaped:
`{"error": {"message", "type", "param", "code"}}` with 400 (bad request), 401 (API key), 404 (model or route),
413 (body too large), 429 (queue full, Retry-After), 503 (no replica in time, Retry-After), 500.
/health, /metrics and /openapi.json need no API key, so load balancers, Prometheus and API tools can reach them.

A request whose replica fails moves to another replica (up to the model's `request_retries`) as long as none of
its output has reached the client: a whole response always can, a stream until its first token. A stream that
already sent tokens ends with an error event and `data: [DONE]`. Request bodies are parsed as JSON only (never
unpickled) and logged only with `log_requests: true`.
"""
import asyncio
import hashlib
import os
import hmac
import json
import logging
import time
from contextlib import contextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from ray import serve
from ray.exceptions import TaskCancelledError
from starlette.exceptions import HTTPException as StarletteHTTPException

from cluster.config import ClusterConfig
from cluster.metrics import ServingMetrics
from cluster.model_endpoint import LocalModelEndpoint, ModelEndpoint, ReplicaFailure, ReplicaStream, merge_streams
from cluster.protocol import (APIError, ChatCompletionRequest, CompletionRequest, ModelCard, ModelList,
                              SamplingRequest, invalid_text_field, new_id, request_body_schemas)
from cluster.responses import Prompt, ResponseBuilder, sse

logger = logging.getLogger("strata")

app = FastAPI(title="Strata", docs_url=None, redoc_url=None)
ROUTE_BODIES = {"/v1/completions": CompletionRequest, "/v1/chat/completions": ChatCompletionRequest}


def openapi_schema(models: list[str] | None = None) -> dict:
    """FastAPI's schema plus the request bodies, which the endpoints parse themselves (size limit first), with
    `model` limited to the served names."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
        components, bodies = request_body_schemas(ROUTE_BODIES, models)
        schema.setdefault("components", {}).setdefault("schemas", {}).update(components)
        for path, body in bodies.items():
            schema["paths"][path]["post"]["requestBody"] = body
        app.openapi_schema = schema
    return app.openapi_schema


app.openapi = openapi_schema


def error_response(error: APIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


@app.exception_handler(APIError)
async def _api_error(request: Request, error: APIError):
    return error_response(error)


@app.exception_handler(RequestValidationError)
async def _validation_error(request: Request, error: RequestValidationError):
    first = (error.errors() or [{}])[0]
    param = ".".join(str(p) for p in first.get("loc", ())) or None
    return error_response(APIError(400, f"{param}: {first.get('msg', 'invalid request')}", param=param))


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, error: StarletteHTTPException):
    code = "not_found" if error.status_code == 404 else None
    return error_response(APIError(error.status_code, str(error.detail), code=code))


@app.exception_handler(Exception)
async def _internal_error(request: Request, error: Exception):
    if isinstance(error, TaskCancelledError):  # the client went away mid-stream: nobody to answer
        return Response(status_code=499)
    logger.exception("unhandled error in %s %s", request.method, request.url.path)
    return error_response(APIError(500, f"internal error: {type(error).__name__}", "internal_error"))


def pydantic_error(error: ValidationError) -> APIError:
    first = error.errors()[0]
    param = error_param(first.get("loc", ()))
    if first.get("type") == "extra_forbidden":
        return APIError(400, f"unrecognized request argument supplied: {param}", param=param)
    return APIError(400, f"{param}: {first['msg']}" if param else first["msg"], param=param)


def error_param(loc: tuple) -> str | None:
    """The request field a pydantic error location names, without its union-member tags ('str', 'list[int]')."""
    parts = []
    for p in loc:
        if isinstance(p, str) and (p in ("str", "int", "float", "bool") or "[" in p or "-" in p or p[:1].isupper()):
            break
        parts.append(str(p))
    return ".".join(parts) or None


def _has_content(chunk) -> bool:
    c = chunk.choices[0]
    text = c.delta.content if hasattr(c, "delta") else c.text
    return bool(text) or c.finish_reason is not None or c.logprobs is not None


def cancel_all(streams: list[ReplicaStream]) -> None:
    for s in streams:
        s.cancel()


def replica_header(streams: list[ReplicaStream]) -> dict[str, str]:
    return {"X-Strata-Replica": ",".join(s.replica_id for s in streams)}


class RequestTiming:
    """Latency metrics of one request: TTFT, inter-token latency per completion, end-to-end."""

    def __init__(self, metrics: ServingMetrics, model: str, arrival: float, num_choices: int):
        self.metrics, self.model, self.arrival = metrics, model, arrival
        self.last_token: list[float | None] = [None] * num_choices
        self.first_token_seen = False

    def on_delta(self, choice: int, delta) -> None:
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


@serve.ingress(app)
class OpenAIIngress:
    def __init__(self, config: dict, engines: dict):
        """`engines`: each model's engine deployment handle; a model without one runs its engine in this process
        (engine_in_ingress)."""
        self.config = ClusterConfig.model_validate(config)
        self.metrics = ServingMetrics()
        limits = self.config.limits
        self.models = {m.served_name: ModelEndpoint(m, engines[m.served_name], limits) if m.served_name in engines
                       else LocalModelEndpoint(m, limits) for m in self.config.models}
        # Keys from a secret (the Helm chart's apiKeySecret) arrive as STRATA_API_KEYS, comma-separated.
        env_keys = [k.strip() for k in os.environ.get("STRATA_API_KEYS", "").split(",") if k.strip()]
        self.api_keys = [hashlib.sha256(k.encode()).digest() for k in [*self.config.api_keys, *env_keys]]
        app.openapi_schema = None  # one ingress per process: its schema names its models
        app.openapi = lambda: openapi_schema(list(self.models))

    def check_health(self) -> None:
        """Serve's health check of this replica: an engine in this process must be running."""
        for endpoint in self.models.values():
            endpoint.check_health()

    async def local_engine_stats(self) -> list[dict]:
        """`engine_stats` of the engines in this process (`strata status`)."""
        return [s for e in self.models.values() if isinstance(e, LocalModelEndpoint) for s in await e.engine_stats()]

    # -- endpoints ------------------------------------------------------------------------------------------
    @app.post("/v1/completions")
    async def completions(self, request: Request):
        body = await self._read(request, CompletionRequest)
        endpoint = self._endpoint(body.model)
        with self._counted(body.model):
            raw_prompts = body.prompts(self.config.limits)
            params = body.to_sampling_params(self.config.limits)
            endpoint.check_limits(params, logprobs_param="logprobs")
            prompts = [Prompt(endpoint.encode(p), p if isinstance(p, str) else None) for p in raw_prompts]
            builder = ResponseBuilder("completion", new_id("cmpl"), body.model, endpoint.tokenizer, prompts,
                                      params.n, body.logprobs, body.echo)
            return await self._generate(endpoint, body, builder, params)

    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        body = await self._read(request, ChatCompletionRequest)
        endpoint = self._endpoint(body.model)
        with self._counted(body.model):
            params = body.to_sampling_params(self.config.limits)
            endpoint.check_limits(params, logprobs_param="top_logprobs")
            messages = [m.template_dict() for m in body.messages]
            ids = endpoint.encode_chat(messages, body.add_generation_prompt, body.chat_template)
            builder = ResponseBuilder("chat", new_id("chatcmpl"), body.model, endpoint.tokenizer, [Prompt(ids)],
                                      params.n, params.logprobs)
            # What the replica names "prompt" and "max_tokens" are these fields of a chat request.
            fields = {"prompt": "messages",
                      "max_tokens": "max_completion_tokens" if body.max_completion_tokens else "max_tokens"}
            return await self._generate(endpoint, body, builder, params, fields)

    @app.get("/v1/models")
    async def list_models(self, request: Request):
        self._authorize(request)
        return ModelList(data=[ModelCard(id=name, root=e.config.model, max_model_len=e.config.max_model_len)
                               for name, e in self.models.items()]).model_dump()

    @app.get("/health")
    async def health(self):
        names = list(self.models)
        reports = await asyncio.gather(*(self.models[n].health() for n in names))
        models = dict(zip(names, reports))
        ok = all(r["healthy"] for r in reports)
        return JSONResponse({"status": "ok" if ok else "unhealthy", "models": models}, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def prometheus_metrics(self):
        names = list(self.models)
        stats = await asyncio.gather(*(self.models[n].engine_stats(timeout_s=2.0) for n in names))
        for name, replica_stats in zip(names, stats):
            self.metrics.engines.update(name, replica_stats or [])
        payload, content_type = self.metrics.render()
        return Response(payload, media_type=content_type)

    # -- request plumbing -----------------------------------------------------------------------------------
    async def _read(self, request: Request, model: type[SamplingRequest]):
        self._authorize(request)
        limit = self.config.limits.max_request_bytes
        too_large = APIError(413, f"request body is larger than {limit} bytes", code="request_too_large")
        if int(request.headers.get("content-length") or 0) > limit:
            raise too_large
        body = bytearray()
        async for part in request.stream():
            body += part
            if len(body) > limit:
                raise too_large
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError as e:
            raise APIError(400, f"the request body is not valid UTF-8: {e}") from None
        try:
            data = json.loads(text)
        except ValueError as e:
            raise APIError(400, f"the request body is not valid JSON: {e}") from None
        if not isinstance(data, dict):
            raise APIError(400, "the request body must be a JSON object")
        if "\\u" in text and (param := invalid_text_field(data)):  # JSON escapes can spell lone surrogates
            raise APIError(400, f"{param}: the text holds a lone UTF-16 surrogate, which is not valid Unicode",
                           param=param)
        if self.config.log_requests:
            logger.info("%s %s: %s", request.method, request.url.path, text)
        try:
            return model.model_validate(data)
        except ValidationError as e:
            raise pydantic_error(e) from None

    def _authorize(self, request: Request) -> None:
        if not self.api_keys:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        # Digests have one length whatever the key's, so the comparison time tells nothing about the keys.
        given = hashlib.sha256(token.strip().encode() if scheme.lower() == "bearer" else b"").digest()
        matched = False
        for key in self.api_keys:  # compare against every key, in constant time each
            matched |= hmac.compare_digest(given, key)
        if not matched:
            raise APIError(401, "missing or invalid API key: send `Authorization: Bearer <key>`",
                           code="invalid_api_key")

    def _endpoint(self, name: str) -> ModelEndpoint:
        endpoint = self.models.get(name)
        if endpoint is None:
            raise APIError(404, f"the model {name!r} does not exist; available: {', '.join(self.models)}",
                           param="model", code="model_not_found")
        return endpoint

    @contextmanager
    def _counted(self, model: str):
        try:
            yield
        except APIError as e:
            self.metrics.requests.labels(model, str(e.status)).inc()
            raise

    async def _generate(self, endpoint: ModelEndpoint, body: SamplingRequest, builder: ResponseBuilder, params,
                        fields: dict[str, str] | None = None):
        arrival = time.monotonic()
        streams = await self._submit_all(endpoint, builder, params, fields)
        timing = RequestTiming(self.metrics, endpoint.name, arrival, len(builder.choices))
        for s in streams:
            self.metrics.queue_time.labels(endpoint.name).observe(s.queue_time)
        if body.stream:
            events = self._events(endpoint, streams, builder, params, timing, body.include_usage_in_stream)
            return StreamingResponse(events, media_type="text/event-stream", headers=replica_header(streams))
        try:
            for attempt in range(endpoint.config.request_retries + 1):
                try:
                    async for prompt_index, delta in merge_streams(streams):
                        if delta.error is not None:
                            raise APIError(500, delta.error, "internal_error")
                        choice = builder.add(prompt_index, delta)
                        timing.on_delta(choice, delta)
                    break
                except ReplicaFailure as e:  # nothing reached the client yet: start over on another replica
                    if attempt == endpoint.config.request_retries:
                        raise endpoint.unavailable(f"{e} (tried {attempt + 1} times)") from None
                    logger.warning("request %s: %s; sending it to another replica", builder.request_id, e)
                    cancel_all(streams)
                    builder.reset()
                    streams = await self._submit_all(endpoint, builder, params, fields)
        finally:
            cancel_all(streams)
        timing.done("200")
        return JSONResponse(builder.response().model_dump(), headers=replica_header(streams))

    async def _submit_all(self, endpoint: ModelEndpoint, builder: ResponseBuilder, params,
                          fields: dict[str, str] | None = None) -> list[ReplicaStream]:
        """One engine request per prompt, submitted one after another: Serve gives all handle calls made within
        one HTTP request the same internal request id, and its router loses track of concurrent ones.
        `fields` renames the request fields a replica's error names (chat: prompt -> messages)."""
        ids = [builder.request_id] if len(builder.prompts) == 1 else [
            f"{builder.request_id}-{i}" for i in range(len(builder.prompts))]
        streams: list[ReplicaStream] = []
        try:
            for rid, prompt in zip(ids, builder.prompts):
                streams.append(await endpoint.submit(rid, prompt.token_ids, params))
        except BaseException as e:
            cancel_all(streams)  # requests accepted before another failed must not keep running
            if isinstance(e, APIError) and fields and e.param in fields:
                e.param = fields[e.param]
            raise
        return streams

    async def _events(self, endpoint: ModelEndpoint, streams: list[ReplicaStream], builder: ResponseBuilder,
                      params, timing: RequestTiming, include_usage: bool):
        status = "200"
        sent = False  # a token reached the client: the request can no longer move to another replica
        try:
            if builder.kind == "chat":
                yield sse(builder.role_chunk())
            for attempt in range(endpoint.config.request_retries + 1):
                try:
                    async for prompt_index, delta in merge_streams(streams):
                        if delta.error is not None:
                            status = "500"
                            yield sse(APIError(500, delta.error, "internal_error").body())
                            break
                        chunk = builder.chunk(prompt_index, delta)
                        timing.on_delta(prompt_index * builder.n + delta.index, delta)
                        if _has_content(chunk):
                            sent = True
                            yield sse(chunk)
                    break
                except ReplicaFailure as e:
                    cancel_all(streams)
                    if sent or attempt == endpoint.config.request_retries:
                        status = "503"
                        yield sse(endpoint.unavailable(str(e)).body())
                        break
                    logger.warning("request %s: %s; sending it to another replica", builder.request_id, e)
                    builder.reset()
                    try:
                        streams = await self._submit_all(endpoint, builder, params)
                    except APIError as error:
                        status = str(error.status)
                        yield sse(error.body())
                        break
            if include_usage and status == "200":
                yield sse(builder.usage_chunk())
            yield "data: [DONE]\n\n"
        except asyncio.CancelledError:
            status = "499"  # the client went away
            raise
        finally:
            cancel_all(streams)  # aborts the engine requests still running, which frees their KV blocks
            timing.done(status)
