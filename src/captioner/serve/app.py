"""The HTTP server: FastAPI routes over `Captioner.caption`, through the dynamic batcher.

    POST /caption   multipart upload (field `file` or `files`, one or several images) or JSON
                    {"url": "data:image/...;base64,..." | "http(s)://..."}; decoding options as
                    form/JSON fields. -> {"caption", "model", "latency_ms"} (several -> "results")
    POST /v1/chat/completions, GET /v1/models
                    the OpenAI-compatible API (serve/openai.py), through the same steps
    GET  /health    {"status", "model", "device", ...}
    GET  /          one static page: choose or drop an image, see it with its caption
    GET  /docs      the API, described from the OpenAPI schema (a plain page: no CDN, works
                    offline); GET /openapi.json is the schema itself

Every request is checked and decoded *before* it joins a batch, so an oversized, non-image or
bomb upload is answered with its own JSON error (413 / 415 / 422) and never touches the
requests batched with it. Errors are `{"detail": "<file>: <what is wrong>"}` (on /v1 paths,
OpenAI's `{"error": {...}}`); every error is JSON, and only a bug answers 500. The steps a
request goes through (key, queue room, memory, reading, downloading, decoding, the batcher) are
one `Pipeline`, which both APIs use.

Memory is bounded by design: JSON bodies are read up to `max_json_bytes` (64 KiB) before they
are parsed; every request reserves, from one server-wide budget (`max_decoded_bytes`), the bytes
of its uploads and what decoding each image will hold (known from the header, before decoding),
and gives them back when it is answered. A full budget or a full queue is a 503 with
Retry-After, before any work is queued. A request whose client hangs up is cancelled, and its
queued images are dropped before `generate`.

The server fetches no URL unless `allow_url_fetch` is set; then `captioner.data.fetch`'s policy
applies (public addresses only, every redirect checked, one deadline, a byte limit) and every
failure gets the same answer, so the server cannot be used to map its own network.
`allowed_hosts` checks the Host header (DNS rebinding reaches even a 127.0.0.1 bind);
`uvicorn_options` are the connection limits and timeouts to run it with.

The owners of the rules this module applies: decoding options and their bounds are
`captioner.decoding.DecodingOptions`, URL downloads and data: URLs are `captioner.data.fetch`, the
pixel limit, the format whitelist and image decoding are `captioner.data.images`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import html
import inspect
import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from importlib import resources
from typing import Any, NamedTuple, Protocol

from fastapi import FastAPI, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.responses import HTMLResponse, JSONResponse
from PIL import Image
from pydantic import TypeAdapter
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from captioner import __version__
from captioner.data import fetch
from captioner.data.images import (
    ALLOWED_FORMATS,
    NotAnImageError,
    decode_rgb,
    decoded_bytes,
    open_checked,
)
from captioner.decoding import (
    BOUNDS,
    MAX_AFFIX_CHARS,
    MAX_PROMPT_CHARS,
    MAX_WORDS,
    DecodingOptions,
    option_help,
)
from captioner.errors import BadImageError, CaptionerError
from captioner.serve import openai
from captioner.serve.batcher import Batcher, Caption, QueueFullError
from captioner.serve.settings import (
    ServerSettings,
)

log = logging.getLogger(__name__)

FILE_FIELDS = ("file", "files")
FORM_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded")
MAX_FORM_FIELDS = 32
MAX_DETAIL_CHARS = 500
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]")


class CaptionsImages(Protocol):
    """What the server needs from a `Captioner` (tests pass a stand-in)."""

    def caption(
        self,
        images: list[Any],
        decoding: DecodingOptions | None = None,
        *,
        batch_size: int | None = None,
    ) -> list[Any]: ...


class Rejected(Exception):
    """A request answered with a JSON error: `{"detail": message}` and `status` (and a
    Retry-After header, in seconds, when the server is busy)."""

    def __init__(self, status: int, message: str, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.retry_after = retry_after


class MemoryBudget:
    """Bytes in flight, shared by every request (thread-safe: images are decoded in threads)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._lock = threading.Lock()

    def take(self, n: int) -> bool:
        with self._lock:
            if self.used + n > self.limit:
                return False
            self.used += n
            return True

    def give(self, n: int) -> None:
        with self._lock:
            self.used -= n

    @contextlib.contextmanager
    def hold(self, retry_after: Callable[[], int]) -> Iterator[Hold]:
        """A request's share: whatever it takes is given back when the request ends."""
        share = Hold(self, retry_after)
        try:
            yield share
        finally:
            self.give(share.held)


