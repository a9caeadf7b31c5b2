"""Fetching images named by URL: the one home of the URL policy, shared by the CLI and the server.

`fetch` (blocking: the captioning engine's loader workers) and `fetch_async` (the server's event
loop, which must never block) apply the same `UrlPolicy`:

- `http://` and `https://` only, at most `MAX_URL_LENGTH` characters;
- the host is resolved once, and every address it resolves to must be public: loopback,
  private, link-local, shared, multicast, reserved and unspecified addresses are refused, IPv4
  and IPv6 alike (an IPv4 address embedded in IPv6 is judged as IPv4), whatever the spelling
  (`2130706433`, `0x7f.1`, `127.1` and `localhost` all resolve to 127.0.0.1);
- the connection goes to the address that was checked (the URL's name is kept for the Host
  header and TLS), so a DNS answer that changes between check and connect changes nothing;
- redirects are followed by hand, and every hop is checked the same way;
- one deadline for the whole download (every hop, connect to last byte) and a byte limit, so a
  server that sends a byte every few seconds cannot hold a request open.

The address rule is the policy's `allow_private`. The server always refuses non-public
addresses (its URLs come from whoever can reach it). A `fetch` without a policy, which is how
`captioner caption` downloads the URLs its user typed, allows them (`CLI_ALLOWS_PRIVATE`): a
user's own network is theirs to read from, and everything else above applies.

Failures are `BadImageError(url, reason)` with a precise reason, for the CLI user who typed the
URL. A server must not relay those reasons to its callers (they would map its network:
which ports are closed, which hosts answer 404): it answers every failure with `GENERIC_ERROR`.
A body over the byte limit is `TooLargeError`; a URL the policy refuses is `RefusedError`.
`data:` URLs are decoded by `decode_data_url`, with the same byte limit. URL schemes are
case-insensitive (RFC 3986): `DATA:` and `HTTPS://` are what `data:` and `https://` are.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import ipaddress
import socket
import time
from dataclasses import dataclass
from typing import Any

import httpx

from captioner.errors import BadImageError

FETCH_TIMEOUT_S = 10.0  # the whole download: every redirect hop, connect to last byte
FETCH_MAX_BYTES = 20 * 1024 * 1024
MAX_URL_LENGTH = 8192
MAX_REDIRECTS = 5
SCHEMES = ("http://", "https://")
REDIRECT_CODES = (301, 302, 303, 307, 308)
# `fetch` without a policy: the person at the command line may read their own network.
CLI_ALLOWS_PRIVATE = True
GENERIC_ERROR = "the URL could not be fetched (refused, unreachable, too large, or failed)"
# IPv6 prefixes that carry an IPv4 address in their last 32 bits (NAT64)
_NAT64 = (ipaddress.IPv6Network("64:ff9b::/96"), ipaddress.IPv6Network("64:ff9b:1::/48"))


class TooLargeError(BadImageError):
    """The image behind a URL is larger than the byte limit."""


class RefusedError(BadImageError):
    """The URL policy refuses this URL (scheme, length, or an address that is not public)."""


@dataclass(frozen=True)
class UrlPolicy:
    """What may be fetched, and for how long. `allow_private` lifts the address rule (for a
    trusted network, or a test server on 127.0.0.1); nothing in captioner turns it on."""

    timeout_s: float = FETCH_TIMEOUT_S
    max_bytes: int = FETCH_MAX_BYTES
    max_redirects: int = MAX_REDIRECTS
    allow_private: bool = False


def is_url(src: Any) -> bool:
    """An http(s) URL (data: URLs are handled by the server, which receives them)."""
    return isinstance(src, str) and src.lower().startswith(SCHEMES)


def is_data_url(src: Any) -> bool:
    """A `data:` URL, in any letter case."""
    return isinstance(src, str) and src[:5].lower() == "data:"


def short(text: str, n: int = 80) -> str:
    """A URL cut to a printable length for error messages."""
    return text if len(text) <= n else text[: n - 3] + "..."


def check_url(url: str) -> httpx.URL:
    """http(s) only, a sane length, and a host: anything else is refused before any lookup."""
    if len(url) > MAX_URL_LENGTH:
        raise RefusedError(short(url), f"URL longer than {MAX_URL_LENGTH} characters")
    if not is_url(url):
        raise RefusedError(short(url), "only http:// and https:// URLs are fetched")
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, ValueError, UnicodeError):
        raise BadImageError(short(url), "not a valid URL") from None
    if not parsed.raw_host:
        raise BadImageError(short(url), "not a valid URL (no host)")
    return parsed


def address_allowed(address: str) -> bool:
    """True for a public unicast address; IPv4 embedded in IPv6 is judged as the IPv4 address."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = ip.ipv4_mapped or ip.sixtofour
        if embedded is None and any(ip in net for net in _NAT64):
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if embedded is not None:
            return address_allowed(str(embedded))
    return ip.is_global and not (
        ip.is_multicast
        or ip.is_loopback
        or ip.is_link_local
        or ip.is_private
        or ip.is_reserved
        or ip.is_unspecified
    )


