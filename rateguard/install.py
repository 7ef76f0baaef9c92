"""install(app): rateguard's own answers for `limit()` in a FastAPI app, through public hooks.

    app = FastAPI()
    rateguard.install(app)

adds exception handlers (``app.add_exception_handler``) that give `limit()`'s 429 and 503
rateguard's JSON body (the same as `RateGuard`'s) and answer a refused websocket with 429, and
declares the 429 (with ``Retry-After``) in the OpenAPI schema of each route whose
``dependencies=`` (route, router or app) hold a `limit()`. An app's own handler always wins:
none is added for an exception the app already handles (or, for the 429, when the app has its
own handler for ``HTTPException`` or for status 429). Call it before the app starts serving.
"""

from __future__ import annotations

from typing import Any

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.websockets import WebSocket

from rateguard._compat import served_routes
from rateguard.dependencies import (
    LimiterUnavailable,
    RateLimitExceeded,
    WebSocketRateLimited,
    route_has_limit,
)
from rateguard.headers import UNAVAILABLE_MESSAGE, error_body

RESPONSE_429: dict[str, Any] = {
    "description": "Too many requests: a rate limit refused this one.",
    "headers": {
        "Retry-After": {
            "description": "Seconds until the request would pass.",
            "schema": {"type": "integer"},
        },
        "RateLimit": {
            "description": "Each limit's remaining quota (IETF RateLimit fields).",
            "schema": {"type": "string"},
        },
        "RateLimit-Policy": {"description": "Each limit's quota and window.", "schema": {"type": "string"}},
    },
    "content": {
        "application/json": {
            "schema": {
                "type": "object",
                "properties": {
                    "error": {"type": "string"},
                    "message": {"type": "string"},
                    "retry_after": {"type": "integer"},
                },
            }
        }
    },
}


async def rate_limit_exceeded_handler(request: Request, exc: Exception) -> Response:
    """`RateLimitExceeded` as ``{"error", "message", "retry_after"}``, like `RateGuard`'s 429."""
    assert isinstance(exc, RateLimitExceeded)
    return Response(
        error_body(exc.message, exc.retry_after),
        status_code=429,
        headers=exc.headers,
        media_type="application/json",
    )


async def unavailable_handler(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, LimiterUnavailable)
    body = error_body(UNAVAILABLE_MESSAGE, exc.retry_after, "Service Unavailable")
    return Response(body, status_code=503, headers=exc.headers, media_type="application/json")


async def websocket_rate_limited_handler(websocket: WebSocket, exc: Exception) -> None:
    """Answer a refused handshake with 429 where the server can, else accept and close with 1008."""
    assert isinstance(exc, WebSocketRateLimited)
    if "websocket.http.response" in websocket.scope.get("extensions", {}):
        response = Response(
            error_body(exc.message, exc.retry_after),
            status_code=429,
            headers=exc.headers,
            media_type="application/json",
        )
        await websocket.send_denial_response(response)
        return
    await websocket.accept()
    await websocket.close(code=exc.code, reason=exc.reason)


def _has_own_http_handler(app: Any) -> bool:
    handlers = app.exception_handlers
    if 429 in handlers:
        return True
    handler = handlers.get(HTTPException)
    if handler is None:
        return False
    try:
        from fastapi.exception_handlers import http_exception_handler
    except ImportError:  # a Starlette app: its default is not in the table
        return True
    return handler is not http_exception_handler


def install(app: Any) -> None:
    """Give ``app`` rateguard's answers for `limit()` (see the module docstring)."""
    if getattr(app, "middleware_stack", None) is not None:
        raise RuntimeError(
            "rateguard.install(app) must run before the app serves its first request (or starts): "
            "Starlette copies the exception handlers then; call it where the app is built"
        )
    handlers = app.exception_handlers
    if RateLimitExceeded not in handlers and not _has_own_http_handler(app):
        app.add_exception_handler(RateLimitExceeded, rate_limit_exceeded_handler)
    if LimiterUnavailable not in handlers and not _has_own_http_handler(app):
        app.add_exception_handler(LimiterUnavailable, unavailable_handler)
    if WebSocketRateLimited not in handlers:
        app.add_exception_handler(WebSocketRateLimited, websocket_rate_limited_handler)
    if hasattr(app, "openapi"):
        _declare_429(app)


def _declare_429(app: Any) -> None:
    original = app.openapi

    def openapi() -> dict[str, Any]:
        cached = getattr(app, "openapi_schema", None)
        schema: dict[str, Any] = cached if cached else original()
        paths = schema.get("paths", {})
        for route in served_routes(app):
            if not route_has_limit(route):
                continue
            operations = paths.get(getattr(route, "path_format", None) or getattr(route, "path", ""), {})
            for method in getattr(route, "methods", None) or ():
                operation = operations.get(method.lower())
                if operation is not None:
                    operation.setdefault("responses", {}).setdefault("429", RESPONSE_429)
        return schema

    app.openapi = openapi


__all__ = ["RESPONSE_429", "install", "rate_limit_exceeded_handler", "websocket_rate_limited_handler"]