class Hold:
    """One request's share of the `MemoryBudget`."""

    def __init__(self, budget: MemoryBudget, retry_after: Callable[[], int]) -> None:
        self.budget = budget
        self.retry_after = retry_after
        self.held = 0
        self._lock = threading.Lock()

    def take(self, n: int, name: str, what: str) -> None:
        """Reserve `n` bytes for `name`, or answer: 422 if it could never fit, 503 if not now."""
        if n > self.budget.limit:
            raise Rejected(
                422,
                f"{name}: {what} needs {n:,} bytes, more than this server ever holds "
                f"({self.budget.limit:,})",
            )
        if not self.budget.take(n):
            raise Rejected(
                503,
                "server busy: its memory for images in flight is in use; retry later",
                retry_after=self.retry_after(),
            )
        with self._lock:
            self.held += n


class Upload(NamedTuple):
    field: str  # "file", "files" or "url"
    name: str  # the file name or the shortened URL, for messages and results
    data: bytes


@dataclass
class CaptionRequest:
    """A POST /caption body, read and checked: the images' bytes and how to decode them."""

    uploads: list[Upload]
    decoding: DecodingOptions
    as_list: bool  # answer {"results": [...]} (several files, or the `files` field)


def create_app(
    captioner: CaptionsImages,
    settings: ServerSettings | None = None,
    **overrides: Any,
) -> FastAPI:
    """Build the app around a loaded `Captioner` (anything with `.caption(images, decoding)`).

    `settings` holds every limit (`ServerSettings`, one default each); any of its fields may
    also be given as a keyword, which overrides it.

    `max_upload_bytes` and `max_pixels` apply per image, `max_files` per request,
    `max_decoded_bytes` to all requests together (uploads plus decoded pixels in flight).
    `api_key` protects POST /caption and the /v1 routes (header `X-API-Key` or `Authorization:
    Bearer`); the page, /health and /docs stay open. `allow_url_fetch` lets JSON
    `{"url": "http(s)://..."}` (and OpenAI image_url parts) make the server download (off:
    only data: URLs). `allowed_hosts` (names, `*` for any) checks
    the Host header of every request (`default_allowed_hosts(bind)` gives the loopback names
    for a loopback bind). `max_batch_size=1` turns dynamic batching off. A bad setting raises
    `CaptionerError` before anything starts.
    """
    settings = (settings or ServerSettings()).replace(**overrides)
    settings = settings.replace(
        model_name=settings.model_name or _model_name(captioner),
        device=str(getattr(captioner, "device", "cpu")),
    )
    batcher = _build_batcher(captioner, settings)
    budget = MemoryBudget(settings.max_decoded_bytes)
    app = FastAPI(
        title="captioner",
        summary="Image captioning with dynamic batching.",
        version=__version__,
        lifespan=_lifespan(batcher),
        docs_url=None,  # FastAPI's Swagger UI and ReDoc load from a CDN: /docs is our own page
        redoc_url=None,
    )
    pipeline = Pipeline(batcher, settings, budget)
    app.state.batcher = batcher
    app.state.settings = settings
    app.state.budget = budget
    app.add_middleware(RequestGuard, settings=settings)
    app.add_exception_handler(Rejected, _answer_rejected)
    app.add_exception_handler(StarletteHTTPException, _answer_http_error)
    app.add_exception_handler(Exception, _answer_bug)
    _add_page_route(app)
    _add_docs_route(app)
    _add_health_route(app, batcher, settings, budget)
    _add_caption_route(app, pipeline)
    openai.add_routes(
        app,
        pipeline,
        tokenizer=getattr(captioner, "tokenizer", None),
        max_new_tokens=_ran_with(captioner),
    )
    return app


def default_allowed_hosts(bind: str) -> list[str] | None:
    """The Host names to accept for a server bound to `bind`: the loopback names for a
    loopback bind (a DNS-rebinding page then cannot talk to it), anything otherwise (None)."""
    if bind in ("127.0.0.1", "localhost", "::1", "[::1]"):
        return list(LOOPBACK_HOSTS)
    return None


