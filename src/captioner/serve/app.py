"""The HTTP server: FastAPI routes over `Captioner.caption`, through the dynamic batcher.

    POST /caption   multipart upload (field `file` or `files`, one or several images) or JSON
                    {"url": "http(s)://..." | "data:image/...;base64,..."}; decoding options as
                    form/JSON fields. -> {"caption", "model", "latency_ms"} (several -> "results")
    GET  /health    {"status", "model", "device", ...}
    GET  /          one static page: choose or drop an image, see it with its caption
    GET  /docs      the generated OpenAPI docs

Every request is checked and decoded *before* it joins a batch, so an oversized, non-image or
bomb upload is answered with its own JSON error (413 / 415 / 422) and never touches the
requests batched with it. Errors are `{"detail": "<file>: <what is wrong>"}`.

The owners of the rules this module applies: decoding options and their bounds are
`captioner.decoding.DecodingOptions`, URL downloads and data: URLs are `captioner.fetch`, the
pixel limit and image decoding are `captioner.images`.

A JSON `url` is downloaded by the server (http/https only, time and byte limits). That lets any
caller make the server fetch URLs, including ones on its own network: keep the default
127.0.0.1 bind, or set an API key, before exposing it.
"""

from __future__ import annotations

import asyncio
import hmac
import io
import json
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from importlib import resources
from typing import Any, NamedTuple, Protocol

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse, JSONResponse
from PIL import Image, UnidentifiedImageError
from pydantic import TypeAdapter
from starlette.concurrency import run_in_threadpool

from captioner import __version__, fetch
from captioner.decoding import BOUNDS, MAX_PROMPT_CHARS, DecodingOptions, option_help
from captioner.errors import BadImageError, CaptionerError
from captioner.images import DEFAULT_MAX_PIXELS, load_image
from captioner.serve.batcher import Batcher, Caption, QueueFullError

# Formats a browser or camera produces. Others (PSD, EPS, ICO, ...) are refused with 415 before
# any decoder beyond these header parsers sees the bytes.
ALLOWED_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")
FILE_FIELDS = ("file", "files")
FORM_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded")
MAX_FORM_FIELDS = 32
FORM_OVERHEAD_BYTES = 64 * 1024  # room for the form's own bytes beside max_files full uploads


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
    """A request answered with a JSON error: `{"detail": message}` and `status`."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class ServerSettings:
    """The server's limits and identity; checked on creation, so a bad one is one clear line."""

    max_batch_size: int
    max_wait_ms: float
    max_upload_bytes: int
    max_pixels: int
    api_key: str | None
    max_files: int
    max_queue: int
    model_name: str
    device: str

    def __post_init__(self) -> None:
        for name in ("max_batch_size", "max_upload_bytes", "max_pixels", "max_files", "max_queue"):
            value = getattr(self, name)
            if value < 1:
                raise CaptionerError(f"--{name} must be >= 1, got {value}")
        if not self.max_wait_ms >= 0:  # written so that NaN fails too
            raise CaptionerError(f"--max_wait_ms must be >= 0, got {self.max_wait_ms}")
        if self.api_key is not None and not self.api_key.strip():
            raise CaptionerError("--api_key must not be empty")

    @property
    def max_body_bytes(self) -> int:
        """Whole-request cap: enough for `max_files` full-size images plus form overhead."""
        return self.max_files * self.max_upload_bytes + FORM_OVERHEAD_BYTES


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
    *,
    max_batch_size: int = 16,
    max_wait_ms: float = 5.0,
    max_upload_bytes: int = 10_000_000,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    api_key: str | None = None,
    max_files: int = 16,
    max_queue: int = 1024,
    model_name: str | None = None,
) -> FastAPI:
    """Build the app around a loaded `Captioner` (anything with `.caption(images, decoding)`).

    `max_upload_bytes` and `max_pixels` apply per image, `max_files` per request. `api_key`
    protects POST /caption (header `X-API-Key` or `Authorization: Bearer`); the page, /health
    and /docs stay open. `max_batch_size=1` turns dynamic batching off. A bad setting raises
    `CaptionerError` before anything starts.
    """
    settings = ServerSettings(
        max_batch_size=max_batch_size,
        max_wait_ms=max_wait_ms,
        max_upload_bytes=max_upload_bytes,
        max_pixels=max_pixels,
        api_key=api_key,
        max_files=max_files,
        max_queue=max_queue,
        model_name=model_name or _model_name(captioner),
        device=str(getattr(captioner, "device", "cpu")),
    )
    batcher = _build_batcher(captioner, settings)
    app = FastAPI(
        title="captioner",
        summary="Image captioning with dynamic batching.",
        version=__version__,
        lifespan=_lifespan(batcher),
    )
    app.state.batcher = batcher
    app.state.settings = settings
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)
    app.add_exception_handler(Rejected, _answer_rejected)
    _add_page_route(app)
    _add_health_route(app, batcher, settings)
    _add_caption_route(app, batcher, settings)
    return app


# ---- the steps of create_app ----


def _model_name(captioner: CaptionsImages) -> str:
    model = getattr(captioner, "model", None)
    return str(getattr(model, "name_or_path", "") or "captioner")