def fetch(
    url: str,
    *,
    timeout: float | None = None,
    max_bytes: int | None = None,
    policy: UrlPolicy | None = None,
) -> bytes:
    """Download `url` (blocking) under `policy` (default: the module's limits, read at call time,
    and `CLI_ALLOWS_PRIVATE`); `timeout` and `max_bytes` override the policy's."""
    policy = _policy(policy, timeout, max_bytes)
    target = check_url(url)
    body = _Body(url, policy)
    try:
        with httpx.Client(**_client_options()) as client:
            for _ in range(policy.max_redirects + 1):
                body.remaining()
                address = _check_addresses(target, _resolve(target), policy)
                request = _pinned_request(client, target, address, body.remaining())
                response = client.send(request, stream=True)
                try:
                    next_url = body.start(target, response)
                    if next_url is None:
                        for chunk in response.iter_bytes():
                            body.add(chunk)
                        return bytes(body.data)
                finally:
                    response.close()
                target = next_url
    except httpx.HTTPError as err:
        raise body.failed(err) from None
    except OSError as err:  # name resolution
        raise body.unresolved(err) from None
    raise RefusedError(short(url), f"more than {policy.max_redirects} redirects")


async def fetch_async(
    url: str,
    *,
    timeout: float | None = None,
    max_bytes: int | None = None,
    policy: UrlPolicy | None = None,
) -> bytes:
    """Download `url` without blocking the event loop; the same rules as `fetch`."""
    policy = _policy(policy, timeout, max_bytes)
    check_url(url)
    try:
        # the hard bound: whatever a hop does, the whole download ends at the deadline
        return await asyncio.wait_for(_fetch_async(url, policy), policy.timeout_s)
    except asyncio.TimeoutError:
        raise BadImageError(short(url), "download timed out") from None


async def _fetch_async(url: str, policy: UrlPolicy) -> bytes:
    target = check_url(url)
    body = _Body(url, policy)
    loop = asyncio.get_running_loop()
    try:
        async with httpx.AsyncClient(**_client_options()) as client:
            for _ in range(policy.max_redirects + 1):
                port = target.port or (443 if target.scheme == "https" else 80)
                infos = await loop.getaddrinfo(
                    target.raw_host.decode("ascii"), port, type=socket.SOCK_STREAM
                )
                address = _check_addresses(target, [i[4][0] for i in infos], policy)
                request = _pinned_request(client, target, address, body.remaining())
                response = await client.send(request, stream=True)
                try:
                    next_url = body.start(target, response)
                    if next_url is None:
                        async for chunk in response.aiter_bytes():
                            body.add(chunk)
                        return bytes(body.data)
                finally:
                    await response.aclose()
                target = next_url
    except httpx.HTTPError as err:
        raise body.failed(err) from None
    except OSError as err:
        raise body.unresolved(err) from None
    raise RefusedError(short(url), f"more than {policy.max_redirects} redirects")


def decode_data_url(url: str, max_bytes: int | None = None) -> bytes:
    """The bytes of a base64 `data:` URL, within the same byte limit as a download."""
    max_bytes = FETCH_MAX_BYTES if max_bytes is None else max_bytes
    header, sep, payload = url.partition(",")
    header = header.lower()  # the scheme and the base64 token are case-insensitive
    if not header.startswith("data:") or not sep or not header.endswith(";base64"):
        raise BadImageError("data: URL", "must be base64 (data:image/png;base64,...)")
    if len(payload) * 3 // 4 > max_bytes + 3:
        raise TooLargeError("data: URL", f"image larger than the {max_bytes:,} byte limit")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise BadImageError("data: URL", "not valid base64") from None


# ---- the steps ----