def uvicorn_options(
    *,
    limit_concurrency: int = 64,
    header_timeout_s: float = 10.0,
    keep_alive_s: int = 5,
    graceful_shutdown_s: int = 10,
) -> dict[str, Any]:
    """`uvicorn.run` keywords that bound what slow and idle clients can hold: at most
    `limit_concurrency` connections (uvicorn answers 503 beyond), request headers complete
    within `header_timeout_s` (uvicorn itself has no such limit), idle keep-alive connections
    closed after `keep_alive_s`, and SIGTERM waits at most `graceful_shutdown_s` for open
    requests. Body timeouts are `create_app`'s (`body_timeout_s`, `idle_timeout_s`)."""
    return {
        "limit_concurrency": limit_concurrency,
        "timeout_keep_alive": keep_alive_s,
        "timeout_graceful_shutdown": graceful_shutdown_s,
        "h11_max_incomplete_event_size": 16 * 1024,
        "http": header_timeout_protocol(header_timeout_s),
    }


def header_timeout_protocol(seconds: float) -> type:
    """uvicorn's HTTP protocol class, closing a connection that has not sent a complete request
    head `seconds` after it opened or after its previous response (slow-header clients)."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as Base
    except ImportError:  # httptools is optional in uvicorn
        from uvicorn.protocols.http.h11_impl import H11Protocol as Base

    class HeaderTimeoutProtocol(Base):  # type: ignore[misc, valid-type]
        _header_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._arm_header_timer()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm_header_timer()

        def connection_lost(self, exc: Exception | None) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
            super().connection_lost(exc)

        def _arm_header_timer(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
            waiting = self.cycle  # a new request replaces it once its head is complete
            self._header_timer = self.loop.call_later(seconds, self._header_timeout, waiting)

        def _header_timeout(self, waiting: Any) -> None:
            if self.cycle is waiting and not self.transport.is_closing():
                self.transport.close()

    return HeaderTimeoutProtocol


# ---- the steps of create_app ----


def _model_name(captioner: CaptionsImages) -> str:
    model = getattr(captioner, "model", None)
    return str(getattr(model, "name_or_path", "") or "captioner")


def _build_batcher(captioner: CaptionsImages, settings: ServerSettings) -> Batcher:
    # A captioner that can say how many tokens it generated and why it stopped (`details=True`:
    # `decoding.Generated` captions) is asked to; the OpenAI answers use it.
    caption = getattr(captioner, "caption", None)  # None: `captioner serve` checking settings
    details = caption is not None and "details" in inspect.signature(caption).parameters
    extra = {"details": True} if details else {}

    def caption_batch(images: list[Any], decoding: DecodingOptions) -> list[Caption]:
        return captioner.caption(images, decoding, batch_size=len(images), **extra)

    return Batcher(
        caption_batch,
        max_batch_size=settings.max_batch_size,
        max_wait_ms=settings.max_wait_ms,
        max_queue=settings.max_queue,
    )


def _ran_with(captioner: CaptionsImages) -> Callable[[DecodingOptions], int] | None:
    """`decoding` -> the max_new_tokens its captions really run with: the engine clamps it to
    the model's text positions (less the prompt's). None for a captioner that does not say."""
    resolve = getattr(captioner, "resolve", None)
    if resolve is None:
        return None
    return lambda decoding: resolve(decoding).max_new_tokens


def _lifespan(batcher: Batcher) -> Callable[[FastAPI], AbstractAsyncContextManager[None]]:
    """The batcher's worker runs while the app serves."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await batcher.start()
        try:
            yield
        finally:
            await batcher.stop()

    return lifespan


async def _answer_rejected(request: Request, err: Rejected) -> JSONResponse:
    return error_response(err, openai.is_openai_path(request.url.path))


def error_response(err: Rejected, openai_shape: bool = False) -> JSONResponse:
    headers = {}
    if err.status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    if err.retry_after is not None:
        headers["Retry-After"] = str(err.retry_after)
    detail = err.message
    if len(detail) > MAX_DETAIL_CHARS:  # a 5000-digit number echoed back helps nobody
        detail = detail[: MAX_DETAIL_CHARS - 3] + "..."
    if openai_shape:
        return openai.error_response(err.status, detail, headers=headers or None)
    return JSONResponse({"detail": detail}, status_code=err.status, headers=headers or None)


async def _answer_http_error(request: Request, err: StarletteHTTPException) -> Any:
    """Routing errors (404, 405): OpenAI's shape on its paths, FastAPI's elsewhere."""
    if openai.is_openai_path(request.url.path):
        return openai.error_response(err.status_code, str(err.detail), headers=err.headers)
    return await http_exception_handler(request, err)


async def _answer_bug(request: Request, err: Exception) -> JSONResponse:
    log.error("unhandled error on %s", request.url.path, exc_info=err)
    if openai.is_openai_path(request.url.path):
        return openai.error_response(500, "internal error")
    return JSONResponse({"detail": "internal error"}, status_code=500)


