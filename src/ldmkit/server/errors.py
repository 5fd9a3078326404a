"""Errors in each API's own shape. A route says which API it belongs to by its route
class (`route_class` of its router); the app's exception handlers ask the route that
matched how to answer:

- ldmkit's own routes and the A1111 shim: FastAPI's `{"detail": ...}` (422 with a list
  naming the field for a bad value, 503 + Retry-After for a full queue);
- the OpenAI routes: `{"error": {"message", "type", "param", "code"}}`, 400 for any bad
  field (never 422), 429 + Retry-After for a full queue, as the openai SDK expects.
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exception_handlers import (
    http_exception_handler,
    request_validation_exception_handler,
)
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException

from ldmkit.server.service import Refusal

# Starlette's own answer to a body it cannot even decode (bytes that are not UTF-8)
BODY_UNREADABLE = {"description": "the body cannot be read (not UTF-8 text)"}
STATUS = {"invalid": 422, "busy": 503, "stopping": 503, "non_finite": 500, "failed": 500,
          "unauthorized": 401, "not_found": 404}


def refusal_headers(refusal: Refusal) -> dict[str, str]:
    headers = {}
    if refusal.retry_after is not None:
        headers["Retry-After"] = str(refusal.retry_after)
    if refusal.kind == "unauthorized":
        headers["WWW-Authenticate"] = "Bearer"
    return headers


class NativeRoute(APIRoute):
    """ldmkit's own error shape: FastAPI's `detail`."""

    @staticmethod
    async def refused(request: Request, refusal: Refusal) -> Response:
        if refusal.kind == "invalid":  # the shape FastAPI gives its own validation errors
            reason = refusal.message.removeprefix(f"{refusal.field}: ")
            detail: object = [{"type": "value_error", "loc": ["body", refusal.field],
                               "msg": reason}]
        else:
            detail = str(refusal)
        return JSONResponse({"detail": detail}, STATUS[refusal.kind],
                            headers=refusal_headers(refusal))

    @staticmethod
    async def invalid_request(request: Request, exc: RequestValidationError) -> Response:
        return await request_validation_exception_handler(request, exc)

    @staticmethod
    async def http_error(request: Request, exc: HTTPException) -> Response:
        return await http_exception_handler(request, exc)


def _route(request: Request) -> type[NativeRoute]:
    route = request.scope.get("route")
    return type(route) if isinstance(route, NativeRoute) else NativeRoute


def install(app: FastAPI) -> None:
    """Send every error through the matched route's own shape."""

    @app.exception_handler(Refusal)
    async def on_refusal(request: Request, exc: Refusal) -> Response:
        return await _route(request).refused(request, exc)

    @app.exception_handler(RequestValidationError)
    async def on_invalid(request: Request, exc: RequestValidationError) -> Response:
        return await _route(request).invalid_request(request, exc)

    @app.exception_handler(HTTPException)
    async def on_http(request: Request, exc: HTTPException) -> Response:
        return await _route(request).http_error(request, exc)
