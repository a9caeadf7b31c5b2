"""One HTTP error type, and the one place that picks an error's shape for a path.

Every step that refuses a request raises `HTTPError(status, message)`; it never says how the
answer looks. Each router registers its shape for its prefix (captioner's API: FastAPI's
`{"detail": ...}`; the OpenAI routes: `{"error": {...}}`), and the handlers `install` adds
answer every error (ours, routing's 404/405, the guard's 408/413, a bug's 500) in the shape of
the router that owns the path.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger(__name__)

MAX_DETAIL_CHARS = 500


class HTTPError(Exception):
    """A request answered with a JSON error: `status`, `message`, and where they apply the
    seconds to wait (`retry_after`, for 503) and OpenAI's `param`/`code` fields."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        retry_after: int | None = None,
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.retry_after = status, message, retry_after
        self.param, self.code = param, code
        if len(self.message) > MAX_DETAIL_CHARS:  # a 5000-digit number echoed back helps nobody
            self.message = self.message[: MAX_DETAIL_CHARS - 3] + "..."

    def headers(self) -> dict[str, str] | None:
        headers = {}
        if self.status == 401:
            headers["WWW-Authenticate"] = "Bearer"
        if self.retry_after is not None:
            headers["Retry-After"] = str(self.retry_after)
        return headers or None


Shape = Callable[[HTTPError], dict[str, Any]]


def plain_shape(err: HTTPError) -> dict[str, Any]:
    return {"detail": err.message}


def error_response(err: HTTPError, shape: Shape = plain_shape) -> JSONResponse:
    return JSONResponse(shape(err), status_code=err.status, headers=err.headers())


class ErrorShapes:
    """Path prefix -> the shape of its router's errors; anything else is `plain_shape`."""

    def __init__(self) -> None:
        self.prefixes: list[tuple[str, Shape]] = []

    def add(self, prefix: str, shape: Shape) -> None:
        self.prefixes.append((prefix, shape))

    def for_path(self, path: str) -> Shape:
        return next((s for p, s in self.prefixes if path.startswith(p)), plain_shape)

    def body(self, path: str, status: int, message: str) -> dict[str, Any]:
        return self.for_path(path)(HTTPError(status, message))


def install(app: FastAPI, shapes: ErrorShapes) -> None:
    """Answer every error in the shape of the path's router; only a bug answers 500."""

    async def answer(request: Request, err: HTTPError) -> JSONResponse:
        return error_response(err, shapes.for_path(request.url.path))

    async def answer_routing(request: Request, err: StarletteHTTPException) -> JSONResponse:
        as_ours = HTTPError(err.status_code, str(err.detail))
        response = error_response(as_ours, shapes.for_path(request.url.path))
        response.headers.update(err.headers or {})
        return response

    async def answer_bug(request: Request, err: Exception) -> JSONResponse:
        log.error("unhandled error on %s", request.url.path, exc_info=err)
        return error_response(HTTPError(500, "internal error"), shapes.for_path(request.url.path))

    app.state.error_shapes = shapes
    app.add_exception_handler(HTTPError, answer)
    app.add_exception_handler(StarletteHTTPException, answer_routing)
    app.add_exception_handler(Exception, answer_bug)
