"""fetch.py: the URL policy the CLI and the server share (schemes, addresses, redirects, the
deadline and the byte limit), against real HTTP servers on loopback."""

from __future__ import annotations

import asyncio
import http.server
import threading
import time

import pytest

from captioner.data import fetch
from captioner.data.fetch import RefusedError, TooLargeError, UrlPolicy
from captioner.errors import BadImageError

BODY = b"x" * 1000


class Handler(http.server.BaseHTTPRequestHandler):
    """/ok: BODY; /redirect?<url>: 302 there; /slow: one byte every 0.5 s; /big: 50 KB."""

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        if self.path.startswith("/redirect?"):
            self.send_response(302)
            self.send_header("Location", self.path.split("?", 1)[1])
            self.end_headers()
        elif self.path == "/slow":
            self.send_response(200)
            self.send_header("Content-Length", "100")
            self.end_headers()
            for _ in range(100):
                try:
                    self.wfile.write(b"x")
                    self.wfile.flush()
                except OSError:
                    return
                time.sleep(0.5)
        elif self.path in ("/ok", "/big"):
            body = BODY if self.path == "/ok" else b"y" * 50_000
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        else:
            self.send_error(404)

    def log_message(self, *args) -> None:
        pass


def serve_on(host: str):
    server = http.server.ThreadingHTTPServer((host, 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://{host}:{server.server_address[1]}"


@pytest.fixture(scope="module")
def loopback():
    server, base = serve_on("127.0.0.1")
    yield base
    server.shutdown()


@pytest.fixture
def public_and_private(monkeypatch):
    """127.0.0.2 plays a public host (the policy lets it through); 127.0.0.1 stays private."""
    public, public_base = serve_on("127.0.0.2")
    private, private_base = serve_on("127.0.0.1")
    monkeypatch.setattr(fetch, "address_allowed", lambda address: address == "127.0.0.2")
    yield public_base, private_base
    public.shutdown()
    private.shutdown()


def both(url: str, **kwargs) -> list:
    kwargs.setdefault("policy", UrlPolicy())  # the server's rules: public addresses only
    """The blocking and the async fetch of `url`: each result, or the exception it raised."""
    out = []
    for call in (
        lambda: fetch.fetch(url, **kwargs),
        lambda: asyncio.run(fetch.fetch_async(url, **kwargs)),
    ):
        try:
            out.append(call())
        except BadImageError as err:
            out.append(err)
    return out


@pytest.mark.parametrize(
    "host",
    [
        "127.0.0.1",
        "localhost",
        "2130706433",  # 127.0.0.1 as one decimal number
        "0x7f.1",  # hex and short forms
        "127.1",
        "0",  # 0.0.0.0
        "[::1]",
        "[::ffff:127.0.0.1]",  # IPv4-mapped IPv6
        "10.1.2.3",
        "192.168.0.1",
        "172.16.0.1",
        "169.254.169.254",  # the cloud metadata address
        "100.64.0.1",  # shared address space
        "224.0.0.1",  # multicast
        "240.0.0.1",  # reserved
        "[fe80::1]",  # link-local
        "[fc00::1]",  # unique local
        "[64:ff9b::7f00:1]",  # NAT64 of 127.0.0.1
        "[2002:7f00:1::]",  # 6to4 of 127.0.0.1
    ],
)
def test_non_public_addresses_are_refused_in_every_spelling(host, loopback):
    port = loopback.rsplit(":", 1)[1]
    for result in both(f"http://{host}:{port}/ok"):
        assert isinstance(result, RefusedError), (host, result)
        assert "not public" in result.reason


def test_the_cli_may_read_its_own_network_with_the_same_other_rules(loopback):
    """`fetch` without a policy (the engine, for `captioner caption`) allows private addresses;
    schemes, the deadline and the byte limit are the same."""
    assert fetch.fetch(loopback + "/ok") == BODY
    with pytest.raises(RefusedError):
        fetch.fetch("file:///etc/passwd")
    with pytest.raises(TooLargeError):
        fetch.fetch(loopback + "/big", max_bytes=10_000)


def test_public_addresses_are_allowed():
    for address in ("8.8.8.8", "1.1.1.1", "2606:4700:4700::1111", "::ffff:8.8.8.8"):
        assert fetch.address_allowed(address), address


@pytest.mark.parametrize(
    "url,reason",
    [
        ("ftp://example.com/a.png", "only http:// and https://"),
        ("file:///etc/passwd", "only http:// and https://"),
        ("gopher://127.0.0.1:70/", "only http:// and https://"),
        ("http://[::1", "not a valid URL"),
        ("http:///a.png", "not a valid URL"),
        ("http://example.com/" + "a" * 9000, "longer than"),
    ],
)
def test_bad_urls_are_refused_before_any_connection(url, reason):
    for result in both(url):
        assert isinstance(result, BadImageError) and reason in result.reason, result


def test_allowed_host_is_fetched_and_redirect_to_a_private_address_is_refused(public_and_private):
    public, private = public_and_private
    assert both(public + "/ok") == [BODY, BODY]
    # a redirect to another allowed URL is followed; every hop is checked again
    assert both(f"{public}/redirect?{public}/ok") == [BODY, BODY]
    for target in (f"{private}/ok", "http://localhost/ok", "http://2130706433/ok"):
        for result in both(f"{public}/redirect?{target}"):
            assert isinstance(result, RefusedError) and "not public" in result.reason, result
    for result in both(f"{public}/redirect?file:///etc/passwd"):
        assert isinstance(result, RefusedError), result


def test_redirect_loops_end(public_and_private):
    public, _ = public_and_private
    url = f"{public}/ok"
    for _ in range(7):
        url = f"{public}/redirect?{url}"
    for result in both(url):
        assert isinstance(result, RefusedError) and "redirects" in result.reason, result


def test_one_deadline_for_the_whole_download(loopback):
    """A server that trickles a byte every 0.5 s is cut off at the deadline, not held open."""
    policy = UrlPolicy(timeout_s=1.5, allow_private=True)
    start = time.monotonic()
    for result in both(loopback + "/slow", policy=policy):
        assert isinstance(result, BadImageError) and "timed out" in result.reason, result
    assert time.monotonic() - start < 6  # two downloads, 1.5 s each, plus slack


def test_byte_limit_and_status_codes(loopback):
    policy = UrlPolicy(max_bytes=10_000, allow_private=True)
    for result in both(loopback + "/big", policy=policy):
        assert isinstance(result, TooLargeError), result
    for result in both(loopback + "/missing", policy=policy):
        assert isinstance(result, BadImageError) and "HTTP 404" in result.reason, result
    assert both(loopback + "/ok", policy=policy) == [BODY, BODY]
