"""Exceptions → HTTP status + the one error shape {"error": {"code", "message"}}.

Codes are stable (clients and metrics key on them). Adapter validation keeps the validator's own codes
(truncated, non_finite, fingerprint_mismatch, …); the rest:

    400 invalid_request, invalid_adapter_id, not_servable      404 adapter_not_found, not_found
    405 method_not_allowed   409 adapter_exists   413 too_large   422 validation_error
    429 queue_full (Retry-After)   500 internal_error, store_error, engine_error
    503 store_unavailable, adapter_unavailable, shutting_down, not_ready (Retry-After)
    504 request_timeout (the request ran past --request-timeout; its batch row is freed)

On the OpenAI-compatible routes (/v1/...) the same errors answer in OpenAI's shape instead,
{"error": {"message", "type", "code", "param"}}, and request validation errors are 400 (as OpenAI's are),
so OpenAI clients raise their matching exception classes. Auth errors (service/auth.py): 401 missing_api_key,
invalid_api_key (WWW-Authenticate: Bearer), 403 forbidden, admin_disabled, 429 rate_limited (Retry-After).
"""
from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from adapters_store.base import AdapterExists, StoreError, StoreUnavailable
from adapters_store.validate import AdapterValidationError
from service import engine as eng
from svd_adapters.log import get_logger

log = get_logger(__name__)

STORE_RETRY_AFTER_S = 5
DEFAULT_QUEUE_RETRY_AFTER_S = 1

# Engine exception → (status, code); looked up along the exception's MRO, most specific first.
ENGINE_ERRORS: dict[type[Exception], tuple[int, str]] = {
    eng.AdapterNotFound: (404, "adapter_not_found"),
    eng.AdapterUnavailable: (503, "adapter_unavailable"),
    eng.QueueFull: (429, "queue_full"),
    eng.EngineShuttingDown: (503, "shutting_down"),
    eng.InvalidRequest: (400, "invalid_request"),
    eng.RequestTimeout: (504, "request_timeout"),
    eng.PinLimit: (409, "pin_limit"),
    eng.EngineError: (500, "engine_error"),
}

_HTTP_CODES = {400: "bad_request", 404: "not_found", 405: "method_not_allowed", 413: "too_large", 415: "unsupported_media_type"}


class ApiError(StarletteHTTPException):
    """An error this API raises itself. An HTTPException so that FastAPI passes it through body parsing."""

    def __init__(
        self, status: int, code: str, message: str, headers: dict[str, str] | None = None, param: str | None = None
    ) -> None:
        super().__init__(status_code=status, detail=message, headers=headers)
        self.code = code
        self.message = message
        self.param = param  # the offending request field, reported on /v1 routes


def not_ready() -> ApiError:
    """503 while what a route needs (engine, store, auth) is not set up: the server is starting or has stopped."""
    return ApiError(503, "not_ready", "the server is starting up or shutting down; retry shortly", {"Retry-After": "1"})


def shutting_down() -> ApiError:
    """503 while draining after SIGTERM: in-flight requests finish, new ones go to another replica."""
    return ApiError(503, "shutting_down", "the server is shutting down and takes no new requests; retry on another replica",
                    {"Retry-After": "1"})


def error_body(code: str, message: str) -> dict[str, Any]:
    return {"error": {"code": code, "message": message}}


def error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(code, message), status_code=status, headers=headers)


OPENAI_PREFIX = "/v1"
_OPENAI_TYPES = {401: "authentication_error", 403: "permission_error", 429: "rate_limit_error"}
_OPENAI_CODES = {"adapter_not_found": "model_not_found"}  # on /v1 an adapter is a model


def is_openai_path(path: str) -> bool:
    return path == OPENAI_PREFIX or path.startswith(OPENAI_PREFIX + "/")


def openai_error_body(status: int, code: str, message: str, param: str | None = None) -> dict[str, Any]:
    kind = "server_error" if status >= 500 else _OPENAI_TYPES.get(status, "invalid_request_error")
    return {"error": {"message": message, "type": kind, "code": _OPENAI_CODES.get(code, code), "param": param}}


def error_response_for(
    path: str, status: int, code: str, message: str, headers: dict[str, str] | None = None, param: str | None = None
) -> JSONResponse:
    """The project's error shape, or OpenAI's on /v1 routes."""
    if is_openai_path(path):
        return JSONResponse(openai_error_body(status, code, message, param), status_code=status, headers=headers)
    return error_response(status, code, message, headers)


def _retry_after(exc: Exception, default: int) -> dict[str, str]:
    value = getattr(exc, "retry_after", None)
    try:
        seconds = max(1, round(float(value))) if value is not None else default
    except (TypeError, ValueError):
        seconds = default
    return {"Retry-After": str(seconds)}


def _message(exc: Exception) -> str:
    return getattr(exc, "message", None) or str(exc) or type(exc).__name__


