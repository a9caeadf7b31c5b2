"""Fetching images named by URL: the one home of the URL rules, the time limit and the byte limit.

`fetch` (blocking: the captioning engine's loader workers) and `fetch_async` (the server's event
loop, which must never block) share `check_url`, the limits and the streaming loop's rules, so a
URL is accepted, refused or cut off the same way wherever it comes from. `data:` URLs are decoded
by `decode_data_url`, with the same byte limit.

Failures are `BadImageError(url, reason)`; a body over the byte limit is `TooLargeError`, so the
server can answer 413 instead of 422.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any

import httpx

from captioner.errors import BadImageError

FETCH_TIMEOUT_S = 10.0  # the whole download, connect to last byte
FETCH_MAX_BYTES = 20 * 1024 * 1024
MAX_URL_LENGTH = 8192
SCHEMES = ("http://", "https://")


class TooLargeError(BadImageError):
    """The image behind a URL is larger than the byte limit."""


def is_url(src: Any) -> bool:
    """An http(s) URL (data: URLs are handled by the server, which receives them)."""
    return isinstance(src, str) and src.lower().startswith(SCHEMES)


def short(text: str, n: int = 80) -> str:
    """A URL cut to a printable length for error messages."""
    return text if len(text) <= n else text[: n - 3] + "..."


def check_url(url: str) -> None:
    """http(s) only, and a sane length: anything else is refused before a connection opens."""
    if len(url) > MAX_URL_LENGTH:
        raise BadImageError(short(url), f"URL longer than {MAX_URL_LENGTH} characters")
    if not is_url(url):
        raise BadImageError(short(url), "only http:// and https:// URLs are fetched")
    try:
        httpx.URL(url)
    except (httpx.InvalidURL, ValueError):
        raise BadImageError(short(url), "not a valid URL") from None


def fetch(url: str, *, timeout: float | None = None, max_bytes: int | None = None) -> bytes:
    """Download `url` (blocking). Limits default to the module's (read at call time)."""
    check_url(url)
    body = _Body(url, max_bytes)
    try:
        with httpx.Client(**_client_options(timeout)) as client:
            with client.stream("GET", url) as response:
                body.start(response)
                for chunk in response.iter_bytes():
                    body.add(chunk)
    except httpx.HTTPError as err:
        raise body.failed(err) from None
    return bytes(body.data)


async def fetch_async(
    url: str, *, timeout: float | None = None, max_bytes: int | None = None
) -> bytes:
    """Download `url` without blocking the event loop."""
    check_url(url)
    body = _Body(url, max_bytes)
    try:
        async with httpx.AsyncClient(**_client_options(timeout)) as client:
            async with client.stream("GET", url) as response:
                body.start(response)
                async for chunk in response.aiter_bytes():
                    body.add(chunk)
    except httpx.HTTPError as err:
        raise body.failed(err) from None
    return bytes(body.data)


def decode_data_url(url: str, max_bytes: int | None = None) -> bytes:
    """The bytes of a base64 `data:` URL, within the same byte limit as a download."""
    max_bytes = FETCH_MAX_BYTES if max_bytes is None else max_bytes
    header, sep, payload = url.partition(",")
    if not header.startswith("data:") or not sep or not header.endswith(";base64"):
        raise BadImageError("data: URL", "must be base64 (data:image/png;base64,...)")
    if len(payload) * 3 // 4 > max_bytes + 3:
        raise TooLargeError("data: URL", f"image larger than the {max_bytes:,} byte limit")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise BadImageError("data: URL", "not valid base64") from None


def _client_options(timeout: float | None) -> dict[str, Any]:
    return {
        "timeout": httpx.Timeout(FETCH_TIMEOUT_S if timeout is None else timeout),
        "follow_redirects": True,
        "headers": {"User-Agent": "captioner"},
    }


class _Body:
    """The rules of one download, shared by the blocking and the async loop."""

    def __init__(self, url: str, max_bytes: int | None) -> None:
        self.url, self.data = url, bytearray()
        self.max_bytes = FETCH_MAX_BYTES if max_bytes is None else max_bytes

    def start(self, response: httpx.Response) -> None:
        if response.status_code != 200:
            raise BadImageError(short(self.url), f"download failed (HTTP {response.status_code})")

    def add(self, chunk: bytes) -> None:
        self.data += chunk
        if len(self.data) > self.max_bytes:
            raise TooLargeError(short(self.url), f"larger than the {self.max_bytes:,} byte limit")

    def failed(self, err: httpx.HTTPError) -> BadImageError:
        if isinstance(err, httpx.TimeoutException):
            return BadImageError(short(self.url), "download timed out")
        return BadImageError(short(self.url), f"download failed ({type(err).__name__})")
