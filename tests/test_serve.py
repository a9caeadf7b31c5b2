"""`captioner serve`: API status codes, dynamic batching, a real server under mixed load, and the
page driven in headless chromium.

Fast tests use a stand-in captioner whose caption is derived from the image (so a mixed-up
batch shows), the slow ones the real tiny GIT behind `captioner serve` in a subprocess.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import functools
import http.server
import io
import json
import os
import re
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
import httpx  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402
from PIL import Image  # noqa: E402

from captioner import cli
from captioner.data import fetch  # noqa: E402
from captioner.data.images import DEFAULT_MAX_PIXELS  # noqa: E402
from captioner.decoding import DecodingOptions  # noqa: E402
from captioner.engine import Captioner  # noqa: E402
from captioner.errors import CaptionerError  # noqa: E402
from captioner.serve import create_app  # noqa: E402
from captioner.serve.batcher import Batcher  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM = "/usr/bin/chromium"


# ---- inputs ----


def png(width: int = 40, height: int = 30, color=(200, 40, 40), fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buf, fmt)
    return buf.getvalue()


def noise_png(side: int) -> bytes:
    """Incompressible, so the file is about 3 * side**2 bytes."""
    buf = io.BytesIO()
    Image.frombytes("RGB", (side, side), os.urandom(3 * side * side)).save(buf, "PNG")
    return buf.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bomb_png(side: int, full: bool = True) -> bytes:
    """A grey PNG of side x side pixels that is a few KB on disk: a decompression bomb.

    `full=False` writes only a token IDAT (for sizes whose real data would take long to make)."""
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    if full:
        comp, row = zlib.compressobj(9), b"\x00" * (side + 1)
        idat = b"".join(comp.compress(row) for _ in range(side)) + comp.flush()
    else:
        idat = zlib.compress(b"\x00" * 1024)
    chunks = _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + chunks


class FakeCaptioner:
    """Captions an image by its size and top-left colour; records every batch it is given."""

    device = "cpu"

    def __init__(self, delay_s: float = 0.0) -> None:
        self.delay_s = delay_s
        self.calls: list[tuple[int, DecodingOptions]] = []
        self.lock = threading.Lock()

    def caption(
        self,
        images,
        decoding: DecodingOptions | None = None,
        *,
        batch_size: int | None = None,
        num_workers: int | None = None,
        progress=None,
        **overrides,
    ) -> list[str]:
        decoding = (decoding or DecodingOptions()).replace(**overrides)
        with self.lock:
            self.calls.append((len(images), decoding))
        time.sleep(self.delay_s)
        return [f"{im.size[0]}x{im.size[1]} rgb{im.getpixel((0, 0))}" for im in images]


def client_for(captioner=None, **limits) -> TestClient:
    app = create_app(captioner or FakeCaptioner(), model_name="fake", **limits)
    return TestClient(app)


# ---- 200 ----


def test_caption_one_upload_returns_caption_model_latency():
    with client_for() as client:
        r = client.post("/caption", files={"file": ("red.png", png(), "image/png")})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["caption"] == "40x30 rgb(200, 40, 40)"
    assert body["model"] == "fake"
    assert body["latency_ms"] >= 0


def test_several_files_keep_their_order_and_names():
    fake = FakeCaptioner()
    files = [
        ("files", ("a.png", png(10, 10, (255, 0, 0)), "image/png")),
        ("files", ("b.jpg", png(20, 12, (0, 0, 255), "JPEG"), "image/jpeg")),
        ("files", ("c.webp", png(8, 9, (0, 255, 0), "WEBP"), "image/webp")),
    ]
    with client_for(fake) as client:
        r = client.post("/caption", files=files, data={"num_beams": "2", "max_new_tokens": "7"})
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert [x["filename"] for x in results] == ["a.png", "b.jpg", "c.webp"]
    assert [x["caption"].split()[0] for x in results] == ["10x10", "20x12", "8x9"]
    assert all(d.num_beams == 2 and d.max_new_tokens == 7 for _, d in fake.calls)


def test_json_data_url_and_health_and_page():
    url = "data:image/png;base64," + base64.b64encode(png(16, 16)).decode()
    with client_for() as client:
        r = client.post("/caption", json={"url": url, "num_beams": 1})
        health = client.get("/health").json()
        page = client.get("/")
        docs = client.get("/openapi.json").json()
    assert r.status_code == 200 and r.json()["caption"].startswith("16x16"), r.text
    assert health["status"] == "ok" and health["model"] == "fake" and health["device"] == "cpu"
    assert page.status_code == 200 and 'id="file"' in page.text
    assert "http://" not in page.text and "https://" not in page.text  # no CDN, nothing remote
    assert "/caption" in docs["paths"] and "multipart/form-data" in json.dumps(docs)


def test_json_http_url_is_downloaded_only_when_allowed(tmp_path, monkeypatch):
    (tmp_path / "a.png").write_bytes(png(24, 20))
    (tmp_path / "big.png").write_bytes(noise_png(100))  # ~30 KB
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    files = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=files.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{files.server_address[1]}"
    try:
        with client_for() as client:  # the default: no URL is fetched
            off = client.post("/caption", json={"url": base + "/a.png"})
            health = client.get("/health").json()
        # this test's file server is on loopback, which the URL policy refuses: let it through
        monkeypatch.setattr(fetch, "address_allowed", lambda address: True)
        with client_for(max_upload_bytes=20_000, allow_url_fetch=True) as client:
            ok = client.post("/caption", json={"url": base + "/a.png"})
            missing = client.post("/caption", json={"url": base + "/nope.png"})
            big = client.post("/caption", json={"url": base + "/big.png"})
    finally:
        files.shutdown()
    assert off.status_code == 403 and "does not fetch URLs" in off.json()["detail"], off.text
    assert health["url_fetch"] is False
    assert ok.status_code == 200 and ok.json()["caption"].startswith("24x20"), ok.text
    # every failure gets one answer: a caller must not learn status codes or closed ports
    generic = {missing.json()["detail"].split(": ", 1)[1], big.json()["detail"].split(": ", 1)[1]}
    assert missing.status_code == big.status_code == 422 and generic == {fetch.GENERIC_ERROR}


def test_decoding_options_reach_the_captioner_as_one_decoding_options():
    fake = FakeCaptioner()
    url = "data:image/png;base64," + base64.b64encode(png(16, 16)).decode()
    form = {"do_sample": "true", "top_p": "0.5", "bad_words": ["red", "blue,green"]}
    with client_for(fake) as client:
        r1 = client.post("/caption", files={"file": ("a.png", png(), "image/png")}, data=form)
        r2 = client.post("/caption", json={"url": url, "num_beams": 3, "prompt": "a photo of"})
    assert r1.status_code == 200 and r2.status_code == 200, (r1.text, r2.text)
    (_, sampled), (_, beams) = fake.calls
    assert sampled == DecodingOptions(do_sample=True, top_p=0.5, bad_words=["red", "blue,green"])
    assert sampled.bad_words == ["red", "blue", "green"]
    assert beams == DecodingOptions(num_beams=3, prompt="a photo of")


def test_openapi_request_schema_is_derived_from_decoding_options():
    with client_for() as client:
        docs = client.get("/openapi.json").json()
    content = docs["paths"]["/caption"]["post"]["requestBody"]["content"]
    form = content["multipart/form-data"]["schema"]["properties"]
    body = content["application/json"]["schema"]
    assert body["required"] == ["url"]
    for name in dataclasses.asdict(DecodingOptions()):
        assert name in form and name in body["properties"], name
    assert form["num_beams"]["minimum"] == 1 and form["num_beams"]["description"]
    assert "file" in form and "files" in form


# ---- 401 ----


def test_api_key_is_required_on_caption_only():
    with client_for(api_key="s3cret") as client:
        files = {"file": ("a.png", png(), "image/png")}
        assert client.post("/caption", files=files).status_code == 401
        wrong = client.post("/caption", files=files, headers={"X-API-Key": "nope"})
        assert wrong.status_code == 401 and "wrong API key" in wrong.json()["detail"]
        assert client.post("/caption", files=files, headers={"X-API-Key": "s3cret"}).is_success
        bearer = {"Authorization": "Bearer s3cret"}
        assert client.post("/caption", files=files, headers=bearer).is_success
        assert client.get("/health").json()["auth"] is True  # health and page stay open
        assert client.get("/").status_code == 200


# ---- 413 ----


def test_upload_over_byte_limit_is_413():
    with client_for(max_upload_bytes=20_000, max_files=2) as client:
        big = noise_png(100)  # ~30 KB
        r = client.post("/caption", files={"file": ("big.png", big, "image/png")})
        assert r.status_code == 413 and "big.png" in r.json()["detail"]
        # Whole body over max_files * max_upload_bytes: refused from Content-Length ...
        r = client.post("/caption", content=b"x" * 200_000, headers={"content-type": "image/png"})
        assert r.status_code == 413
        # ... and while streaming when there is no Content-Length (chunked).
        chunks = (b"x" * 10_000 for _ in range(20))
        r = client.post("/caption", content=chunks, headers={"content-type": "application/json"})
        assert r.status_code == 413 and "too large" in r.json()["detail"]
        url = "data:image/png;base64," + base64.b64encode(big).decode()
        assert client.post("/caption", json={"url": url}).status_code == 413


# ---- 415 ----


@pytest.mark.parametrize(
    "name,data",
    [("notes.txt", b"just some text"), ("empty.png", b""), ("icon.ico", png(16, 16, fmt="ICO"))],
)
def test_non_image_or_unsupported_format_is_415(name, data):
    with client_for() as client:
        r = client.post("/caption", files={"file": (name, data, "image/png")})
    assert r.status_code == 415, r.text
    assert name in r.json()["detail"]


def test_unsupported_request_type_is_415():
    with client_for() as client:
        r = client.post("/caption", content=png(), headers={"content-type": "image/png"})
    assert r.status_code == 415 and "multipart/form-data" in r.json()["detail"]


# ---- 422 ----


def test_bombs_and_too_many_pixels_are_422():
    with client_for(max_pixels=100_000) as client:
        for name, data in [
            ("bomb.png", bomb_png(2000)),  # 4 M pixels in ~4 KB
            ("huge.png", bomb_png(100_000, full=False)),  # beyond PIL's own bomb limit
            ("big.png", png(400, 300)),  # an honest image, just over this server's limit
        ]:
            r = client.post("/caption", files={"file": (name, data, "image/png")})
            assert r.status_code == 422, (name, r.text)
            assert name in r.json()["detail"] and "pixels" in r.json()["detail"]


def test_broken_image_is_422():
    data = noise_png(64)
    cut = data[: len(data) // 2]
    with client_for() as client:
        r = client.post("/caption", files={"file": ("cut.png", cut, "image/png")})
    assert r.status_code == 422 and "cut.png" in r.json()["detail"]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"data": {"num_beams": "2"}},  # no image
        {"files": {"file": ("a.png", png(), "image/png")}, "data": {"num_beams": "0"}},
        {"files": {"file": ("a.png", png(), "image/png")}, "data": {"num_beams": "many"}},
        {"files": {"file": ("a.png", png(), "image/png")}, "data": {"beams": "2"}},
        {"files": {"file": ("a.png", png(), "image/png")}, "data": {"temperature": "0.7"}},
        {"data": {"file": "not a file"}, "files": {"other": ("a.png", png(), "image/png")}},
        {"json": {"num_beams": 1}},  # no url
        {"json": {"url": 5}},
        {"json": ["data:image/png;base64,AAAA"]},
        {"json": {"url": "data:image/png;base64,AAAA", "beams": 2}},
        {"json": {"url": "data:image/png;base64,AAAA", "num_beams": "two"}},
        {"json": {"url": "file:///etc/passwd"}},
        {"json": {"url": "data:image/png;base64,@@@"}},
    ],
)
def test_malformed_requests_are_422(kwargs):
    fake = FakeCaptioner()
    with client_for(fake) as client:
        r = client.post("/caption", **kwargs)
    assert r.status_code == 422, r.text
    assert isinstance(r.json()["detail"], str) and r.json()["detail"]
    assert fake.calls == []  # rejected before reaching the model


def test_caption_stream_from_a_captioner_that_does_not_stream_sends_it_whole():
    with client_for() as client:
        r = client.post("/caption", files={"file": ("a.png", png())}, data={"stream": "true"})
        two = [("files", ("a.png", png())), ("files", ("b.png", png()))]
        several = client.post("/caption", files=two, data={"stream": "true"})
        bad = client.post("/caption", files={"file": ("a.png", png())}, data={"stream": "maybe"})
        assert client.get("/health").json()["bytes_in_flight"] == 0
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: ")]
    assert events[0] == {"text": "40x30 rgb(200, 40, 40)"}
    assert events[1]["caption"] == "40x30 rgb(200, 40, 40)" and events[1]["model"] == "fake"
    assert several.status_code == bad.status_code == 422
    assert "one image at a time" in several.json()["detail"]


def test_batcher_defaults_are_the_server_settings():
    from captioner.serve.settings import ServerSettings

    batcher, settings = Batcher(lambda images, decoding: []), ServerSettings()
    assert batcher.max_batch_size == settings.max_batch_size
    assert batcher.max_wait_s * 1000 == settings.max_wait_ms
    assert batcher.max_queue == settings.max_queue


def test_bytes_that_are_not_json_are_422_on_both_apis_alike():
    """One JSON policy: the same fault gets the same status and reason on every route."""
    headers = {"content-type": "application/json"}
    fake = FakeCaptioner()
    with client_for(fake) as client:
        own = client.post("/caption", content=b"{not json", headers=headers)
        chat = client.post("/v1/chat/completions", content=b"{not json", headers=headers)
    assert own.status_code == chat.status_code == 422, (own.text, chat.text)
    assert own.json()["detail"] == chat.json()["error"]["message"]
    assert own.json()["detail"].startswith("malformed JSON body")
    assert fake.calls == []


# ---- settings ----


@pytest.mark.parametrize(
    "setting,message",
    [
        ({"max_batch_size": 0}, "--max_batch_size must be >= 1, got 0"),
        ({"max_wait_ms": -1}, "--max_wait_ms must be >= 0, got -1"),
        ({"max_upload_bytes": 0}, "--max_upload_bytes must be >= 1, got 0"),
        ({"max_pixels": 0}, "--max_pixels must be >= 1, got 0"),
        ({"max_files": 0}, "--max_files must be >= 1, got 0"),
        ({"max_queue": 0}, "--max_queue must be >= 1, got 0"),
        ({"api_key": ""}, "--api_key must not be empty"),
        ({"api_key": "  "}, "--api_key must not be empty"),
    ],
)
def test_bad_settings_are_one_clear_error(setting, message):
    with pytest.raises(CaptionerError, match=re.escape(message)):
        create_app(FakeCaptioner(), **setting)


def test_default_pixel_limit_is_the_image_loaders():
    assert create_app(FakeCaptioner()).state.settings.max_pixels == DEFAULT_MAX_PIXELS


# ---- dynamic batching ----


def _post_concurrently(client: TestClient, n: int, options=lambda i: {}) -> list[httpx.Response]:
    def one(i: int) -> httpx.Response:
        color = (i * 5 % 256, 100, 100)
        files = {"file": (f"{i}.png", png(10 + i, 10, color), "image/png")}
        return client.post("/caption", files=files, data=options(i))

    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(one, range(n)))


def test_concurrent_requests_share_generate_calls_and_get_their_own_caption():
    fake = FakeCaptioner(delay_s=0.05)
    # a generous wait, so that even on a loaded machine several requests meet in one batch
    with client_for(fake, max_batch_size=8, max_wait_ms=300) as client:
        responses = _post_concurrently(client, 16, lambda i: {"num_beams": str(1 + i % 2)})
        stats = client.get("/health").json()
    for i, r in enumerate(responses):
        assert r.status_code == 200, r.text
        assert r.json()["caption"] == f"{10 + i}x10 rgb({i * 5 % 256}, 100, 100)"
    sizes = [n for n, _ in fake.calls]
    assert sum(sizes) == 16 and max(sizes) > 1 and len(sizes) < 16, sizes
    assert max(sizes) <= 8 and stats["largest_batch"] == max(sizes)
    # Requests with different decoding options never share a call.
    assert {d.num_beams for _, d in fake.calls} == {1, 2}


def test_max_batch_size_one_turns_batching_off():
    fake = FakeCaptioner(delay_s=0.01)
    with client_for(fake, max_batch_size=1, max_wait_ms=50) as client:
        responses = _post_concurrently(client, 6)
    assert all(r.status_code == 200 for r in responses)
    assert [n for n, _ in fake.calls] == [1] * 6


def test_batcher_retries_alone_when_a_batch_fails():
    """One input that breaks generation fails alone; its batch-mates still get captions."""

    def fn(images, options):
        if "poison" in images:
            raise ValueError("cannot caption poison")
        return [f"caption of {x}" for x in images]

    async def main():
        batcher = Batcher(fn, max_batch_size=4, max_wait_ms=50)
        await batcher.start()
        try:
            jobs = [batcher.submit(x) for x in ("a", "poison", "b", "c")]
            return await asyncio.gather(*jobs, return_exceptions=True), batcher.stats
        finally:
            await batcher.stop()

    results, stats = asyncio.run(main())
    assert results[0] == "caption of a" and results[2:] == ["caption of b", "caption of c"]
    assert isinstance(results[1], ValueError)
    assert stats.images == 3


def test_a_lone_client_does_not_wait_for_company_a_crowd_does():
    """max_wait_ms applies while traffic is concurrent: after a batch of one, the next request
    starts at once; after a batch of several, a lone request waits for company again."""
    sizes: list[int] = []

    def fn(images, options):
        sizes.append(len(images))
        return [str(x) for x in images]

    async def timed(batcher, x) -> float:
        start = time.perf_counter()
        await batcher.submit(x)
        return time.perf_counter() - start

    async def main():
        batcher = Batcher(fn, max_batch_size=8, max_wait_ms=800)
        await batcher.start()
        try:
            first = await timed(batcher, "a")  # nothing known yet: waits for company
            lone = await timed(batcher, "b")  # the last batch was one request: no wait
            await asyncio.gather(*(batcher.submit(x) for x in "cdef"))  # a crowd
            after_crowd = await timed(batcher, "g")  # waits for company again
            return first, lone, after_crowd
        finally:
            await batcher.stop()

    first, lone, after_crowd = asyncio.run(main())
    assert first >= 0.7 and after_crowd >= 0.7, (first, after_crowd)
    assert lone < 0.4, lone
    assert sizes == [1, 1, 1, 3, 1] or sizes == [1, 1, 4, 1], sizes


def test_zero_wait_still_batches_what_queued_during_a_call():
    """max_wait_ms=0 adds no latency: nothing waits for company, but requests that queued while
    the previous call ran go together into the next one."""
    sizes = []

    def fn(images, options):
        sizes.append(len(images))
        time.sleep(1.0)  # long enough that the 5 later requests surely queue during it
        return [str(x) for x in images]

    async def main():
        batcher = Batcher(fn, max_batch_size=8, max_wait_ms=0)
        await batcher.start()
        try:
            first = asyncio.ensure_future(batcher.submit(0))
            await asyncio.sleep(0.05)  # the first call is running now
            rest = [batcher.submit(i) for i in range(1, 6)]
            return [await first, *await asyncio.gather(*rest)]
        finally:
            await batcher.stop()

    assert asyncio.run(main()) == ["0", "1", "2", "3", "4", "5"]
    assert sizes == [1, 5]


def test_serve_without_the_extra_says_how_to_install(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "uvicorn", None)  # import fails as if not installed
    monkeypatch.setattr(sys, "argv", ["captioner", "serve", "some-model"])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    assert exit_info.value.code == 1
    err = " ".join(capsys.readouterr().err.split())
    assert "pip install 'captioner[serve]'" in err and "uvicorn" in err


def test_real_tiny_model_caption_matches_engine(tiny_model_dir):
    captioner = Captioner.from_pretrained(tiny_model_dir)
    image = png(48, 48, (30, 60, 220))
    expected = captioner.caption([Image.open(io.BytesIO(image))], max_new_tokens=5)[0]
    with client_for(captioner) as client:
        r = client.post(
            "/caption", files={"file": ("a.png", image, "image/png")}, data={"max_new_tokens": 5}
        )
    assert r.status_code == 200, r.text
    assert r.json()["caption"] == expected


# ---- a real server: `captioner serve` in a subprocess ----


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(chatty_model_dir):
    """`captioner serve` on a free loopback port, serving the tiny GIT with weights scaled up
    so its (meaningless) captions are long and differ per image; yields the base URL."""
    port = _free_port()
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, "-m", "captioner.cli", "serve", str(chatty_model_dir)]
    cmd += ["--port", str(port), "--max_upload_bytes", "200000", "--max_pixels", "1000000"]
    cmd += ["--max_batch_size", "8", "--max_wait_ms", "10"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited: {proc.stdout.read().decode()[-2000:]}")
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("server did not start in 180 s")
            time.sleep(0.3)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.mark.slow
def test_50_concurrent_mixed_uploads_never_crash_the_server(server):
    goods = {f"good_{i}.png": png(32 + i, 32, (i * 9 % 256, 80, 160)) for i in range(30)}
    bads = {}
    for i in range(5):
        bads[f"oversized_{i}.png"] = (noise_png(300), 413)  # ~270 KB > 200 KB
        bads[f"text_{i}.txt"] = (b"%PDF-1.4 not an image" * (i + 1), 415)
        bads[f"bomb_{i}.png"] = (bomb_png(4000 + i), 422)  # 16 M pixels in ~16 KB
        bads[f"cut_{i}.png"] = (noise_png(40 + i)[:500], 422)
    uploads = [(name, data, 200) for name, data in goods.items()]
    uploads += [(name, data, status) for name, (data, status) in bads.items()]
    assert len(uploads) == 50
    opts = {"max_new_tokens": "8"}  # short captions keep the test quick on 2 CPU cores
    expected = {}  # each good image captioned alone first: batching must not change captions
    for name, data in goods.items():
        r = httpx.post(server + "/caption", files={"file": (name, data)}, data=opts, timeout=60)
        expected[name] = r.json()["caption"]

    async def burst():
        async with httpx.AsyncClient(base_url=server, timeout=120) as client:
            return await asyncio.gather(
                *(client.post("/caption", files={"file": (n, d)}, data=opts) for n, d, _ in uploads)
            )

    assert len(set(expected.values())) > 10  # captions tell the images apart
    before = httpx.get(server + "/health").json()["images"]
    responses = asyncio.run(burst())
    for (name, _, status), r in zip(uploads, responses, strict=True):
        assert r.status_code == status, (name, r.text)
        body = r.json()
        if status == 200:
            assert body["caption"].strip() and body["caption"] == expected[name], name
        else:
            assert name in body["detail"], body
    health = httpx.get(server + "/health").json()
    assert health["status"] == "ok" and health["images"] == before + 30  # the good ones only
    assert health["largest_batch"] > 1  # the burst was batched
    after = httpx.post(server + "/caption", files={"file": ("again.png", png())}, timeout=60)
    assert after.status_code == 200


@pytest.mark.slow
def test_browser_page_shows_image_and_caption(server, tmp_path):
    if not Path(CHROMIUM).exists():
        # CI installs it (`make test` runs `make browser`): there, a missing browser is a failure
        assert not os.environ.get("CI"), f"{CHROMIUM} missing in CI: `make browser` failed"
        pytest.skip(f"{CHROMIUM} not installed (`make browser` installs Debian's chromium)")
    sync_api = pytest.importorskip("playwright.sync_api")
    image_path = tmp_path / "blue_square.png"
    img = Image.new("RGB", (96, 96), (240, 240, 240))
    img.paste((30, 60, 220), (24, 24, 72, 72))
    img.save(image_path)
    api = httpx.post(server + "/caption", files={"file": ("x.png", image_path.read_bytes())})
    assert api.status_code == 200
    expected = api.json()["caption"]
    assert expected.strip()

    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
            ],
        )
        try:
            page = browser.new_page(viewport={"width": 900, "height": 700})
            remote = []
            page.on("request", lambda req: remote.append(req.url))
            page.goto(server + "/")
            page.wait_for_function("document.getElementById('model').textContent !== '…'")
            page.set_input_files("#file", str(image_path))
            page.wait_for_selector('#caption[data-state="done"]', timeout=60_000)
            shown = page.text_content("#caption")
            preview_ok = page.evaluate(
                "() => { const i = document.getElementById('preview');"
                " return !i.hidden && i.complete && i.naturalWidth === 96; }"
            )
            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "serve_page.png"), full_page=True)
        finally:
            browser.close()
    assert shown == expected
    assert preview_ok
    assert all(u.startswith((server, "blob:")) for u in remote), remote  # nothing off-box
    assert (ARTIFACTS / "serve_page.png").stat().st_size > 5_000