def _add_page_route(app: FastAPI) -> None:
    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index() -> HTMLResponse:
        page = resources.files("captioner.serve").joinpath("static/index.html").read_text()
        return HTMLResponse(page)


def _add_docs_route(app: FastAPI) -> None:
    page: list[str] = []

    @app.get("/docs", response_class=HTMLResponse, include_in_schema=False)
    async def docs() -> HTMLResponse:
        if not page:
            page.append(docs_page(app.openapi()))
        return HTMLResponse(page[0])


def docs_page(schema: dict[str, Any]) -> str:
    """The API as one plain HTML page, from the OpenAPI schema: each route, its request fields
    (type, bounds, help) and its answers. Nothing is fetched: it works offline."""
    e = html.escape
    out = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>{e(schema['info']['title'])} API</title><style>body{{font:15px/1.5 system-ui,"
        "sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem}table{border-collapse:"
        "collapse}td,th{border:1px solid #ccc;padding:.2rem .5rem;text-align:left;"
        "vertical-align:top}code{background:#f3f3f3}</style></head><body>",
        f"<h1>{e(schema['info']['title'])} {e(str(schema['info'].get('version', '')))}</h1>",
        f"<p>{e(schema['info'].get('summary') or '')} The machine-readable schema is "
        "<a href='openapi.json'><code>/openapi.json</code></a>.</p>",
    ]
    for path, methods in schema.get("paths", {}).items():
        for method, op in methods.items():
            out.append(f"<h2><code>{e(method.upper())} {e(path)}</code></h2>")
            if op.get("summary") or op.get("description"):
                out.append(f"<p>{e(op.get('description') or op.get('summary'))}</p>")
            body = op.get("requestBody", {}).get("content", {})
            for ctype, content in body.items():
                props = content.get("schema", {}).get("properties", {})
                out.append(f"<h3>{e(ctype)}</h3>")
                if not props:
                    continue
                out.append("<table><tr><th>field</th><th>type</th><th>bounds</th><th>help</th>")
                for name, prop in props.items():
                    kind = prop.get("type") or ", ".join(
                        str(a.get("type")) for a in prop.get("anyOf", []) if isinstance(a, dict)
                    )
                    bounds = ", ".join(
                        f"{k} {prop[k]}"
                        for k in ("minimum", "exclusiveMinimum", "maximum", "maxLength", "maxItems")
                        if k in prop
                    )
                    out.append(
                        f"<tr><td><code>{e(name)}</code></td><td>{e(str(kind))}</td>"
                        f"<td>{e(bounds)}</td><td>{e(str(prop.get('description', '')))}</td></tr>"
                    )
                out.append("</table>")
            answers = op.get("responses", {})
            if answers:
                out.append("<ul>")
                out += [
                    f"<li><b>{e(str(code))}</b> {e(str(a.get('description', '')))}</li>"
                    for code, a in answers.items()
                ]
                out.append("</ul>")
    out.append("</body></html>")
    return "\n".join(out)


def _add_health_route(
    app: FastAPI, batcher: Batcher, settings: ServerSettings, budget: MemoryBudget
) -> None:
    @app.get("/health")
    async def health() -> dict[str, Any]:
        stats = batcher.stats
        return {
            "status": "ok",
            "model": settings.model_name,
            "device": settings.device,
            "auth": settings.api_key is not None,
            "url_fetch": settings.allow_url_fetch,
            "max_batch_size": settings.max_batch_size,
            "max_wait_ms": settings.max_wait_ms,
            "batches": stats.batches,
            "images": stats.images,
            "largest_batch": stats.largest_batch,
            "abandoned": stats.abandoned,
            "queued": batcher.queued,
            "bytes_in_flight": budget.used,
        }


def _add_caption_route(app: FastAPI, pipeline: Pipeline) -> None:
    settings = pipeline.settings

    @app.post("/caption", openapi_extra=_caption_openapi())
    async def caption(request: Request) -> dict[str, Any]:
        start = time.perf_counter()
        pipeline.check_key(request)
        pipeline.check_room(1)
        with pipeline.hold() as hold:
            body = await _read_request(request, settings, hold)
            pipeline.check_room(len(body.uploads))  # 503 before decoding anything
            images = await _decode_all(body.uploads, settings.max_pixels, hold)
            names = [u.name for u in body.uploads]
            captions = await pipeline.caption(request, images, body.decoding, names)
        latency_ms = round((time.perf_counter() - start) * 1000, 1)
        return _answer(body, captions, settings.model_name, latency_ms)


class Pipeline:
    """The steps from a request to its captions, shared by POST /caption and the OpenAI
    routes (serve/openai.py): each raises `Rejected` with the answer when a step fails."""

    def __init__(self, batcher: Batcher, settings: ServerSettings, budget: MemoryBudget) -> None:
        self.batcher = batcher
        self.settings = settings
        self.budget = budget
        self.model_name = settings.model_name
        self.max_image_json_bytes = settings.max_image_json_bytes
        self.max_json_bytes = settings.max_json_bytes

    def check_key(self, request: Request) -> None:
        check_key(request, self.settings.api_key)

    def check_room(self, n: int) -> None:
        _check_room(self.batcher, n)

    def hold(self) -> contextlib.AbstractContextManager[Hold]:
        """The request's share of the memory budget, given back when the request ends."""
        return self.budget.hold(self.batcher.retry_after_s)

    async def read_body(self, request: Request, limit: int, hold: Hold) -> bytes:
        """The raw body, up to `limit` bytes (413 beyond), each chunk reserved twice in the
        budget as it arrives: once as bytes, once as the string a JSON parser makes of it."""
        raw = bytearray()
        async for chunk in request.stream():
            if len(raw) + len(chunk) > limit:
                raise Rejected(413, f"request body larger than {limit:,} bytes")
            hold.take(2 * len(chunk), "request", "its body")
            raw += chunk
        return bytes(raw)

    async def download(self, url: str, name: str, hold: Hold) -> bytes:
        """A data: URL's bytes, or an http(s) URL's under the server's URL policy."""
        return await _download(url, self.settings, hold, name)

    async def decode(self, named: Sequence[tuple[str, bytes]], hold: Hold) -> list[Image.Image]:
        uploads = [Upload("file", name, data) for name, data in named]
        return await _decode_all(uploads, self.settings.max_pixels, hold)

    async def caption(
        self,
        request: Request,
        images: list[Image.Image],
        decoding: DecodingOptions,
        names: Sequence[str],
    ) -> list[Caption]:
        """One caption per image through the batcher; cancelled if the client leaves."""
        work = _caption_all(self.batcher, images, decoding, names)
        return await _unless_client_leaves(request, work)


# ---- POST /caption, step by step ----


def check_key(request: Request, api_key: str | None) -> None:
    """401 unless the request carries `api_key` (when one is set)."""
    if api_key is None:
        return
    given = (request.headers.get("x-api-key") or "").strip()
    auth = request.headers.get("authorization", "")
    if not given and auth.lower().startswith("bearer "):
        given = auth[7:].strip()
    if not given:  # an empty key is no key
        raise Rejected(401, "missing API key (send header X-API-Key or Authorization: Bearer)")
    if not hmac.compare_digest(given.encode(), api_key.encode()):
        raise Rejected(401, "wrong API key")


def _check_room(batcher: Batcher, n: int) -> None:
    if not batcher.has_room(n):
        raise Rejected(
            503,
            f"server busy: {batcher.queued} images are waiting; retry later",
            retry_after=batcher.retry_after_s(),
        )


async def _read_request(request: Request, settings: ServerSettings, hold: Hold) -> CaptionRequest:
    """A multipart form or a JSON body -> the images' bytes and the decoding options."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype in FORM_TYPES:
        return await _read_form(request, settings.max_files, settings.max_upload_bytes, hold)
    if ctype == "application/json":
        return await _read_json(request, settings, hold)
    raise Rejected(
        415,
        f"unsupported request type '{ctype or 'none'}': send multipart/form-data "
        "(field 'file' or 'files') or application/json with {\"url\": ...}",
    )


async def _read_form(
    request: Request, max_files: int, max_upload_bytes: int, hold: Hold
) -> CaptionRequest:
    try:
        form = await request.form(max_files=max_files, max_fields=MAX_FORM_FIELDS)
    except StarletteHTTPException as err:  # the parser's errors (too many files, bad boundary)
        status = err.status_code if 400 <= err.status_code < 500 else 422
        raise Rejected(status, f"malformed multipart body: {err.detail}") from None
    try:  # closing the form deletes any upload starlette spooled to a temp file
        uploads, fields = _split_form(form, max_upload_bytes, hold)
    finally:
        await form.close()
    as_list = len(uploads) > 1 or any(u.field == "files" for u in uploads)
    return CaptionRequest(uploads, _decoding(fields), as_list)


def _split_form(
    form: Any, max_upload_bytes: int, hold: Hold | None = None
) -> tuple[list[Upload], dict[str, Any]]:
    """Form items -> (uploads, {option: value}); a repeated option (bad_words) becomes a list."""
    uploads: list[Upload] = []
    fields: dict[str, list[str]] = {}
    for key, value in form.multi_items():
        if key in FILE_FIELDS:
            if isinstance(value, str):
                raise Rejected(422, f"field '{key}' must be a file upload, not text")
            data = _read_upload(value, max_upload_bytes, hold)
            uploads.append(Upload(key, value.filename or "upload", data))
        elif isinstance(value, str):
            fields.setdefault(key, []).append(value)
        else:
            raise Rejected(422, f"unexpected file in field '{key}' (use 'file' or 'files')")
    if not uploads:
        raise Rejected(422, "no image: upload one in field 'file' (or several in 'files')")
    return uploads, {k: v[0] if len(v) == 1 else v for k, v in fields.items()}


def _read_upload(upload: Any, max_bytes: int, hold: Hold | None = None) -> bytes:
    """The bytes of one uploaded file, reserved in the memory budget; 413 above `max_bytes`."""
    name = upload.filename or "upload"
    if upload.size is not None and upload.size > max_bytes:
        raise Rejected(413, f"{name}: {upload.size:,} bytes > limit {max_bytes:,}")
    if hold is not None:
        hold.take(max_bytes if upload.size is None else upload.size, name, "its upload")
    upload.file.seek(0)
    data = upload.file.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise Rejected(413, f"{name}: larger than the {max_bytes:,} byte limit")
    return data


async def _read_json(request: Request, settings: ServerSettings, hold: Hold) -> CaptionRequest:
    """{"url": ..., <decoding options>}: read up to `max_json_bytes`, then parsed; the options
    are checked before anything is fetched."""
    limit = settings.max_json_bytes
    raw = bytearray()
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > limit:
            raise Rejected(
                413,
                f"JSON body larger than {limit:,} bytes: send the image as a multipart upload",
            )
    try:
        body = json.loads(bytes(raw))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise Rejected(422, f"malformed JSON body: {err}") from None
    except RecursionError:
        raise Rejected(422, "malformed JSON body: nested too deeply") from None
    except ValueError as err:  # e.g. an integer with more digits than Python converts
        raise Rejected(422, f"malformed JSON body: {err}") from None
    if not isinstance(body, dict):
        raise Rejected(422, "invalid request: the JSON body must be an object")
    options = dict(body)
    url = options.pop("url", None)
    if not isinstance(url, str):
        raise Rejected(422, "invalid request: url: required, an http(s):// or data: URL string")
    decoding = _decoding(options)
    data = await _download(url, settings, hold)
    return CaptionRequest([Upload("url", fetch.short(url), data)], decoding, as_list=False)


def _decoding(values: Mapping[str, Any]) -> DecodingOptions:
    try:
        return DecodingOptions.from_mapping(values)
    except CaptionerError as err:
        raise Rejected(422, f"invalid request: {err}") from None


async def _download(
    url: str, settings: ServerSettings, hold: Hold, name: str | None = None
) -> bytes:
    """The bytes behind a data: URL (413 above the upload limit, 422 if malformed) or, when
    the server fetches URLs, an http(s) URL (one answer for every failure: 422). `name` is how
    messages call the image (default: the URL, shortened)."""
    max_bytes = settings.max_upload_bytes
    if fetch.is_data_url(url):
        try:
            if len(url) * 3 // 4 <= max_bytes + 3:  # larger ones are refused before decoding
                hold.take(len(url) * 3 // 4, name or "data: URL", "its bytes")
            return fetch.decode_data_url(url, max_bytes)
        except fetch.TooLargeError as err:
            raise Rejected(413, f"{name}: {err.reason}" if name else str(err)) from None
        except BadImageError as err:
            raise Rejected(422, f"{name}: {err.reason}" if name else str(err)) from None
    try:
        fetch.check_url(url)
    except BadImageError as err:
        raise Rejected(422, str(err)) from None
    if not settings.allow_url_fetch:
        raise Rejected(
            403,
            "this server does not fetch URLs: upload the image, or send it as a data: URL",
        )
    name = name or fetch.short(url)
    hold.take(max_bytes, name, "its download")
    policy = fetch.UrlPolicy(max_bytes=max_bytes)
    try:
        return await fetch.fetch_async(url, policy=policy)
    except BadImageError as err:  # the reason stays in the log: callers must not map the network
        log.info("URL fetch failed: %s", err)
        raise Rejected(422, f"{name}: {fetch.GENERIC_ERROR}") from None


async def _decode_all(
    uploads: Sequence[Upload], max_pixels: int, hold: Hold | None = None
) -> list[Image.Image]:
    """Every upload decoded off the event loop, before any of them joins a batch."""
    return await run_in_threadpool(decode_images, uploads, max_pixels, hold)


def decode_images(
    uploads: Sequence[Upload], max_pixels: int, hold: Hold | None = None
) -> list[Image.Image]:
    """All headers first (each checked: format, pixel limit, layout), then the memory that
    decoding them all will hold is reserved at once (`hold`: 503 if the server's budget cannot
    take it now), then each image is decoded, once, by the plugin that read its header."""
    with contextlib.ExitStack() as stack:
        opened = [
            (u.name, _rejecting(u.name, stack.enter_context, _open_upload(u, max_pixels)))
            for u in uploads
        ]
        if hold is not None:
            need = sum(decoded_bytes(img.size, img.mode) for _, img in opened)
            what = "decoding it" if len(opened) == 1 else f"decoding its {len(opened)} images"
            hold.take(need, opened[0][0] if len(opened) == 1 else "request", what)
        return [_rejecting(name, decode_rgb, img, name) for name, img in opened]


def decode_image(data: bytes, name: str, max_pixels: int, hold: Hold | None = None) -> Image.Image:
    """Bytes -> RGB image, or Rejected: 415 for non-images and formats outside the whitelist,
    422 for bombs and broken files, 503 when the memory budget (`hold`) cannot take what
    decoding will hold. The header is read and checked first."""
    [image] = decode_images([Upload("file", name, data)], max_pixels, hold)
    return image


def _open_upload(upload: Upload, max_pixels: int) -> Any:
    return open_checked({"bytes": upload.data, "path": upload.name}, max_pixels=max_pixels)


def _rejecting(name: str, fn: Callable[..., Any], *args: Any) -> Any:
    """`fn(*args)`, its image errors turned into the answer for `name`."""
    try:
        return fn(*args)
    except NotAnImageError:
        kinds = ", ".join(ALLOWED_FORMATS)
        raise Rejected(415, f"{name}: not an image, or not a supported format ({kinds})") from None
    except BadImageError as err:
        raise Rejected(422, f"{name}: {err.reason}") from None
    except Rejected:
        raise
    except Exception as err:  # a decoder bug on hostile input is still this file's problem
        raise Rejected(422, f"{name}: cannot decode image ({type(err).__name__})") from None


async def _unless_client_leaves(request: Request, work: Any) -> Any:
    """Await `work`, cancelling it if the client disconnects first (its queued images are then
    dropped before `generate`): nobody is waiting for the answer."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return task.result()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        raise Rejected(499, "client disconnected")
    finally:
        for pending in (task, watcher):
            pending.cancel()


async def _disconnected(request: Request) -> None:
    """Returns when the client has gone (the body has been read: only a disconnect comes)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def _caption_all(
    batcher: Batcher, images: list[Image.Image], decoding: DecodingOptions, names: Sequence[str]
) -> list[Caption]:
    """One caption per image, through the batcher; the first failure answers the request."""
    try:
        results = await batcher.submit_many(images, decoding)
    except QueueFullError as err:  # nothing was queued
        raise Rejected(
            503, f"server busy: {err}; retry later", retry_after=batcher.retry_after_s()
        ) from None
    for name, result in zip(names, results, strict=True):
        if isinstance(result, CaptionerError):
            raise Rejected(422, f"{name}: {result}")
        if isinstance(result, BaseException):
            raise Rejected(500, f"{name}: captioning failed ({type(result).__name__})")
    return results


def _answer(
    body: CaptionRequest, captions: list[Caption], model_name: str, latency_ms: float
) -> dict[str, Any]:
    items = [
        {"caption": _plain(text), "model": model_name, "latency_ms": latency_ms}
        for text in captions
    ]
    if not body.as_list:
        return items[0]
    named = zip(body.uploads, items, strict=True)
    return {"results": [{"filename": upload.name, **item} for upload, item in named]}


def _plain(caption: Caption) -> Caption:
    """A caption as plain str (or list of them), whatever str subclass the captioner made."""
    return [str(c) for c in caption] if isinstance(caption, list) else str(caption)


class RequestGuard:
    """ASGI middleware in front of every route: the Host header against `allowed_hosts` (400);
    bodies over `max_body_bytes`, by Content-Length or while streaming (413, before the form
    parser spools them to disk); bodies that stall or take too long (408). Its answers are
    JSON like every other error."""

    class _Stop(Exception):
        def __init__(self, status: int, detail: str) -> None:
            self.status, self.detail = status, detail

    def __init__(self, app: Any, settings: ServerSettings) -> None:
        self.app = app
        self.settings = settings
        self.limit = settings.max_body_bytes
        hosts = settings.allowed_hosts
        self.hosts = None if hosts is None or "*" in hosts else {host_name(h) for h in hosts}

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        if self.hosts is not None:
            host = host_name(headers.get(b"host", b"").decode("latin-1"))
            if host not in self.hosts:
                return await self._reply(scope, send, 400, "Host header not allowed by this server")
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await self._reply(scope, send, 413, self._too_large(int(length)))
        seen, started, body_done = 0, False, False
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.body_timeout_s

        async def guarded_receive() -> dict:
            nonlocal seen, body_done
            if body_done:  # after the body only a disconnect comes: no time limit on it
                return await receive()
            wait = min(self.settings.idle_timeout_s, deadline - loop.time())
            try:
                message = await asyncio.wait_for(receive(), max(wait, 0.001))
            except asyncio.TimeoutError:
                raise self._Stop(408, "request body not received in time") from None
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise self._Stop(413, self._too_large(seen))
                body_done = not message.get("more_body", False)
            return message

        async def tracking_send(message: dict) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, guarded_receive, tracking_send)
        except self._Stop as stop:
            if not started:
                await self._reply(scope, send, stop.status, stop.detail)

    def _too_large(self, size: int) -> str:
        return f"request body too large ({size:,}+ bytes > limit {self.limit:,})"

    async def _reply(self, scope: dict, send: Any, status: int, detail: str) -> None:
        if openai.is_openai_path(scope.get("path", "")):
            body = json.dumps(openai.error_body(status, detail)).encode()
        else:
            body = json.dumps({"detail": detail}).encode()
        headers = [(b"content-type", b"application/json"), (b"connection", b"close")]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def host_name(host: str) -> str:
    """`Host` header -> name without the port, lower case (`[::1]:8000` -> `[::1]`)."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[: host.find("]") + 1] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