def _format_loc(loc: tuple[Any, ...]) -> str:
    """("body", "messages", 0, "role") → "messages[0].role"; query/path/header params keep their source."""
    parts = list(loc)
    where = parts.pop(0) if parts and parts[0] in ("body", "query", "path", "header", "cookie") else None
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    if where in (None, "body"):
        return out or "request body"
    return f"{where} parameter {out}" if out else where


def validation_message(exc: RequestValidationError) -> str:
    msgs = []
    for err in exc.errors():
        msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
        if err.get("type") == "json_invalid":
            detail = (err.get("ctx") or {}).get("error", "")
            msgs.append(f"request body is not valid JSON ({detail})" if detail else "request body is not valid JSON")
            continue
        msgs.append(f"{_format_loc(tuple(err.get('loc', ())))}: {msg}")
    return "; ".join(msgs) or "the request is invalid"


def openai_validation_error(exc: RequestValidationError) -> tuple[str, str | None]:
    """(message, param) of the first validation error, worded as OpenAI words them."""
    errors = exc.errors()
    if not errors:
        return "the request is invalid", None
    err = errors[0]
    loc = tuple(err.get("loc", ()))
    param = _format_loc(loc) if len(loc) > 1 else None
    if err.get("type") == "extra_forbidden":
        return f"Unrecognized request argument supplied: {param}", param
    return validation_message(exc), param


async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
    return error_response_for(request.url.path, exc.status_code, exc.code, exc.message, exc.headers, exc.param)


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    if isinstance(exc, ApiError):
        return await _api_error(request, exc)
    code = _HTTP_CODES.get(exc.status_code, f"http_{exc.status_code}")
    message = str(exc.detail)
    if exc.status_code == 404 and message == "Not Found":
        message = f"no such endpoint: {request.method} {request.url.path} (see /docs)"
    elif exc.status_code == 405:
        message = f"{request.method} is not allowed on {request.url.path} (see /docs)"
    return error_response_for(request.url.path, exc.status_code, code, message, getattr(exc, "headers", None))


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    if is_openai_path(request.url.path):
        message, param = openai_validation_error(exc)
        return error_response_for(request.url.path, 400, "validation_error", message, param=param)
    return error_response_for(request.url.path, 422, "validation_error", validation_message(exc))


async def _adapter_invalid(request: Request, exc: AdapterValidationError) -> JSONResponse:
    return error_response_for(request.url.path, 413 if exc.code == "too_large" else 400, exc.code, exc.message)


async def _adapter_exists(request: Request, exc: AdapterExists) -> JSONResponse:
    # Ids are global across tenants: the same answer whoever holds the id, so it reveals no other tenant's adapter.
    return error_response_for(
        request.url.path, 409, "adapter_exists",
        f"adapter id {exc.adapter_id!r} is already taken; choose another adapter_id "
        f"(or DELETE /adapters/{exc.adapter_id} first to replace your own adapter)",
    )


async def _store_error(request: Request, exc: StoreError) -> JSONResponse:
    if isinstance(exc, StoreUnavailable):
        log.warning("store unavailable: %s", exc)
        code = getattr(exc, "code", None) or "store_unavailable"  # e.g. adapter_unavailable (service/auth.py)
        return error_response_for(request.url.path, 503, code, str(exc), _retry_after(exc, STORE_RETRY_AFTER_S))
    log.error("store error: %s", exc)
    return error_response_for(request.url.path, 500, "store_error", str(exc))


def engine_error_status(exc: Exception) -> tuple[int, str]:
    """(HTTP status, code) of an engine exception."""
    return next((ENGINE_ERRORS[c] for c in type(exc).__mro__ if c in ENGINE_ERRORS), (500, "engine_error"))


def engine_error_body(exc: Exception) -> dict[str, Any]:
    return error_body(engine_error_status(exc)[1], _message(exc))


async def _engine_error(request: Request, exc: Exception) -> JSONResponse:
    status, code = engine_error_status(exc)
    headers = None
    if status == 429:
        headers = _retry_after(exc, DEFAULT_QUEUE_RETRY_AFTER_S)
    elif status == 503:
        headers = _retry_after(exc, STORE_RETRY_AFTER_S)
    if status >= 500:
        log.warning("engine: %s: %s", type(exc).__name__, exc)
    return error_response_for(request.url.path, status, code, _message(exc), headers)


async def _unhandled(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return error_response_for(request.url.path, 500, "internal_error", f"internal server error ({type(exc).__name__}); see the server log")


def register_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(AdapterValidationError, _adapter_invalid)
    app.add_exception_handler(AdapterExists, _adapter_exists)
    app.add_exception_handler(StoreError, _store_error)
    app.add_exception_handler(eng.EngineError, _engine_error)
    app.add_exception_handler(Exception, _unhandled)