def _build_batcher(captioner: CaptionsImages, settings: ServerSettings) -> Batcher:
    def caption_batch(images: list[Any], decoding: DecodingOptions) -> list[Caption]:
        return captioner.caption(images, decoding, batch_size=len(images))

    return Batcher(
        caption_batch,
        max_batch_size=settings.max_batch_size,
        max_wait_ms=settings.max_wait_ms,
        max_queue=settings.max_queue,
    )


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
    headers = {"WWW-Authenticate": "Bearer"} if err.status == 401 else None
    return JSONResponse({"detail": err.message}, status_code=err.status, headers=headers)


def _add_page_route(app: FastAPI) -> None:
    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index() -> HTMLResponse:
        page = resources.files("captioner.serve").joinpath("static/index.html").read_text()
        return HTMLResponse(page)


def _add_health_route(app: FastAPI, batcher: Batcher, settings: ServerSettings) -> None:
    @app.get("/health")
    async def health() -> dict[str, Any]:
        stats = batcher.stats
        return {
            "status": "ok",
            "model": settings.model_name,
            "device": settings.device,
            "auth": settings.api_key is not None,
            "max_batch_size": settings.max_batch_size,
            "max_wait_ms": settings.max_wait_ms,
            "batches": stats.batches,
            "images": stats.images,
            "largest_batch": stats.largest_batch,
        }


def _add_caption_route(app: FastAPI, batcher: Batcher, settings: ServerSettings) -> None:
    @app.post("/caption", openapi_extra=_caption_openapi())
    async def caption(request: Request) -> dict[str, Any]:
        start = time.perf_counter()
        _check_key(request, settings.api_key)
        body = await _read_request(request, settings)
        images = await _decode_all(body.uploads, settings.max_pixels)
        captions = await _caption_all(batcher, images, body)
        latency_ms = round((time.perf_counter() - start) * 1000, 1)
        return _answer(body, captions, settings.model_name, latency_ms)


# ---- POST /caption, step by step ----


def _check_key(request: Request, api_key: str | None) -> None:
    """401 unless the request carries `api_key` (when one is set)."""
    if api_key is None:
        return
    given = request.headers.get("x-api-key")
    auth = request.headers.get("authorization", "")
    if given is None and auth.lower().startswith("bearer "):
        given = auth[7:].strip()
    if given is None:
        raise Rejected(401, "missing API key (send header X-API-Key or Authorization: Bearer)")
    if not hmac.compare_digest(given.encode(), api_key.encode()):
        raise Rejected(401, "wrong API key")


