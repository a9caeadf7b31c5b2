"""captioner's own API: POST /caption (an `APIRouter` over the shared `Pipeline`).

    POST /caption   multipart upload (field `file` or `files`, one or several images) or JSON
                    {"url": "data:image/...;base64,..." | "http(s)://..."}; decoding options as
                    form/JSON fields. -> {"caption", "model", "latency_ms"} (several ->
                    "results"). With `stream=true` (one image): server-sent events
                    {"text": piece} as the caption is generated, then the answer itself.

Errors are `{"detail": "<file>: <what is wrong>"}`.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Request
from starlette.exceptions import HTTPException as StarletteHTTPException

from captioner.data import fetch
from captioner.decoding import DecodingOptions
from captioner.errors import CaptionerError
from captioner.serve import body
from captioner.serve.batcher import Caption
from captioner.serve.errors import HTTPError
from captioner.serve.pipeline import Hold, Pipeline, Streamed, Upload, sse, sse_response
from captioner.serve.schemas import caption_openapi
from captioner.serve.settings import ServerSettings

FILE_FIELDS = ("file", "files")
FORM_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded")
MAX_FORM_FIELDS = 32
TOO_BIG_JSON = ": send the image as a multipart upload"


@dataclass
class CaptionRequest:
    """A POST /caption body, read and checked: the images' bytes and how to decode them."""

    uploads: list[Upload]
    decoding: DecodingOptions
    as_list: bool  # answer {"results": [...]} (several files, or the `files` field)
    stream: bool = False


def router(pipeline: Pipeline) -> APIRouter:
    api = APIRouter()
    settings = pipeline.settings

    @api.post("/caption", openapi_extra=caption_openapi())
    async def caption(request: Request) -> Any:
        start = time.perf_counter()
        pipeline.check_key(request)
        pipeline.check_room(1)
        with contextlib.ExitStack() as resources:
            hold = resources.enter_context(pipeline.hold())
            asked = await _read_request(request, pipeline, hold)
            pipeline.check_room(len(asked.uploads))  # 503 before decoding anything
            images = await pipeline.decode(asked.uploads, hold)
            names = [u.name for u in asked.uploads]
            if asked.stream:  # the stream owns the memory until it ends
                events = pipeline.stream(images[0], asked.decoding, names[0], resources)
                return sse_response(_events(events, settings.model_name, start), events)
            captions = await pipeline.caption(request, images, asked.decoding, names)
        return _answer(asked, captions, settings.model_name, _ms(start))

    return api


async def _events(events: Streamed, model: str, start: float) -> AsyncIterator[bytes]:
    sent = ""
    async for kind, value in events:
        if kind == "text":
            sent += value
            yield sse({"text": value})
        elif kind == "error":
            yield sse({"status": value.status, "detail": value.message})
        else:
            caption = str(value)
            if caption[len(sent) :]:  # a captioner that does not stream: all of it at the end
                yield sse({"text": caption[len(sent) :]})
            yield sse({"caption": caption, "model": model, "latency_ms": _ms(start)})


def _ms(start: float) -> float:
    return round((time.perf_counter() - start) * 1000, 1)


