"""The one body reader and the one JSON policy, for every route that takes a body.

A body is read up to a byte limit (413 beyond), each chunk reserved in the request's share of
the memory budget as it arrives, twice: once as bytes, once as the text a parser makes of them.
A JSON body is then parsed in a worker thread (the event loop, and /health, never wait for a
parser), after its structure is counted: more brackets, commas and colons than the route
allows is 413 unparsed, and what parsing will hold beyond the text (`PARSED_BYTES_PER_ELEMENT`
per element: a 13 MB `[{},{},...]` body would become 300 MB of objects) is reserved first.
Bytes that are not JSON are 422 on every route (FastAPI's own status for a body it cannot parse).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from fastapi import Request
from starlette.concurrency import run_in_threadpool

from captioner.serve.errors import HTTPError

if TYPE_CHECKING:
    from captioner.serve.pipeline import Hold

T = TypeVar("T")

# Python objects per bracket, comma or colon (an empty dict is 64 bytes plus its list slot, for
# 3 bytes of `{},`).
PARSED_BYTES_PER_ELEMENT = 80


async def read(request: Request, limit: int, hold: Hold, hint: str = "") -> bytes:
    """The raw body, up to `limit` bytes (413 beyond, `hint` says what to do instead)."""
    raw = bytearray()
    async for chunk in request.stream():
        if len(raw) + len(chunk) > limit:
            raise HTTPError(413, f"request body larger than {limit:,} bytes{hint}")
        hold.take(2 * len(chunk), "request", "its body")
        raw += chunk
    return bytes(raw)


async def read_json(
    request: Request,
    hold: Hold,
    limit: int,
    max_elements: int,
    parse: Callable[[bytes], T],
    hint: str = "",
) -> T:
    """`parse(body)` in a worker thread, under the policy above (`loads` is the plain parse)."""
    raw = await read(request, limit, hold, hint)
    return await run_in_threadpool(_parse_held, raw, hold, max_elements, parse)


def _parse_held(raw: bytes, hold: Hold, max_elements: int, parse: Callable[[bytes], T]) -> T:
    elements = sum(raw.count(c) for c in (b"{", b"[", b",", b":"))
    if elements > max_elements:
        raise HTTPError(
            413,
            f"JSON body with {elements:,} brackets, commas and colons: at most {max_elements:,} "
            "beside the image",
        )
    hold.take(len(raw) + PARSED_BYTES_PER_ELEMENT * elements, "request", "parsing its JSON")
    return parse(raw)


def loads(raw: bytes) -> Any:
    """JSON bytes -> the value, or 422 (not JSON, not UTF-8, nested too deeply, a number with
    more digits than Python converts)."""
    try:
        return json.loads(raw)
    except RecursionError:
        raise HTTPError(
            422, "malformed JSON body: nested too deeply", code="invalid_json"
        ) from None
    except ValueError as err:  # JSONDecodeError and UnicodeDecodeError too
        raise HTTPError(422, f"malformed JSON body: {err}", code="invalid_json") from None