# ---- the OpenAPI description of POST /caption (the handler reads the body itself) ----


def _decoding_schema() -> dict[str, Any]:
    """JSON schema of the decoding fields, derived from `DecodingOptions`: types and defaults
    from the dataclass, help texts and bounds from decoding.py."""
    properties = TypeAdapter(DecodingOptions).json_schema()["properties"]
    for name, prop in properties.items():
        prop["description"] = option_help(name)
        if name in BOUNDS:
            low, high, open_low = BOUNDS[name]
            prop["exclusiveMinimum" if open_low else "minimum"] = low
            prop["maximum"] = high
    if "prompt" in properties:
        properties["prompt"]["maxLength"] = MAX_PROMPT_CHARS
    for name in ("prefix", "suffix"):
        if name in properties:
            properties[name]["maxLength"] = MAX_AFFIX_CHARS
    for name in ("bad_words", "force_words"):
        if name in properties:
            properties[name]["maxItems"] = MAX_WORDS
    return properties


def _caption_openapi() -> dict[str, Any]:
    decoding = _decoding_schema()
    binary = {"type": "string", "format": "binary"}
    url = {
        "type": "string",
        "description": "data: URL of an image, or an http(s) URL if the server fetches URLs",
    }
    return {
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "properties": {
                            "file": binary,
                            "files": {"type": "array", "items": binary},
                            **decoding,
                        },
                    }
                },
                "application/json": {
                    "schema": {
                        "type": "object",
                        "required": ["url"],
                        "additionalProperties": False,
                        "properties": {"url": url, **decoding},
                    }
                },
            },
        },
        "responses": {
            "401": {"description": "missing or wrong API key"},
            "403": {"description": "an http(s) URL, and this server does not fetch URLs"},
            "408": {"description": "the request body stalled or took too long"},
            "413": {"description": "upload or JSON body larger than the byte limit"},
            "415": {"description": "not an image, or an unsupported format"},
            "422": {"description": "too many pixels, broken image, or malformed request"},
            "503": {"description": "busy (queue or image memory full); see Retry-After"},
        },
    }