async def _read_request(request: Request, pipeline: Pipeline, hold: Hold) -> CaptionRequest:
    """A multipart form or a JSON body -> the images' bytes and the decoding options."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    settings = pipeline.settings
    if ctype in FORM_TYPES:
        uploads, fields = await _read_form(request, settings, hold)
        as_list = len(uploads) > 1 or any(u.field == "files" for u in uploads)
    elif ctype == "application/json":
        limit = settings.max_json_bytes
        fields = await body.read_json(request, hold, limit, limit, body.loads, TOO_BIG_JSON)
        if not isinstance(fields, dict):
            raise HTTPError(422, "invalid request: the JSON body must be an object")
        fields = dict(fields)
        url = fields.pop("url", None)
        if not isinstance(url, str):
            raise HTTPError(422, "invalid request: url: required, an http(s):// or data: URL")
        stream, decoding = _stream(fields), _decoding(fields)  # checked before any fetch
        name = fetch.short(url)
        data = await pipeline.download(url, hold)
        return CaptionRequest([Upload("url", name, data)], decoding, False, stream)
    else:
        raise HTTPError(
            415,
            f"unsupported request type '{ctype or 'none'}': send multipart/form-data "
            "(field 'file' or 'files') or application/json with {\"url\": ...}",
        )
    stream = _stream(fields)
    if stream and len(uploads) > 1:
        raise HTTPError(422, "invalid request: stream: one image at a time")
    return CaptionRequest(uploads, _decoding(fields), as_list, stream)


def _stream(fields: dict[str, Any]) -> bool:
    value = fields.pop("stream", False)
    if value in (True, False):
        return bool(value)
    if isinstance(value, str) and value.lower() in ("true", "1", "false", "0"):
        return value.lower() in ("true", "1")
    raise HTTPError(422, "invalid request: stream: true or false")


def _decoding(values: Mapping[str, Any]) -> DecodingOptions:
    try:
        return DecodingOptions.from_mapping(values)
    except CaptionerError as err:
        raise HTTPError(422, f"invalid request: {err}") from None


async def _read_form(
    request: Request, settings: ServerSettings, hold: Hold
) -> tuple[list[Upload], dict[str, Any]]:
    try:
        form = await request.form(max_files=settings.max_files, max_fields=MAX_FORM_FIELDS)
    except StarletteHTTPException as err:  # the parser's errors (too many files, bad boundary)
        status = err.status_code if 400 <= err.status_code < 500 else 422
        raise HTTPError(status, f"malformed multipart body: {err.detail}") from None
    try:  # closing the form deletes any upload starlette spooled to a temp file
        return _split_form(form, settings.max_upload_bytes, hold)
    finally:
        await form.close()


def _split_form(
    form: Any, max_upload_bytes: int, hold: Hold
) -> tuple[list[Upload], dict[str, Any]]:
    """Form items -> (uploads, {option: value}); a repeated option (bad_words) becomes a list."""
    uploads: list[Upload] = []
    fields: dict[str, list[str]] = {}
    for key, value in form.multi_items():
        if key in FILE_FIELDS:
            if isinstance(value, str):
                raise HTTPError(422, f"field '{key}' must be a file upload, not text")
            data = _read_upload(value, max_upload_bytes, hold)
            uploads.append(Upload(key, value.filename or "upload", data))
        elif isinstance(value, str):
            fields.setdefault(key, []).append(value)
        else:
            raise HTTPError(422, f"unexpected file in field '{key}' (use 'file' or 'files')")
    if not uploads:
        raise HTTPError(422, "no image: upload one in field 'file' (or several in 'files')")
    return uploads, {k: v[0] if len(v) == 1 else v for k, v in fields.items()}


def _read_upload(upload: Any, max_bytes: int, hold: Hold) -> bytes:
    """The bytes of one uploaded file, reserved in the memory budget; 413 above `max_bytes`."""
    name = upload.filename or "upload"
    if upload.size is not None and upload.size > max_bytes:
        raise HTTPError(413, f"{name}: {upload.size:,} bytes > limit {max_bytes:,}")
    hold.take(max_bytes if upload.size is None else upload.size, name, "its upload")
    upload.file.seek(0)
    data = upload.file.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise HTTPError(413, f"{name}: larger than the {max_bytes:,} byte limit")
    return data


def _answer(
    asked: CaptionRequest, captions: list[Caption], model_name: str, latency_ms: float
) -> dict[str, Any]:
    items = [
        {"caption": _plain(text), "model": model_name, "latency_ms": latency_ms}
        for text in captions
    ]
    if not asked.as_list:
        return items[0]
    named = zip(asked.uploads, items, strict=True)
    return {"results": [{"filename": upload.name, **item} for upload, item in named]}


def _plain(caption: Caption) -> Caption:
    """A caption as plain str (or list of them), whatever str subclass the captioner made."""
    return [str(c) for c in caption] if isinstance(caption, list) else str(caption)
