"""OpenAIIngress: the HTTP front of the cluster, a FastAPI app inside a Serve deployment.

POST /v1/completions, POST /v1/chat/completions (whole or SSE, ending with `data: [DONE]`), GET /v1/models,
POST /tokenize and /detokenize (vLLM's shapes),
GET /health (200 only when every model can serve), GET /metrics (Prometheus), GET /playground (a chat page in the
browser: cluster/static/playground.html; GET / redirects to it). Errors are OpenAI-shaped:
`{"error": {"message", "type", "param", "code"}}` with 400 (bad request), 401 (API key), 404 (model or route),
413 (body too large), 429 (queue full, Retry-After), 503 (no replica in time, Retry-After), 500.
/health, /metrics, /openapi.json and the playground need no API key, so load balancers, Prometheus, API tools and
browsers can reach them (the playground sends the key the user types with each API request).

The ingress reads, authorizes and validates a request (cluster/protocol.py), tokenizes its prompt
(cluster/model_endpoint.py) and hands it to a RequestSession (cluster/session.py), which sends it to the model's
replicas, retries it on another replica when one fails, and answers whole or as SSE; errors are answered in
cluster/errors.py. Request bodies are parsed as JSON only (never unpickled) and logged only with
`log_requests: true`.
"""
import asyncio
import hashlib
import hmac
import json
import logging
import os
from contextlib import contextmanager
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from pydantic import BaseModel, ValidationError
from ray import serve

from cluster.config import ClusterConfig
from cluster.errors import APIError, install_error_handlers, pydantic_error
from cluster.metrics import ServingMetrics
from cluster.model_endpoint import LocalModelEndpoint, ModelEndpoint
from cluster.protocol import (ChatCompletionRequest, CompletionRequest, DetokenizeRequest, DetokenizeResponse,
                              ModelCard, ModelList, SamplingRequest, TokenizeChatRequest, TokenizeCompletionRequest,
                              TokenizeResponse, invalid_text_field, new_id, request_body_schemas)
from cluster.responses import Prompt, ResponseBuilder
from cluster.serve_env import rebind_over_time_wait
from cluster.session import RequestSession
from cluster.tool_calls import KEEPS_SPECIAL_TOKENS

logger = logging.getLogger("strata")

app = FastAPI(title="Strata", docs_url=None, redoc_url=None)
PLAYGROUND_HTML = resources.files("cluster").joinpath("static/playground.html").read_text(encoding="utf-8")
ROUTE_BODIES = {"/v1/completions": CompletionRequest, "/v1/chat/completions": ChatCompletionRequest,
                "/tokenize": TokenizeCompletionRequest, "/detokenize": DetokenizeRequest}


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


install_error_handlers(app)


@serve.ingress(app)
class OpenAIIngress:
    def __init__(self, config: dict, engines: dict):
        """`engines`: each model's engine deployment handle; a model without one runs its engine in this process
        (engine_in_ingress)."""
        self.config = ClusterConfig.model_validate(config)
        rebind_over_time_wait()
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
            params = body.to_sampling_params(self.config.limits)
            prompts = [endpoint.prompt(p, echo=body.echo) for p in body.prompts(self.config.limits)]
            builder = ResponseBuilder("completion", new_id("cmpl"), body.model, prompts, params.n, body.logprobs,
                                      body.echo)
            return await RequestSession(endpoint, body, builder, params, self.metrics).respond(body.stream)

    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        body = await self._read(request, ChatCompletionRequest)
        endpoint = self._endpoint(body.model)
        with self._counted(body.model):
            params = body.to_sampling_params(self.config.limits)
            tools = body.template_tools
            if tools and endpoint.tool_call_parser is None and body.forced_tool_calls is None:
                raise APIError(400, f"model {body.model!r} has no tool-call parser: set its tool_call_parser",
                               param="tools")
            messages = [m.template_dict() for m in body.messages]
            ids = endpoint.encode_chat(messages, body.add_generation_prompt, body.chat_template,
                                       {**(body.chat_template_kwargs or {}), **({"tools": tools} if tools else {})})
            tool_call_parser = body.forced_tool_calls or (endpoint.tool_call_parser if tools else None)
            if isinstance(tool_call_parser, str) and tool_call_parser in KEEPS_SPECIAL_TOKENS:  # calls open with one
                params.skip_special_tokens = False
            builder = ResponseBuilder("chat", new_id("chatcmpl"), body.model, [Prompt(ids)], params.n,
                                      params.logprobs, reasoning_parser=endpoint.config.reasoning_parser,
                                      tool_call_parser=tool_call_parser)
            return await RequestSession(endpoint, body, builder, params, self.metrics).respond(body.stream)

    @app.post("/tokenize")
    async def tokenize(self, request: Request):
        """vLLM's /tokenize: a prompt, or chat messages through the model's template, as token ids."""
        data = await self._read_json(request)
        body = self._validate(TokenizeChatRequest if "messages" in data else TokenizeCompletionRequest, data)
        endpoint = self._endpoint(body.model)
        if isinstance(body, TokenizeChatRequest):
            tokens = endpoint.encode_chat([m.template_dict() for m in body.messages], body.add_generation_prompt,
                                          body.chat_template, body.chat_template_kwargs)
        else:
            tokens = endpoint.tokenizer.encode(body.prompt, add_special_tokens=body.add_special_tokens)
        return TokenizeResponse(count=len(tokens), max_model_len=await endpoint.max_model_len(),
                                tokens=tokens).model_dump()

    @app.post("/detokenize")
    async def detokenize(self, request: Request):
        body = self._validate(DetokenizeRequest, await self._read_json(request))
        endpoint = self._endpoint(body.model)
        if not endpoint.known_ids(body.tokens):
            raise APIError(400, f"tokens must be in [0, {len(endpoint.tokenizer)})", param="tokens")
        return DetokenizeResponse(prompt=endpoint.decode(body.tokens)).model_dump()

    @app.get("/v1/models")
    async def list_models(self, request: Request):
        self._authorize(request)
        lengths = await asyncio.gather(*(e.max_model_len() for e in self.models.values()))
        return ModelList(data=[ModelCard(id=name, root=e.config.model, max_model_len=length)
                               for (name, e), length in zip(self.models.items(), lengths)]).model_dump()

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

    @app.get("/playground", response_class=HTMLResponse, include_in_schema=False)
    async def playground(self):
        return HTMLResponse(PLAYGROUND_HTML)

    @app.get("/", include_in_schema=False)
    async def root(self):
        return RedirectResponse("playground")  # relative, so it holds under a route prefix too

    # -- request plumbing -----------------------------------------------------------------------------------
    async def _read(self, request: Request, model: type[SamplingRequest]):
        return self._validate(model, await self._read_json(request))

    async def _read_json(self, request: Request) -> dict:
        """The authorized request's body as a JSON object, within the size limit and valid Unicode."""
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
        return data

    @staticmethod
    def _validate(model: type[BaseModel], data: dict):
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
