"""Errors as the OpenAI API answers them: `{"error": {"message", "type", "param", "code"}}` with an HTTP status.

Every error the ingress answers goes through here: APIError raised by the request path, the engine's
InvalidRequestError (mapped to the API's field names by the request model, `SamplingRequest.api_error`),
pydantic's validation errors, unknown routes, and anything unexpected (500, logged)."""
from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ValidationError
from ray.exceptions import TaskCancelledError
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger("strata")


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


class APIError(Exception):
    """An error the API answers with `{"error": {...}}` and an HTTP status."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return ErrorResponse(error=ErrorInfo(message=self.message, type=self.type, param=self.param,
                                             code=self.code)).model_dump()

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


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


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, error: APIError):
        return error.response()

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, error: RequestValidationError):
        first = (error.errors() or [{}])[0]
        param = ".".join(str(p) for p in first.get("loc", ())) or None
        return APIError(400, f"{param}: {first.get('msg', 'invalid request')}", param=param).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, error: StarletteHTTPException):
        code = "not_found" if error.status_code == 404 else None
        return APIError(error.status_code, str(error.detail), code=code).response()

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, error: Exception):
        if isinstance(error, TaskCancelledError):  # the client went away mid-stream: nobody to answer
            return Response(status_code=499)
        logger.exception("unhandled error in %s %s", request.method, request.url.path)
        return APIError(500, f"internal error: {type(error).__name__}", "internal_error").response()
