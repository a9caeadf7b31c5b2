"""The steps from a request to its captions, shared by both APIs (routers/): the API key, queue
room, the byte budget, downloading, decoding, and the batcher. Each step raises `HTTPError`
with the answer when it fails; the routers only parse and answer.

Every image is checked and decoded *before* it joins a batch, so an oversized, non-image or
bomb upload gets its own error (413 / 415 / 422) and never touches the requests batched with it.
Memory is bounded by design: every request reserves, from one server-wide budget
(`max_decoded_bytes`), the bytes of its body and uploads and what decoding each image will hold
(known from the header, before decoding), and gives them back when it is answered. A full budget
or a full queue is a 503 with Retry-After, before any work is queued.

The server fetches no URL unless `allow_url_fetch` is set; then `captioner.data.fetch`'s policy
applies (public addresses only, every redirect checked, one deadline, a byte limit) and every
failure gets the same answer, so the server cannot be used to map its own network.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import inspect
import json
import logging
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import Any, NamedTuple, Protocol

from fastapi import Request
from fastapi.responses import StreamingResponse
from PIL import Image
from starlette.concurrency import run_in_threadpool

from captioner.data import fetch
from captioner.data.images import (
    ALLOWED_FORMATS,
    NotAnImageError,
    decode_rgb,
    decoded_bytes,
    open_checked,
)
from captioner.decoding import DecodingOptions
from captioner.errors import BadImageError, CaptionerError
from captioner.serve.batcher import Batcher, Caption, QueueFullError, Stream
from captioner.serve.errors import HTTPError
from captioner.serve.settings import ServerSettings

log = logging.getLogger(__name__)


class CaptionsImages(Protocol):
    """What the server needs from a `Captioner` (tests pass a stand-in; one with
    `caption_stream` streams tokens, others answer a stream in one piece)."""

    def caption(
        self, images: list[Any], decoding: DecodingOptions | None = None, *,
        batch_size: int | None = None,
    ) -> list[Any]: ...  # fmt: skip


class Upload(NamedTuple):
    field: str  # "file", "files" or "url"
    name: str  # the file name or the shortened URL, for messages and results
    data: bytes


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
            raise HTTPError(
                422,
                f"{name}: {what} needs {n:,} bytes, more than this server ever holds "
                f"({self.budget.limit:,})",
            )
        if not self.budget.take(n):
            raise HTTPError(
                503,
                "server busy: its memory for images in flight is in use; retry later",
                retry_after=self.retry_after(),
            )
        with self._lock:
            self.held += n


class Pipeline:
    """The shared steps, over one batcher and one budget (`app.state.pipeline`)."""

    def __init__(self, captioner: CaptionsImages | None, settings: ServerSettings) -> None:
        self.settings = settings
        self.batcher = build_batcher(captioner, settings)
        self.budget = MemoryBudget(settings.max_decoded_bytes)

    def check_key(self, request: Request) -> None:
        check_key(request, self.settings.api_key)

    def check_room(self, n: int) -> None:
        if not self.batcher.has_room(n):
            raise HTTPError(
                503,
                f"server busy: {self.batcher.queued} images are waiting; retry later",
                retry_after=self.batcher.retry_after_s(),
            )

    def hold(self) -> contextlib.AbstractContextManager[Hold]:
        """The request's share of the memory budget, given back when the request ends."""
        return self.budget.hold(self.batcher.retry_after_s)

    async def download(self, url: str, hold: Hold, name: str | None = None) -> bytes:
        """The bytes behind a data: URL (413 above the upload limit, 422 if malformed) or, when
        the server fetches URLs, an http(s) URL (one answer for every failure: 422). `name` is
        how messages call the image (default: the URL, shortened)."""
        max_bytes = self.settings.max_upload_bytes
        if fetch.is_data_url(url):
            try:
                if len(url) * 3 // 4 <= max_bytes + 3:  # larger ones are refused before decoding
                    hold.take(len(url) * 3 // 4, name or "data: URL", "its bytes")
                return fetch.decode_data_url(url, max_bytes)
            except fetch.TooLargeError as err:
                raise HTTPError(413, f"{name}: {err.reason}" if name else str(err)) from None
            except BadImageError as err:
                raise HTTPError(422, f"{name}: {err.reason}" if name else str(err)) from None
        try:
            fetch.check_url(url)
        except BadImageError as err:
            raise HTTPError(422, str(err)) from None
        if not self.settings.allow_url_fetch:
            raise HTTPError(
                403, "this server does not fetch URLs: upload the image, or send it as a data: URL"
            )
        name = name or fetch.short(url)
        hold.take(max_bytes, name, "its download")
        try:
            return await fetch.fetch_async(url, policy=fetch.UrlPolicy(max_bytes=max_bytes))
        except BadImageError as err:  # the reason stays in the log: callers must not map the net
            log.info("URL fetch failed: %s", err)
            raise HTTPError(422, f"{name}: {fetch.GENERIC_ERROR}") from None

    async def decode(self, uploads: Sequence[Upload], hold: Hold) -> list[Image.Image]:
        """Every upload decoded off the event loop, before any of them joins a batch."""
        return await run_in_threadpool(decode_images, uploads, self.settings.max_pixels, hold)

    async def caption(
        self, request: Request, images: list[Image.Image], decoding: DecodingOptions,
        names: Sequence[str],
    ) -> list[Caption]:  # fmt: skip
        """One caption per image through the batcher; cancelled if the client leaves (its
        images are then dropped, or stopped mid-generate)."""
        return await _unless_client_leaves(request, self._caption_all(images, decoding, names))

    def stream(
        self, image: Image.Image, decoding: DecodingOptions, name: str,
        resources: contextlib.ExitStack,
    ) -> Streamed:  # fmt: skip
        """The image queued for a streamed caption (503 at once when the queue is full); the
        request's `resources` (its memory) are the stream's to release."""
        try:
            stream = self.batcher.submit_stream(image, decoding)
        except QueueFullError as err:  # nothing was queued
            raise self._busy(err) from None
        return Streamed(stream, name, resources.pop_all())

    async def _caption_all(
        self, images: list[Image.Image], decoding: DecodingOptions, names: Sequence[str]
    ) -> list[Caption]:
        try:
            results = await self.batcher.submit_many(images, decoding)
        except QueueFullError as err:
            raise self._busy(err) from None
        for name, result in zip(names, results, strict=True):
            if isinstance(result, BaseException):
                raise captioning_error(name, result)
        return results

    def _busy(self, err: QueueFullError) -> HTTPError:
        return HTTPError(
            503, f"server busy: {err}; retry later", retry_after=self.batcher.retry_after_s()
        )


def captioning_error(name: str, err: BaseException) -> HTTPError:
    """What a failed caption answers: the model refused the input (422) or a bug (500)."""
    if isinstance(err, CaptionerError):
        return HTTPError(422, f"{name}: {err}")
    return HTTPError(500, f"{name}: captioning failed ({type(err).__name__})")


def build_batcher(captioner: CaptionsImages | None, settings: ServerSettings) -> Batcher:
    """The batcher over `captioner.caption`: with `details` (token counts and finish reasons)
    when it can say them, and with a streaming listener when it streams (`caption_stream`)."""
    caption = getattr(captioner, "caption", None)  # None: `captioner serve` checking settings
    details = caption is not None and "details" in inspect.signature(caption).parameters
    extra: dict[str, Any] = {"details": True} if details else {}
    streams = hasattr(captioner, "caption_stream")

    def caption_batch(images: list[Any], decoding: DecodingOptions, listener: Any) -> list[Any]:
        more = {"listener": listener} if streams else {}
        return captioner.caption(images, decoding, batch_size=len(images), **extra, **more)

    return Batcher(
        caption_batch,
        max_batch_size=settings.max_batch_size,
        max_wait_ms=settings.max_wait_ms,
        max_queue=settings.max_queue,
    )


def check_key(request: Request, api_key: str | None) -> None:
    """401 unless the request carries `api_key` (when one is set)."""
    if api_key is None:
        return
    given = (request.headers.get("x-api-key") or "").strip()
    auth = request.headers.get("authorization", "")
    if not given and auth.lower().startswith("bearer "):
        given = auth[7:].strip()
    if not given:  # an empty key is no key
        raise HTTPError(401, "missing API key (send header X-API-Key or Authorization: Bearer)")
    if not hmac.compare_digest(given.encode(), api_key.encode()):
        raise HTTPError(401, "wrong API key")


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


def _open_upload(upload: Upload, max_pixels: int) -> Any:
    return open_checked({"bytes": upload.data, "path": upload.name}, max_pixels=max_pixels)


def _rejecting(name: str, fn: Callable[..., Any], *args: Any) -> Any:
    """`fn(*args)`, its image errors turned into the answer for `name`."""
    try:
        return fn(*args)
    except NotAnImageError:
        kinds = ", ".join(ALLOWED_FORMATS)
        raise HTTPError(415, f"{name}: not an image, or not a supported format ({kinds})") from None
    except BadImageError as err:
        raise HTTPError(422, f"{name}: {err.reason}") from None
    except HTTPError:
        raise
    except Exception as err:  # a decoder bug on hostile input is still this file's problem
        raise HTTPError(422, f"{name}: cannot decode image ({type(err).__name__})") from None


async def _unless_client_leaves(request: Request, work: Any) -> Any:
    """Await `work`, cancelling it if the client disconnects first: nobody is waiting."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return task.result()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        raise HTTPError(499, "client disconnected")
    finally:
        for pending in (task, watcher):
            pending.cancel()


async def _disconnected(request: Request) -> None:
    """Returns when the client has gone (the body has been read: only a disconnect comes)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


class Streamed:
    """A `Stream` as ("text", piece) events while it is generated, then ("done", caption) or
    ("error", HTTPError). However the response ends (the client may leave mid-way, even before
    the first event), `close` takes the image out of the batcher and gives the request's memory
    back: the response calls it, and so does the end of iterating."""

    def __init__(self, stream: Stream, name: str, resources: contextlib.ExitStack) -> None:
        self.stream, self.name, self.resources = stream, name, resources

    async def __aiter__(self) -> AsyncIterator[tuple[str, Any]]:
        try:
            async for text in self.stream:
                yield "text", text
            yield "done", self.stream.caption
        except Exception as err:  # noqa: BLE001 - the status line has gone: the stream says it
            yield "error", captioning_error(self.name, err)
        finally:
            self.close()

    def close(self) -> None:
        if self.stream.caption is None:
            self.stream.cancel()
        self.resources.close()


class _EventStream(StreamingResponse):
    def __init__(self, body: AsyncIterator[bytes], source: Streamed) -> None:
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # no proxy buffering
        super().__init__(body, media_type="text/event-stream", headers=headers)
        self.source = source

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:  # a body never started never runs its own cleanup
            self.source.close()


def sse_response(body: AsyncIterator[bytes], source: Streamed | None = None) -> StreamingResponse:
    """Server-sent events; `source`, when they come from the batcher, is closed at the end."""
    if source is not None:
        return _EventStream(body, source)
    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(body, media_type="text/event-stream", headers=headers)


def sse(data: Any) -> bytes:
    return b"data: " + json.dumps(data).encode() + b"\n\n"
