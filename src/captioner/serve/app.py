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

A JSON `url` is downloaded by the server (http/https only, 10 s timeout, byte limit). That lets
any caller make the server fetch URLs, including ones on its own network: keep the default
127.0.0.1 bind, or set an API key, before exposing it.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import io
import json
import logging
import time
from contextlib import asynccontextmanager
from importlib import resources
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse, JSONResponse
from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from starlette.concurrency import run_in_threadpool

from captioner.errors import BadImageError, CaptionerError
from captioner.images import load_image
from captioner.serve.batcher import Batcher, QueueFullError

log = logging.getLogger(__name__)

# Formats a browser or camera produces. Others (PSD, EPS, ICO, ...) are refused with 415 before
# any decoder beyond these header parsers sees the bytes.
ALLOWED_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")
FILE_FIELDS = ("file", "files")
URL_TIMEOUT_S = 10.0


class CaptionOptions(BaseModel):
    """Decoding options a request may set (bounded, so one request cannot hog the server)."""

    model_config = ConfigDict(extra="forbid")

    num_beams: int = Field(1, ge=1, le=8)
    max_new_tokens: int = Field(30, ge=1, le=128)
    do_sample: bool = False
    temperature: float | None = Field(None, gt=0, le=5)
    top_p: float | None = Field(None, gt=0, le=1)
    repetition_penalty: float | None = Field(None, gt=0, le=5)
    prompt: str | None = Field(None, max_length=200)

    @model_validator(mode="after")
    def _sampling_only(self) -> CaptionOptions:
        if not self.do_sample and (self.temperature is not None or self.top_p is not None):
            raise ValueError("temperature / top_p only apply with do_sample=true")
        return self


class CaptionRequest(CaptionOptions):
    """The JSON body of POST /caption."""

    url: str = Field(..., description="http(s) URL or data: URL of an image")


class Rejected(Exception):
    """A request answered with a JSON error: `{"detail": message}` and `status`."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def create_app(
    captioner: Any,
    *,
    max_batch_size: int = 16,
    max_wait_ms: float = 5.0,
    max_upload_bytes: int = 10_000_000,
    max_pixels: int = 25_000_000,
    api_key: str | None = None,
    max_files: int = 16,
    max_queue: int = 1024,
    model_name: str | None = None,
) -> FastAPI:
    """Build the app around a loaded `Captioner` (anything with `.caption(images, **options)`).

    `max_upload_bytes` and `max_pixels` apply per image, `max_files` per request. `api_key`
    protects POST /caption (header `X-API-Key` or `Authorization: Bearer`); the page, /health
    and /docs stay open. `max_batch_size=1` turns dynamic batching off.
    """
    model = getattr(captioner, "model", None)
    model_name = model_name or str(getattr(model, "name_or_path", "") or "captioner")
    device = str(getattr(captioner, "device", "cpu"))

    def caption_batch(images: list, options: dict) -> list[str]:
        return captioner.caption(images, batch_size=len(images), **options)

    batcher = Batcher(
        caption_batch,
        max_batch_size=max_batch_size,
        max_wait_ms=max_wait_ms,
        max_queue=max_queue,
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await batcher.start()
        yield
        await batcher.stop()

    app = FastAPI(
        title="captioner",
        summary="Image captioning with dynamic batching.",
        version=_version(),
        lifespan=lifespan,
    )
    app.state.batcher = batcher
    # Whole-request cap: enough for max_files full-size images plus form overhead.
    app.add_middleware(BodyLimit, limit=max_files * max_upload_bytes + 64 * 1024)

    @app.exception_handler(Rejected)
    async def _rejected(request: Request, err: Rejected) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if err.status == 401 else None
        return JSONResponse({"detail": err.message}, status_code=err.status, headers=headers)

    def check_key(request: Request) -> None:
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

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index() -> HTMLResponse:
        page = resources.files("captioner.serve").joinpath("static/index.html").read_text()
        return HTMLResponse(page)

    @app.get("/health")
    async def health() -> dict:
        s = batcher.stats
        return {
            "status": "ok",
            "model": model_name,
            "device": device,
            "auth": api_key is not None,
            "max_batch_size": max_batch_size,
            "max_wait_ms": max_wait_ms,
            "batches": s.batches,
            "images": s.images,
            "largest_batch": s.largest_batch,
        }

    @app.post("/caption", openapi_extra=_CAPTION_OPENAPI)
    async def caption(request: Request) -> dict:
        start = time.perf_counter()
        check_key(request)
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype in ("multipart/form-data", "application/x-www-form-urlencoded"):
            uploads, fields = await _read_form(request, max_files, max_upload_bytes)
            options = _options(CaptionOptions, fields)
            as_list = len(uploads) > 1 or any(field == "files" for field, _, _ in uploads)
        elif ctype == "application/json":
            body = _options(CaptionRequest, _json(await request.body()))
            options = CaptionOptions(**body.model_dump(exclude={"url"}))
            data = await _fetch(body.url, max_upload_bytes)
            uploads, as_list = [("url", _short(body.url), data)], False
        else:
            raise Rejected(
                415,
                f"unsupported request type '{ctype or 'none'}': send multipart/form-data "
                "(field 'file' or 'files') or application/json with {\"url\": ...}",
            )
        images = [
            await run_in_threadpool(decode_image, data, name, max_pixels)
            for _, name, data in uploads
        ]
        opts = options.model_dump(exclude_none=True)
        captions = await asyncio.gather(
            *(batcher.submit(image, opts) for image in images), return_exceptions=True
        )
        latency_ms = round((time.perf_counter() - start) * 1000, 1)
        out = []
        for (_, name, _), text in zip(uploads, captions, strict=True):
            if isinstance(text, QueueFullError):
                raise Rejected(503, f"server busy: {text}; retry later")
            if isinstance(text, CaptionerError):
                raise Rejected(422, f"{name}: {text}")
            if isinstance(text, BaseException):
                raise Rejected(500, f"{name}: captioning failed ({type(text).__name__})")
            item = {"caption": text, "model": model_name, "latency_ms": latency_ms}
            out.append({"filename": name, **item} if as_list else item)
        return {"results": out} if as_list else out[0]

    return app


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


async def _read_form(
    request: Request, max_files: int, max_upload_bytes: int
) -> tuple[list[tuple[str, str, bytes]], dict[str, str]]:
    """Multipart body -> ([(field, filename, bytes)], {option: value})."""
    try:
        form = await request.form(max_files=max_files, max_fields=32)
    except HTTPException as err:  # starlette's parser errors (too many files, bad boundary...)
        raise Rejected(422, f"malformed multipart body: {err.detail}") from None
    try:  # closing the form deletes any upload starlette spooled to a temp file
        return _split_form(form, max_upload_bytes)
    finally:
        await form.close()


def _split_form(form: Any, max_upload_bytes: int) -> tuple[list, dict]:
    uploads, fields = [], {}
    for key, value in form.multi_items():
        if key in FILE_FIELDS:
            if isinstance(value, str):
                raise Rejected(422, f"field '{key}' must be a file upload, not text")
            name = value.filename or "upload"
            if value.size is not None and value.size > max_upload_bytes:
                raise Rejected(413, f"{name}: {value.size:,} bytes > limit {max_upload_bytes:,}")
            value.file.seek(0)
            data = value.file.read(max_upload_bytes + 1)
            if len(data) > max_upload_bytes:
                raise Rejected(413, f"{name}: larger than the {max_upload_bytes:,} byte limit")
            uploads.append((key, name, data))
        elif isinstance(value, str):
            fields[key] = value
        else:
            raise Rejected(422, f"unexpected file in field '{key}' (use 'file' or 'files')")
    if not uploads:
        raise Rejected(422, "no image: upload one in field 'file' (or several in 'files')")
    return uploads, fields


def _options(model: type[BaseModel], fields: Any) -> Any:
    """Validate options; pydantic's message becomes one readable 422 line."""
    try:
        return model.model_validate(fields)
    except ValidationError as err:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in err.errors()
        )
        raise Rejected(422, f"invalid request: {problems}") from None


