"""What a client can hold of the server before any route runs: the Host check, the body's size
and time limits (`RequestGuard`, ASGI middleware), and the connection limits uvicorn runs with
(`uvicorn_options`, with a protocol class that times out slow request heads).

`allowed_hosts` checks the Host header: DNS rebinding reaches even a 127.0.0.1 bind.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from captioner.serve.errors import ErrorShapes
from captioner.serve.settings import ServerSettings

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]")


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


class RequestGuard:
    """ASGI middleware in front of every route: the Host header against `allowed_hosts` (400);
    bodies over `max_body_bytes`, by Content-Length or while streaming (413, before the form
    parser spools them to disk); bodies that stall or take too long (408). Its answers are
    JSON like every other error."""

    class _Stop(Exception):
        def __init__(self, status: int, detail: str) -> None:
            self.status, self.detail = status, detail

    def __init__(
        self, app: Any, settings: ServerSettings, shapes: ErrorShapes | None = None
    ) -> None:
        self.app = app
        self.settings = settings
        self.shapes = shapes or ErrorShapes()
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
        body = json.dumps(self.shapes.body(scope.get("path", ""), status, detail)).encode()
        headers = [(b"content-type", b"application/json"), (b"connection", b"close")]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def host_name(host: str) -> str:
    """`Host` header -> name without the port, lower case (`[::1]:8000` -> `[::1]`)."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[: host.find("]") + 1] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host