def _policy(policy: UrlPolicy | None, timeout: float | None, max_bytes: int | None) -> UrlPolicy:
    policy = policy or UrlPolicy(
        timeout_s=FETCH_TIMEOUT_S, max_bytes=FETCH_MAX_BYTES, allow_private=CLI_ALLOWS_PRIVATE
    )
    if timeout is not None or max_bytes is not None:
        policy = UrlPolicy(
            timeout_s=policy.timeout_s if timeout is None else timeout,
            max_bytes=policy.max_bytes if max_bytes is None else max_bytes,
            max_redirects=policy.max_redirects,
            allow_private=policy.allow_private,
        )
    return policy


def _client_options() -> dict[str, Any]:
    # trust_env=False: a proxy from the environment would connect by name, around the address
    # check; redirects are followed by hand so that every hop is checked.
    return {
        "follow_redirects": False,
        "trust_env": False,
        "headers": {"User-Agent": "captioner"},
    }


def _resolve(target: httpx.URL) -> list[str]:
    port = target.port or (443 if target.scheme == "https" else 80)
    host = target.raw_host.decode("ascii")
    # getaddrinfo has no timeout of its own (the resolver's is short); the deadline is checked
    # again before connecting
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [info[4][0] for info in infos]


def _check_addresses(target: httpx.URL, addresses: list[str], policy: UrlPolicy) -> str:
    """The address to connect to; RefusedError unless every address of the host is allowed (a
    name that resolves to one public and one private address is refused)."""
    name = short(str(target))
    if not addresses:
        raise BadImageError(name, "host name did not resolve")
    if not policy.allow_private:
        for address in addresses:
            if not address_allowed(address):
                raise RefusedError(name, f"refused: the host resolves to {address}, not public")
    return addresses[0]


def _pinned_request(client: Any, target: httpx.URL, address: str, timeout: float) -> Any:
    """GET `target` from `address`: the URL's host stays in the Host header and in TLS (SNI and
    certificate check), the connection goes to the address that was checked."""
    host = target.raw_host.decode("ascii")
    default_port = 443 if target.scheme == "https" else 80
    host_header = host if ":" not in host else f"[{host}]"
    if target.port is not None and target.port != default_port:
        host_header += f":{target.port}"
    return client.build_request(
        "GET",
        target.copy_with(host=address),
        headers={"Host": host_header},
        extensions={"sni_hostname": host},
        timeout=httpx.Timeout(max(timeout, 0.001)),
    )


class _Body:
    """The rules of one download (status, redirects, deadline, byte limit), shared by the
    blocking and the async loop."""

    def __init__(self, url: str, policy: UrlPolicy) -> None:
        self.url, self.data = url, bytearray()
        self.max_bytes = policy.max_bytes
        self.deadline = time.monotonic() + policy.timeout_s

    def remaining(self) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise BadImageError(short(self.url), "download timed out")
        return left

    def start(self, target: httpx.URL, response: httpx.Response) -> httpx.URL | None:
        """None to read this response's body; the next hop's URL for a redirect."""
        location = response.headers.get("location")
        if response.status_code in REDIRECT_CODES and location:
            try:
                return check_url(str(target.join(location)))
            except (httpx.InvalidURL, ValueError):
                raise BadImageError(short(self.url), "redirect to an invalid URL") from None
        if response.status_code != 200:
            raise BadImageError(short(self.url), f"download failed (HTTP {response.status_code})")
        length = response.headers.get("content-length", "")
        if length.isdigit() and int(length) > self.max_bytes:
            raise TooLargeError(short(self.url), f"larger than the {self.max_bytes:,} byte limit")
        return None

    def add(self, chunk: bytes) -> None:
        self.data += chunk
        if len(self.data) > self.max_bytes:
            raise TooLargeError(short(self.url), f"larger than the {self.max_bytes:,} byte limit")
        self.remaining()  # a slow trickle ends at the deadline, not at the next read timeout

    def failed(self, err: httpx.HTTPError) -> BadImageError:
        if isinstance(err, httpx.TimeoutException):
            return BadImageError(short(self.url), "download timed out")
        return BadImageError(short(self.url), f"download failed ({type(err).__name__})")

    def unresolved(self, err: OSError) -> BadImageError:
        if isinstance(err, socket.gaierror):
            return BadImageError(short(self.url), "host name did not resolve")
        return BadImageError(short(self.url), f"download failed ({type(err).__name__})")