def _json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise Rejected(422, f"malformed JSON body: {err}") from None


async def _fetch(url: str, max_bytes: int) -> bytes:
    """The bytes of an http(s) or data: URL, at most `max_bytes` (413 above)."""
    if url.startswith("data:"):
        header, sep, payload = url.partition(",")
        if not sep or not header.endswith(";base64"):
            raise Rejected(422, "data: URL must be base64 (data:image/png;base64,...)")
        if len(payload) * 3 // 4 > max_bytes + 3:
            raise Rejected(413, f"data: URL image larger than the {max_bytes:,} byte limit")
        try:
            return base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise Rejected(422, "data: URL is not valid base64") from None
    if not url.lower().startswith(("http://", "https://")):
        raise Rejected(422, f"url must be http(s):// or data:, got '{_short(url)}'")
    import httpx

    data = bytearray()
    try:
        async with httpx.AsyncClient(timeout=URL_TIMEOUT_S, follow_redirects=True) as client:
            async with client.stream("GET", url) as resp:
                if resp.status_code != 200:
                    raise Rejected(422, f"{_short(url)}: download failed (HTTP {resp.status_code})")
                async for chunk in resp.aiter_bytes():
                    data += chunk
                    if len(data) > max_bytes:
                        raise Rejected(413, f"{_short(url)}: larger than {max_bytes:,} bytes")
    except httpx.HTTPError as err:
        raise Rejected(422, f"{_short(url)}: download failed ({type(err).__name__})") from None
    return bytes(data)


def _short(text: str, n: int = 80) -> str:
    return text if len(text) <= n else text[: n - 3] + "..."


def _version() -> str:
    from captioner import __version__

    return __version__


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


_CAPTION_OPENAPI = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "file": {"type": "string", "format": "binary"},
                        "files": {"type": "array", "items": {"type": "string", "format": "binary"}},
                        **CaptionOptions.model_json_schema()["properties"],
                    },
                }
            },
            "application/json": {"schema": CaptionRequest.model_json_schema()},
        },
    },
    "responses": {
        "401": {"description": "missing or wrong API key"},
        "413": {"description": "upload larger than the byte limit"},
        "415": {"description": "not an image, or an unsupported format"},
        "422": {"description": "too many pixels, broken image, or malformed request"},
    },
}