async def _read_request(request: Request, settings: ServerSettings) -> CaptionRequest:
    """A multipart form or a JSON body -> the images' bytes and the decoding options."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype in FORM_TYPES:
        return await _read_form(request, settings.max_files, settings.max_upload_bytes)
    if ctype == "application/json":
        return await _read_json(request, settings.max_upload_bytes)
    raise Rejected(
        415,
        f"unsupported request type '{ctype or 'none'}': send multipart/form-data "
        "(field 'file' or 'files') or application/json with {\"url\": ...}",
    )


async def _read_form(request: Request, max_files: int, max_upload_bytes: int) -> CaptionRequest:
    try:
        form = await request.form(max_files=max_files, max_fields=MAX_FORM_FIELDS)
    except HTTPException as err:  # starlette's parser errors (too many files, bad boundary...)
        raise Rejected(422, f"malformed multipart body: {err.detail}") from None
    try:  # closing the form deletes any upload starlette spooled to a temp file
        uploads, fields = _split_form(form, max_upload_bytes)
    finally:
        await form.close()
    as_list = len(uploads) > 1 or any(u.field == "files" for u in uploads)
    return CaptionRequest(uploads, _decoding(fields), as_list)


def _split_form(form: Any, max_upload_bytes: int) -> tuple[list[Upload], dict[str, Any]]:
    """Form items -> (uploads, {option: value}); a repeated option (bad_words) becomes a list."""
    uploads: list[Upload] = []
    fields: dict[str, list[str]] = {}
    for key, value in form.multi_items():
        if key in FILE_FIELDS:
            if isinstance(value, str):
                raise Rejected(422, f"field '{key}' must be a file upload, not text")
            data = _read_upload(value, max_upload_bytes)
            uploads.append(Upload(key, value.filename or "upload", data))
        elif isinstance(value, str):
            fields.setdefault(key, []).append(value)
        else:
            raise Rejected(422, f"unexpected file in field '{key}' (use 'file' or 'files')")
    if not uploads:
        raise Rejected(422, "no image: upload one in field 'file' (or several in 'files')")
    return uploads, {k: v[0] if len(v) == 1 else v for k, v in fields.items()}


def _read_upload(upload: Any, max_bytes: int) -> bytes:
    """The bytes of one uploaded file; 413 above `max_bytes`."""
    name = upload.filename or "upload"
    if upload.size is not None and upload.size > max_bytes:
        raise Rejected(413, f"{name}: {upload.size:,} bytes > limit {max_bytes:,}")
    upload.file.seek(0)
    data = upload.file.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise Rejected(413, f"{name}: larger than the {max_bytes:,} byte limit")
    return data


async def _read_json(request: Request, max_bytes: int) -> CaptionRequest:
    """{"url": ..., <decoding options>}: the options are checked before anything is fetched."""
    try:
        body = json.loads(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise Rejected(422, f"malformed JSON body: {err}") from None
    if not isinstance(body, dict):
        raise Rejected(422, "invalid request: the JSON body must be an object")
    options = dict(body)
    url = options.pop("url", None)
    if not isinstance(url, str):
        raise Rejected(422, "invalid request: url: required, an http(s):// or data: URL string")
    decoding = _decoding(options)
    data = await _download(url, max_bytes)
    return CaptionRequest([Upload("url", fetch.short(url), data)], decoding, as_list=False)


def _decoding(values: Mapping[str, Any]) -> DecodingOptions:
    try:
        return DecodingOptions.from_mapping(values)
    except CaptionerError as err:
        raise Rejected(422, f"invalid request: {err}") from None


async def _download(url: str, max_bytes: int) -> bytes:
    """The bytes behind an http(s) or data: URL: 413 above `max_bytes`, 422 on any failure."""
    try:
        if url.startswith("data:"):
            return fetch.decode_data_url(url, max_bytes)
        return await fetch.fetch_async(url, max_bytes=max_bytes)
    except fetch.TooLargeError as err:
        raise Rejected(413, str(err)) from None
    except BadImageError as err:
        raise Rejected(422, str(err)) from None


async def _decode_all(uploads: Sequence[Upload], max_pixels: int) -> list[Image.Image]:
    """Every upload decoded off the event loop, before any of them joins a batch."""
    return [await run_in_threadpool(decode_image, u.data, u.name, max_pixels) for u in uploads]


async def _caption_all(
    batcher: Batcher, images: list[Image.Image], body: CaptionRequest
) -> list[Caption]:
    """One caption per image, through the batcher; the first failure answers the request."""
    results = await asyncio.gather(
        *(batcher.submit(image, body.decoding) for image in images), return_exceptions=True
    )
    for upload, result in zip(body.uploads, results, strict=True):
        if isinstance(result, QueueFullError):
            raise Rejected(503, f"server busy: {result}; retry later")
        if isinstance(result, CaptionerError):
            raise Rejected(422, f"{upload.name}: {result}")
        if isinstance(result, BaseException):
            raise Rejected(500, f"{upload.name}: captioning failed ({type(result).__name__})")
    return results


def _answer(
    body: CaptionRequest, captions: list[Caption], model_name: str, latency_ms: float
) -> dict[str, Any]:
    items = [{"caption": text, "model": model_name, "latency_ms": latency_ms} for text in captions]
    if not body.as_list:
        return items[0]
    named = zip(body.uploads, items, strict=True)
    return {"results": [{"filename": upload.name, **item} for upload, item in named]}


def decode_image(data: bytes, name: str, max_pixels: int) -> Image.Image:
    """Bytes -> RGB image, or Rejected: 415 for non-images and other formats, 422 for bombs and
    broken files. The header is read first, so a bomb is refused before anything is decoded."""
    try:  # the format whitelist (415); the pixel limit is load_image's own header check (422)
        with Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS):
            pass
    except Image.DecompressionBombError:
        raise Rejected(422, f"{name}: too many pixels (decompression bomb?)") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError):
        kinds = ", ".join(ALLOWED_FORMATS)
        raise Rejected(415, f"{name}: not an image, or not a supported format ({kinds})") from None
    try:
        return load_image({"bytes": data, "path": name}, max_pixels=max_pixels)
    except BadImageError as err:
        raise Rejected(422, f"{name}: {err.reason}") from None
    except Exception as err:  # a decoder bug on hostile input is still this file's problem
        raise Rejected(422, f"{name}: cannot decode image ({type(err).__name__})") from None


class BodyLimit:
    """ASGI middleware: 413 for bodies over `limit` bytes, by Content-Length or while streaming
    (a chunked upload has no Content-Length), before the form parser spools them to disk."""

    class _TooLarge(Exception):
        pass

    def __init__(self, app: Any, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await self._reply(send, int(length))
        seen, started = 0, False

        async def limited_receive() -> dict:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise self._TooLarge
            return message

        async def tracking_send(message: dict) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except self._TooLarge:
            if not started:
                await self._reply(send, seen)

    async def _reply(self, send: Any, size: int) -> None:
        body = json.dumps(
            {"detail": f"request body too large ({size:,}+ bytes > limit {self.limit:,})"}
        ).encode()
        headers = [(b"content-type", b"application/json"), (b"connection", b"close")]
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": body})


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
    return properties


def _caption_openapi() -> dict[str, Any]:
    decoding = _decoding_schema()
    binary = {"type": "string", "format": "binary"}
    url = {"type": "string", "description": "http(s) URL or data: URL of an image"}
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
            "413": {"description": "upload larger than the byte limit"},
            "415": {"description": "not an image, or an unsupported format"},
            "422": {"description": "too many pixels, broken image, or malformed request"},
            "503": {"description": "too many requests waiting; retry later"},
        },
    }
