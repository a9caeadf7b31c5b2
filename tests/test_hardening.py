"""The fuzz and bomb corpus: every attack of the red-team table, generated here at test time and
reproduced against the code that used to fall for it. Each test passes when the attack ends in
a clear error or a skip-and-report: no shell command run, no file outside the target written,
nothing lost, no 5xx. The server soak (slow) runs bench/soak_bench.py's mix against 127.0.0.1.

Clamping `max_new_tokens` to the model's positions lives in engine.py and is not covered here.
"""

from __future__ import annotations

import asyncio
import base64
import importlib.util
import io
import json
import os
import shutil
import socket
import struct
import sys
import tarfile
import threading
import time
import zlib
from pathlib import Path

import pytest
import webdataset as wds
from conftest import make_images
from PIL import Image

from captioner.data.images import check_image, load_image
from captioner.data.sources import MAX_TAR_MEMBER_BYTES, load_captions, scan_source
from captioner.decoding import MAX_WORDS, DecodingOptions
from captioner.errors import BadImageError, CaptionerError
from captioner.jobs.caption import caption_files, read_previous

pytest.importorskip("fastapi")
import httpx  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402
from test_serve import FakeCaptioner, png  # noqa: E402

from captioner.serve import create_app  # noqa: E402
from captioner.serve.app import default_allowed_hosts, uvicorn_options  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHORT = DecodingOptions(max_new_tokens=4)


def client_for(captioner=None, **settings) -> TestClient:
    return TestClient(create_app(captioner or FakeCaptioner(), model_name="fake", **settings))


def assert_json_error(response: httpx.Response, *statuses: int) -> str:
    assert response.status_code in statuses, (response.status_code, response.text[:300])
    assert response.headers["content-type"].startswith("application/json"), response.headers
    detail = response.json()["detail"]
    assert isinstance(detail, str) and detail
    return detail


# ---- the corpus: hostile files, built in memory ----


def tiff_tile_bomb(width: int = 32, height: int = 32, tile: int = 4096) -> bytes:
    """A greyscale deflate TIFF whose header says `width` x `height`, holding one `tile`^2 tile:
    the decoder allocates and inflates the whole tile (the red team's: 16384^2, +768 MB)."""
    comp = zlib.compressobj(9)
    row = b"\0" * tile
    data = b"".join(comp.compress(row) for _ in range(tile)) + comp.flush()
    entries = [
        (256, 4, width),  # ImageWidth
        (257, 4, height),  # ImageLength
        (258, 3, 8),  # BitsPerSample
        (259, 3, 8),  # Compression: deflate
        (262, 3, 1),  # Photometric: black is zero
        (277, 3, 1),  # SamplesPerPixel
        (322, 4, tile),  # TileWidth
        (323, 4, tile),  # TileLength
        (324, 4, 8),  # TileOffsets: right after the header
        (325, 4, len(data)),  # TileByteCounts
    ]
    out = b"II*\x00" + struct.pack("<I", 8 + len(data)) + data + struct.pack("<H", len(entries))
    for tag, kind, value in entries:
        out += struct.pack("<HHI" + ("I" if kind == 4 else "H2x"), tag, kind, 1, value)
    return out + struct.pack("<I", 0)


def webp_with_pcd_inside() -> bytes:
    """A valid 16x16 WebP with a PCD header where Pillow's PCD plugin looks (offset 2048): an
    open that tries every plugin decodes a 768x512 PCD instead."""
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 10, 10)).save(buf, "WEBP", lossless=True)
    data = buf.getvalue()
    return data + b"\0" * (2048 - len(data)) + b"PCD_IPI" + b"\0" * 4096


def png_with_text_chunks(n: int = 100, size: int = 1_000_000) -> bytes:
    """A 16x16 PNG carrying `n` zTXt chunks that each inflate to `size` bytes."""
    from test_serve import _chunk

    raw = png(16, 16)
    text = zlib.compress(b"A" * size, 9)
    chunks = b"".join(_chunk(b"zTXt", b"k%d\x00\x00" % i + text) for i in range(n))
    return raw[:33] + chunks + raw[33:]  # after IHDR


class Zeros(io.RawIOBase):
    """`n` zero bytes, produced as they are read (a bomb's member, never held in memory)."""

    def __init__(self, n: int) -> None:
        self.left = n

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        k = min(len(buf), self.left)
        buf[:k] = b"\0" * k
        self.left -= k
        return k


# ---- 1: no shell from shard names ----


def test_pipe_shard_names_are_files_never_commands(tmp_path, monkeypatch):
    folder = tmp_path / "data"
    folder.mkdir()
    with wds.TarWriter(str(folder / "shard-000.tar")) as sink:
        sink.write({"__key__": "a", "png": png(8, 8), "txt": "a red square"})
    # webdataset runs a `pipe:` URL with shell=True; `data check .` lists this file by that name
    evil = folder / "pipe:touch PWNED; cat shard-000.tar #.tar"
    shutil.copy(folder / "shard-000.tar", evil)
    monkeypatch.chdir(folder)
    scan = scan_source(".", full=True)
    assert not (folder / "PWNED").exists() and not (tmp_path / "PWNED").exists()
    assert len(scan.splits["train"]) == 2  # both read as the local files they are
    assert scan.bad == []
    assert len(load_captions(".", test_size=0)["train"]) == 2
    assert not (folder / "PWNED").exists()


# ---- 2, 12: request bodies that cost more to parse than to send ----


def test_huge_json_body_is_refused_before_parsing():
    sent = 0

    def body():  # `[{},{},...]`: 20 MB here; the red team's 150 MB cost 4.2 GB to parse
        nonlocal sent
        yield b"[" + b"{}," * 10_000
        while sent < 20_000_000:
            sent += 300_000
            yield b"{}," * 100_000

    with client_for() as client:
        r = client.post("/caption", content=body(), headers={"content-type": "application/json"})
        assert "multipart upload" in assert_json_error(r, 413)
        assert client.get("/health").json()["bytes_in_flight"] == 0


@pytest.mark.parametrize(
    "name,kwargs,statuses",
    [
        ("deep nesting", {"content": b"[" * 20_000 + b"]" * 20_000}, (422,)),
        ("deep nesting, past the cap", {"content": b"[" * 70_000}, (413,)),
        (
            "5000-digit int",
            {
                "content": b'{"url": "data:image/png;base64,AAAA", "num_beams": '
                + b"9" * 5000
                + b"}"
            },
            (422,),
        ),
        (
            "5000-digit form int",
            {"files": {"file": ("a.png", png())}, "data": {"num_beams": "9" * 5000}},
            (422,),
        ),
        ("unclosed IPv6 URL", {"json": {"url": "http://[::1"}}, (422,)),
        ("URL over 64 KB", {"json": {"url": "http://example.com/" + "a" * 70_000}}, (413,)),
        ("URL over 8 KB", {"json": {"url": "http://example.com/" + "a" * 10_000}}, (422,)),
        ("17 files", {"files": [("files", (f"{i}.png", png())) for i in range(17)]}, (400, 422)),
        (
            "40 fields",
            {"files": {"file": ("a.png", png())}, "data": {f"f{i}": "1" for i in range(40)}},
            (400, 422),
        ),
        ("100 zTXt chunks", {"files": {"file": ("z.png", png_with_text_chunks())}}, (422,)),
        ("NaN option", {"json": {"url": "data:image/png;base64,AAAA", "top_p": "NaN"}}, (422,)),
        ("JSON string body", {"json": "http://example.com/a.png"}, (422,)),
        ("not UTF-8 JSON", {"content": b'{"url": "\xff\xfe"}'}, (422,)),
        (
            "empty multipart",
            {"content": b"--x--\r\n", "ctype": "multipart/form-data; boundary=x"},
            (422,),
        ),
        ("no boundary", {"content": b"garbage", "ctype": "multipart/form-data"}, (400, 422)),
    ],
)
def test_malformed_inputs_are_4xx_json_never_500(name, kwargs, statuses):
    fake = FakeCaptioner()
    kwargs = dict(kwargs)
    ctype = kwargs.pop("ctype", "application/json" if "content" in kwargs else None)
    headers = {"content-type": ctype} if ctype else None
    with client_for(fake) as client:
        r = client.post("/caption", headers=headers, **kwargs)
        assert_json_error(r, *statuses)
        assert client.get("/health").json()["bytes_in_flight"] == 0
    assert fake.calls == []


# ---- 3: decoded pixels are a server-wide budget, in bytes ----


def test_decoded_pixels_budget_is_503_with_retry_after_then_recovers():
    big = png(1500, 1500)  # 2.25 M pixels: ~13.5 MB while decoding
    fake = FakeCaptioner(delay_s=1.5)
    with client_for(fake, max_decoded_bytes=50_000_000, max_wait_ms=0) as client:
        first = {}

        def hog() -> None:  # three of them hold ~40 MB of the 50 MB while they are captioned
            files = [("files", (f"{i}.png", big, "image/png")) for i in range(3)]
            first["r"] = client.post("/caption", files=files)

        thread = threading.Thread(target=hog)
        thread.start()
        deadline = time.monotonic() + 10
        while client.get("/health").json()["bytes_in_flight"] < 40_000_000:
            assert time.monotonic() < deadline, "the first request never took its share"
            time.sleep(0.02)
        busy = client.post("/caption", files={"file": ("late.png", big, "image/png")})
        detail = assert_json_error(busy, 503)
        assert "memory" in detail and int(busy.headers["retry-after"]) >= 1
        small = client.post("/caption", files={"file": ("small.png", png(), "image/png")})
        assert small.status_code == 200, small.text  # small images still fit beside it
        thread.join()
        assert first["r"].status_code == 200, first["r"].text
        assert client.get("/health").json()["bytes_in_flight"] == 0  # all given back
        again = client.post("/caption", files={"file": ("late.png", big, "image/png")})
        assert again.status_code == 200, again.text
    assert sum(n for n, _ in fake.calls) == 5  # the refused one never reached the model


def test_request_that_could_never_fit_is_refused_without_decoding():
    """The red team's 16 solid 5000x5000 PNGs in one small request: 2.4 GB decoded."""
    solid = png(5000, 5000)
    assert len(solid) < 200_000
    fake = FakeCaptioner()
    with client_for(fake) as client:
        start = time.monotonic()
        files = [("files", (f"{i}.png", solid, "image/png")) for i in range(16)]
        r = client.post("/caption", files=files)
        assert "more than this server ever holds" in assert_json_error(r, 422)
        assert time.monotonic() - start < 5  # headers only: nothing was decoded
        assert client.get("/health").json()["bytes_in_flight"] == 0
    assert fake.calls == []


# ---- 4, 10: what the decoder produces, and which decoder ----


def test_tiff_with_a_small_header_and_a_huge_tile_is_refused(tmp_path):
    bomb = tiff_tile_bomb()  # 32x32 says the header; 4096^2 says the tile
    assert Image.open(io.BytesIO(bomb)).size == (32, 32)  # what a header check alone sees
    for check in (load_image, check_image):
        with pytest.raises(BadImageError, match="TIFF tile 4096x4096 is larger"):
            check(bomb)
    with client_for() as client:
        r = client.post("/caption", files={"file": ("tile.tif", bomb, "image/tiff")})
        assert "TIFF tile" in assert_json_error(r, 422)
    folder = tmp_path / "set"
    folder.mkdir()
    (folder / "tile.tif").write_bytes(bomb)
    (folder / "tile.txt").write_text("a tile")
    (folder / "ok.png").write_bytes(png(8, 8))
    (folder / "ok.txt").write_text("fine")
    bad = {Path(b.file).name: b.reason for b in scan_source(folder).bad}
    assert "TIFF tile" in bad["tile.tif"]
    # an honest tiled TIFF (tiles a little larger than a small image) still loads
    honest = io.BytesIO()
    Image.new("RGB", (100, 60), (1, 2, 3)).save(honest, "TIFF", tiffinfo={322: 112, 323: 64})
    assert load_image(honest.getvalue()).size == (100, 60)


def test_image_is_decoded_once_by_a_whitelisted_plugin_only():
    data = webp_with_pcd_inside()
    assert Image.open(io.BytesIO(data)).format == "PCD"  # every plugin tried: PCD wins
    image = load_image(data)
    assert image.size == (16, 16) and image.getpixel((0, 0)) == (200, 10, 10)
    with client_for() as client:
        r = client.post("/caption", files={"file": ("a.webp", data, "image/webp")})
        assert r.status_code == 200 and r.json()["caption"].startswith("16x16"), r.text
        for name, fmt in (("a.ico", "ICO"), ("a.pcx", "PCX"), ("a.tga", "TGA")):
            r = client.post("/caption", files={"file": (name, png(16, 16, fmt=fmt))})
            assert_json_error(r, 415)
    with pytest.raises(BadImageError, match="not an image"):
        load_image(png(16, 16, fmt="PCX"))


# ---- 5: compressed tar members ----


def test_gzip_bomb_member_is_skipped_unread(tmp_path):
    import tracemalloc

    folder = tmp_path / "shards"
    folder.mkdir()
    with tarfile.open(folder / "bomb.tar", "w:gz", compresslevel=1) as tar:
        member = tarfile.TarInfo("huge.png")
        member.size = 4 * MAX_TAR_MEMBER_BYTES  # 256 MiB of zeros in ~250 KB
        tar.addfile(member, Zeros(member.size))
        for key, text in (("huge", "its caption"), ("after", "still read")):
            info = tarfile.TarInfo(f"{key}.txt")
            info.size = len(text)
            tar.addfile(info, io.BytesIO(text.encode()))
        info = tarfile.TarInfo("after.png")
        data = png(8, 8)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    assert (folder / "bomb.tar").stat().st_size < 2_000_000
    tracemalloc.start()
    try:
        scan = scan_source(folder)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 32 * 1024 * 1024, peak  # the member was never held
    reasons = {Path(b.file).name: b.reason for b in scan.bad}
    assert "over the" in reasons["huge.png"] and "skipped unread" in reasons["huge.png"]
    assert len(scan.splits["train"]) == 1  # the sample after the bomb is kept


# ---- 6, 9, 15: files the caption job writes ----


@pytest.fixture(scope="module")
def captioner(chatty_model_dir):
    from captioner.engine import Captioner

    return Captioner.from_pretrained(chatty_model_dir)


def test_symlinks_at_the_targets_are_replaced_never_followed(captioner, tmp_path):
    folder = tmp_path / "images"
    make_images(folder, 2)
    outside = tmp_path / "outside"
    outside.mkdir()
    victims = [outside / "victim1", outside / "victim2", outside / "victim3"]
    for v in victims:
        v.write_text("precious\n")
    (folder / "img_000.txt.tmp").symlink_to(victims[0])  # the old temp file's name
    (folder / "img_001.txt").symlink_to(victims[1])  # the sidecar's own name
    out = folder / "rows.jsonl"
    out.symlink_to(victims[2])
    summary = caption_files(
        captioner, [str(folder)], sidecar=True, overwrite=True, output=out, decoding=SHORT
    )
    assert summary.captioned == 2 and not summary.failed
    assert all(v.read_text() == "precious\n" for v in victims)
    for name in ("img_000.txt", "img_001.txt", "rows.jsonl"):
        assert (folder / name).is_file() and not (folder / name).is_symlink(), name
    assert [
        p.name for p in folder.iterdir() if p.name.endswith(".tmp") and not p.is_symlink()
    ] == []
    # appending (--resume) through a symlink is refused, the target untouched
    link = folder / "linked.jsonl"
    link.symlink_to(victims[0])
    with pytest.raises(CaptionerError):
        caption_files(captioner, [str(folder)], output=link, resume=True, decoding=SHORT)
    assert victims[0].read_text() == "precious\n"


def test_non_utf8_file_names_are_captioned_written_and_resumed(captioner, tmp_path):
    folder = tmp_path / "images"
    make_images(folder, 1)
    raw = os.fsencode(folder) + b"/caf\xe9.png"  # latin-1 bytes: not valid UTF-8
    with open(raw, "wb") as f:
        f.write(png(20, 20))
    with open(os.fsencode(folder) + b"/bad\xff.png", "wb") as f:
        f.write(b"not an image")
    name = os.fsdecode(raw)  # 'caf\udce9.png', as os.walk gives it
    for suffix in (".jsonl", ".csv"):
        out = tmp_path / f"out{suffix}"
        summary = caption_files(captioner, [str(folder)], output=out, decoding=SHORT)
        assert summary.captioned == 2 and len(summary.failed) == 1
        if suffix == ".jsonl":
            rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
            assert name in {r["image"] for r in rows}  # valid UTF-8 JSON, the same name back
            assert os.path.exists(next(r["image"] for r in rows if r["image"] == name))
        assert read_previous(out).done >= {name}
        again = caption_files(captioner, [str(folder)], output=out, resume=True, decoding=SHORT)
        assert again.skipped == 3 and again.captioned == 0
    sidecars = caption_files(captioner, [str(folder)], sidecar=True, decoding=SHORT)
    assert sidecars.captioned == 2
    assert os.path.exists(os.fsencode(folder) + b"/caf\xe9.txt")


def test_shared_sidecar_names_are_error_rows_unless_a_policy_is_chosen(captioner, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    Image.new("RGB", (16, 16), (200, 0, 0)).save(folder / "cat.jpg")
    Image.new("RGB", (16, 16), (0, 0, 200)).save(folder / "cat.png")
    Image.new("RGB", (16, 16), (0, 200, 0)).save(folder / "dog.png")
    out = tmp_path / "rows.jsonl"
    summary = caption_files(captioner, [str(folder)], sidecar=True, output=out, decoding=SHORT)
    assert summary.captioned == 1 and len(summary.failed) == 2
    assert all("--on_collision" in reason for _, reason in summary.failed)
    assert not (folder / "cat.txt").exists() and (folder / "dog.txt").is_file()
    rows = {Path(r["image"]).name: r for r in map(json.loads, out.read_text().splitlines())}
    assert "error" in rows["cat.jpg"] and "error" in rows["cat.png"]
    named = caption_files(
        captioner,
        [str(folder)],
        sidecar=True,
        skip_existing=True,
        on_collision="full_name",
        decoding=SHORT,
    )
    assert named.captioned == 2 and not named.failed
    assert (folder / "cat.jpg.txt").is_file() and (folder / "cat.png.txt").is_file()
    with pytest.raises(CaptionerError, match="--on_collision"):
        caption_files(captioner, [str(folder)], sidecar=True, on_collision="last")


def test_fifo_named_like_an_image_is_an_error_row_not_a_hang(captioner, tmp_path):
    folder = tmp_path / "images"
    make_images(folder, 1)
    os.mkfifo(folder / "b.png")
    result = {}

    def run() -> None:
        result["summary"] = caption_files(
            captioner, [str(folder)], stdout=io.StringIO(), decoding=SHORT
        )

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout=60)
    assert not thread.is_alive(), "captioning a FIFO hung"
    summary = result["summary"]
    assert summary.captioned == 1
    assert summary.failed == [(str(folder / "b.png"), "not a regular file (a FIFO)")]
    # data loading skips it too, and a FIFO where a caption file should be is not read
    (folder / "img_000.txt").write_text("caption")
    os.mkfifo(folder / "c.txt")
    Image.new("RGB", (8, 8)).save(folder / "c.png")
    scan = scan_source(folder)
    assert len(scan.splits["train"]) == 1


def test_overwrite_keeps_the_output_until_the_model_has_loaded(tmp_path):
    images = make_images(tmp_path / "images", 1)
    out = tmp_path / "rows.jsonl"
    out.write_text('{"image": "kept", "caption": "from an earlier run"}\n')
    before = out.read_bytes()
    with pytest.raises(CaptionerError):
        caption_files(tmp_path / "no-such-model", [str(images[0])], output=out, overwrite=True)
    assert out.read_bytes() == before


def test_resume_retries_error_rows_when_asked(captioner, tmp_path):
    folder = tmp_path / "images"
    make_images(folder, 2)
    broken = folder / "late.png"
    broken.write_bytes(b"still uploading")
    out = tmp_path / "rows.jsonl"
    first = caption_files(captioner, [str(folder)], output=out, decoding=SHORT)
    assert first.captioned == 2 and [Path(f).name for f, _ in first.failed] == ["late.png"]
    broken.write_bytes(png(24, 24))  # fixed since
    plain = caption_files(captioner, [str(folder)], output=out, resume=True, decoding=SHORT)
    assert plain.skipped == 3 and plain.captioned == 0  # an error row counts as done ...
    retried = caption_files(
        captioner, [str(folder)], output=out, resume=True, retry_errors=True, decoding=SHORT
    )
    assert retried.captioned == 1 and retried.skipped == 2  # ... unless asked to retry
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(Path(r["image"]).name for r in rows) == ["img_000.png", "img_001.png", "late.png"]
    assert not any("error" in r for r in rows)  # the error row was replaced, nothing lost
    with pytest.raises(CaptionerError, match="--retry_errors goes with --resume"):
        caption_files(captioner, [str(folder)], output=out, retry_errors=True)


# ---- 7, 14: who may call, and what the server fetches ----


def test_url_fetch_is_off_by_default_and_host_header_is_checked():
    with client_for() as client:
        for url in ("http://127.0.0.1:9/a.png", "http://2130706433/a.png", "https://example.com/"):
            r = client.post("/caption", json={"url": url})
            assert "does not fetch URLs" in assert_json_error(r, 403)
    hosts = default_allowed_hosts("127.0.0.1")
    assert default_allowed_hosts("0.0.0.0") is None
    with TestClient(
        create_app(FakeCaptioner(), allowed_hosts=hosts), base_url="http://127.0.0.1:8000"
    ) as client:
        assert client.get("/health").status_code == 200
        for host in ("attacker.example", "attacker.example:8000", "127.0.0.1.nip.io", ""):
            r = client.get("/health", headers={"host": host})
            assert "Host header" in assert_json_error(r, 400), host
            r = client.post("/caption", files={"file": ("a.png", png())}, headers={"host": host})
            assert_json_error(r, 400)
        for host in ("localhost:8000", "[::1]:8000", "LOCALHOST"):
            assert client.get("/health", headers={"host": host}).status_code == 200, host
    with pytest.raises(CaptionerError, match="allowed_hosts"):
        create_app(FakeCaptioner(), allowed_hosts=[""])


def test_url_fetch_when_on_refuses_private_addresses_with_one_answer():
    with client_for(allow_url_fetch=True) as client:
        answers = set()
        for url in (
            "http://127.0.0.1:9/a.png",
            "http://127.0.0.1:1/closed",
            "http://localhost:8000/health",
            "http://[::1]/",
            "http://169.254.169.254/latest/meta-data/",
            "http://0x7f.1/",
        ):
            r = client.post("/caption", json={"url": url})
            answers.add(assert_json_error(r, 422).split(": ", 1)[1])
        assert client.get("/health").json()["url_fetch"] is True
    assert len(answers) == 1  # nothing to tell a closed port from a refused address


def test_empty_api_key_is_no_key():
    for key in ("", "   "):
        with pytest.raises(CaptionerError, match="must not be empty"):
            create_app(FakeCaptioner(), api_key=key)
    with client_for(api_key="s3cret") as client:
        files = {"file": ("a.png", png(), "image/png")}
        for headers in ({"X-API-Key": ""}, {"X-API-Key": "  "}, {"Authorization": "Bearer "}):
            r = client.post("/caption", files=files, headers=headers)
            assert "missing API key" in assert_json_error(r, 401), headers
        assert client.get("/health").json()["auth"] is True


# ---- 8, 11: overload and abandoned work ----


def test_full_queue_is_503_before_anything_is_queued():
    fake = FakeCaptioner()
    with client_for(fake, max_queue=4) as client:
        files = [("files", (f"{i}.png", png(10 + i, 10), "image/png")) for i in range(10)]
        r = client.post("/caption", files=files)
        assert "retry later" in assert_json_error(r, 503)
        assert int(r.headers["retry-after"]) >= 1
        assert client.get("/health").json()["queued"] == 0
        ok = client.post("/caption", files=files[:4])
        assert ok.status_code == 200, ok.text
    assert [n for n, _ in fake.calls] == [4]  # none of the 10 was captioned


async def _asgi_post(app, body: bytes, ctype: str, leave_after: float | None, chunks=None):
    """POST /caption straight into the ASGI app; the client hangs up `leave_after` seconds
    after its body was sent (None: it waits for the answer)."""
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/caption",
        "raw_path": b"/caption",
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"testserver"), (b"content-type", ctype.encode())],
        "client": ("127.0.0.1", 50000),
        "server": ("testserver", 80),
    }
    pieces = list(chunks) if chunks is not None else [body]
    sent: list[dict] = []

    async def receive() -> dict:
        if pieces:
            piece = pieces.pop(0)
            if piece is None:  # a client that stalls mid-body
                await asyncio.sleep(3600)
            return {"type": "http.request", "body": piece, "more_body": bool(pieces)}
        await asyncio.sleep(3600 if leave_after is None else leave_after)
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)

    await app(scope, receive, send)
    return sent


def _multipart(name: str, data: bytes) -> tuple[bytes, str]:
    request = httpx.Request("POST", "http://x/", files={"file": (name, data, "image/png")})
    return request.read(), request.headers["content-type"]


def test_abandoned_requests_are_dropped_before_compute():
    fake = FakeCaptioner(delay_s=1.0)
    app = create_app(fake, max_batch_size=1, max_wait_ms=0)

    async def main():
        await app.state.batcher.start()
        try:
            body, ctype = _multipart("stays.png", png(30, 30))
            stays = asyncio.create_task(_asgi_post(app, body, ctype, leave_after=None))
            await asyncio.sleep(0.2)  # its image is being captioned now
            leavers = []
            for i in range(4):
                body, ctype = _multipart(f"leaves{i}.png", png(40 + i, 40))
                leavers.append(asyncio.create_task(_asgi_post(app, body, ctype, leave_after=0.2)))
            await asyncio.gather(*leavers)
            sent = await stays
            await asyncio.sleep(0.3)  # the worker drains the abandoned jobs
            return sent, app.state.batcher.stats, app.state.budget.used
        finally:
            await app.state.batcher.stop()

    sent, stats, in_flight = asyncio.run(main())
    assert sent[0]["status"] == 200
    assert [n for n, _ in fake.calls] == [1]  # only the request whose client waited
    assert stats.abandoned == 4 and stats.images == 1
    assert in_flight == 0


def test_stalled_body_is_408_and_gives_everything_back():
    app = create_app(FakeCaptioner(), idle_timeout_s=0.3, body_timeout_s=1.0)
    body, ctype = _multipart("a.png", png())

    async def main():
        await app.state.batcher.start()
        try:
            start = time.monotonic()
            sent = await _asgi_post(app, b"", ctype, None, chunks=[body[:100], None])
            return sent, time.monotonic() - start
        finally:
            await app.state.batcher.stop()

    sent, took = asyncio.run(main())
    assert sent[0]["status"] == 408 and took < 2
    assert json.loads(sent[1]["body"])["detail"] == "request body not received in time"
    assert app.state.budget.used == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_slow_headers_are_cut_off_and_health_answers_again():
    import uvicorn

    port = _free_port()
    options = uvicorn_options(limit_concurrency=4, header_timeout_s=1.0)
    config = uvicorn.Config(
        create_app(FakeCaptioner()), host="127.0.0.1", port=port, log_level="error", **options
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while not server.started:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        slow = []
        for _ in range(6):  # more than limit_concurrency, each stuck in its request head
            s = socket.create_connection(("127.0.0.1", port))
            s.sendall(b"POST /caption HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
            slow.append(s)
        time.sleep(0.2)
        assert httpx.get(base + "/health", timeout=5).status_code == 503  # the limit holds
        start = time.monotonic()
        for s in slow:
            s.settimeout(5)
            assert s.recv(100) == b""  # closed by the server
            s.close()
        assert time.monotonic() - start < 3
        assert httpx.get(base + "/health", timeout=5).status_code == 200
        ok = httpx.post(base + "/caption", files={"file": ("a.png", png())}, timeout=10)
        assert ok.status_code == 200, ok.text
    finally:
        server.should_exit = True
        thread.join(timeout=15)


# ---- second round (issue 19): limits the first round left open ----


def cli_error(argv: list[str], monkeypatch, capsys) -> str:
    """`captioner ARGV` in-process: it must end in exactly one `error:` line and exit 1."""
    from captioner import cli

    monkeypatch.setattr(sys, "argv", ["captioner", *argv])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    err = capsys.readouterr().err
    assert exit_info.value.code == 1 and "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


def data_url(data: bytes, scheme: str = "data:image/png;base64,") -> str:
    return scheme + base64.b64encode(data).decode()


def openai_chat(url: str, **fields) -> dict:
    part = {"type": "image_url", "image_url": {"url": url}}
    return {"model": "fake", "messages": [{"role": "user", "content": [part]}], **fields}


def test_bad_words_are_deduplicated_and_bounded(monkeypatch, capsys):
    assert DecodingOptions(bad_words=["cat", "dog,cat", " cat "]).bad_words == ["cat", "dog"]
    many = [f"w{i}" for i in range(MAX_WORDS)]
    assert len(DecodingOptions(bad_words=many * 3).bad_words) == MAX_WORDS  # repeats are free
    too_many = [*many, "one more"]
    too_long = ["x" * 1000 + str(i) for i in range(5)]  # 5 words, 5,005 characters
    for words in (too_many, [",".join(too_many)], too_long):
        with pytest.raises(CaptionerError, match=f"at most {MAX_WORDS} words and 4,096"):
            DecodingOptions(bad_words=words)
    fake = FakeCaptioner()
    with client_for(fake) as client:
        form = {"bad_words": ",".join(too_many)}
        r = client.post("/caption", files={"file": ("a.png", png(), "image/png")}, data=form)
        assert "bad_words: at most" in assert_json_error(r, 422)
        r = client.post("/caption", json={"url": data_url(png()), "bad_words": too_long})
        assert "bad_words: at most" in assert_json_error(r, 422)
        schema = client.get("/openapi.json").json()["paths"]["/caption"]["post"]
        props = schema["requestBody"]["content"]["application/json"]["schema"]["properties"]
        assert props["bad_words"]["maxItems"] == MAX_WORDS
    assert fake.calls == []
    line = cli_error(["caption", "MODEL", "x.png", "--bad_words", ",".join(too_many)],
                     monkeypatch, capsys)  # fmt: skip
    assert "--bad_words: at most 256 words" in line


def test_chat_body_is_parsed_off_the_event_loop_within_the_budget(monkeypatch):
    from captioner.serve import openai as openai_routes

    where = []
    parse = openai_routes.parse_chat

    def spy(raw: bytes, model_name: str):
        try:
            asyncio.get_running_loop()
            where.append("event loop")
        except RuntimeError:
            where.append("worker thread")
        return parse(raw, model_name)

    monkeypatch.setattr(openai_routes, "parse_chat", spy)
    body = openai_chat(data_url(png()))
    many = {**body, "metadata": [{}] * 40_000}  # 160 KB: 80,000 objects' brackets and commas
    fake = FakeCaptioner()
    with client_for(fake) as client:
        assert client.post("/v1/chat/completions", json=body).status_code == 200
        r = client.post("/v1/chat/completions", json=many)
        assert r.status_code == 413 and "brackets" in r.json()["error"]["message"], r.text
        assert client.get("/health").json()["bytes_in_flight"] == 0
    assert where == ["worker thread"]  # the refused body was never parsed
    # what parsing holds is reserved before it starts: 20,000 small objects need ~3 MB
    fewer = {**body, "metadata": [{}] * 20_000}
    with client_for(fake, max_decoded_bytes=1_000_000) as client:
        r = client.post("/v1/chat/completions", json=fewer)
        assert r.status_code == 422 and "parsing its JSON" in r.json()["error"]["message"]
        assert client.post("/v1/chat/completions", json=body).status_code == 200
        assert client.get("/health").json()["bytes_in_flight"] == 0
    assert where == ["worker thread"] * 2
    assert len(fake.calls) == 2


def test_temperature_and_penalty_have_a_floor_sampling_survives(captioner, monkeypatch, capsys):
    for field in ("temperature", "repetition_penalty"):
        with pytest.raises(CaptionerError, match=f"--{field} must be >= 0.01"):
            DecodingOptions(do_sample=True, **{field: 1e-45})
    lowest = DecodingOptions(
        do_sample=True, temperature=0.01, repetition_penalty=0.01, max_new_tokens=4
    )
    assert len(captioner.caption([png(24, 24)], lowest)) == 1  # the floor itself samples
    fake = FakeCaptioner()
    with client_for(fake) as client:
        form = {"do_sample": "true", "temperature": "1e-45"}
        r = client.post("/caption", files={"file": ("a.png", png(), "image/png")}, data=form)
        assert "--temperature must be >= 0.01" in assert_json_error(r, 422)
        r = client.post(
            "/v1/chat/completions", json=openai_chat(data_url(png()), temperature=1e-45)
        )
        assert r.status_code == 400 and r.json()["error"]["param"] == "temperature", r.text
        r = client.post("/v1/chat/completions", json=openai_chat(data_url(png()), temperature=0))
        assert r.status_code == 200, r.text  # 0 still means greedy
    assert [d.do_sample for _, d in fake.calls] == [False]
    argv = ["caption", "MODEL", "x.png", "--do_sample", "--temperature", "1e-45"]
    assert "--temperature must be >= 0.01" in cli_error(argv, monkeypatch, capsys)


def test_small_gaps_in_the_options_are_closed(monkeypatch, capsys):
    fake = FakeCaptioner()
    with client_for(fake) as client:
        # URL schemes are case-insensitive
        r = client.post("/caption", json={"url": data_url(png(12, 12), "DATA:IMAGE/PNG;BASE64,")})
        assert r.status_code == 200 and r.json()["caption"].startswith("12x12"), r.text
        chat = openai_chat(data_url(png(14, 14), "Data:image/png;base64,"))
        r = client.post("/v1/chat/completions", json=chat)
        assert r.status_code == 200, r.text
        # both token limits are checked; two different ones are a contradiction
        for fields, param in (
            ({"max_tokens": -1, "max_completion_tokens": 5}, "max_tokens"),
            ({"max_tokens": 5, "max_completion_tokens": 0}, "max_completion_tokens"),
            ({"max_tokens": 5, "max_completion_tokens": 6}, "max_completion_tokens"),
        ):
            r = client.post("/v1/chat/completions", json=openai_chat(data_url(png()), **fields))
            assert r.status_code == 400 and r.json()["error"]["param"] == param, (fields, r.text)
        same = openai_chat(data_url(png()), max_tokens=5, max_completion_tokens=5)
        assert client.post("/v1/chat/completions", json=same).status_code == 200
        # prefix / suffix are bounded like the prompt; min_new_tokens <= max_new_tokens
        for bad, message in (
            ({"prefix": "x" * 201}, "--prefix: at most 200"),
            ({"suffix": "x" * 201}, "--suffix: at most 200"),
            ({"min_new_tokens": 9, "max_new_tokens": 8}, "--min_new_tokens (9) must be <="),
        ):
            r = client.post("/caption", json={"url": data_url(png()), **bad})
            assert message in assert_json_error(r, 422), bad
        # /docs is served without a CDN (the Swagger UI page loads its script from one)
        docs = client.get("/docs")
        assert docs.status_code == 200 and "<script" not in docs.text.lower()
        assert "http://" not in docs.text and "https://" not in docs.text
        assert "/caption" in docs.text and "bad_words" in docs.text and "/v1/chat" in docs.text
        assert client.get("/openapi.json").status_code == 200
        assert client.get("/redoc").status_code == 404
    assert [n for n, _ in fake.calls] == [1, 1, 1]
    argv = ["caption", "MODEL", "x.png", "--min_new_tokens", "40", "--max_new_tokens", "30"]
    assert "--min_new_tokens (40) must be <= --max_new_tokens (30)" in cli_error(
        argv, monkeypatch, capsys
    )


# ---- the soak: a bounded mix against a real server ----


def _soak_module():
    spec = importlib.util.spec_from_file_location("soak_bench", ROOT / "bench" / "soak_bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_soak_mixed_traffic_keeps_memory_bounded_and_health_answering(tiny_model_dir):
    soak = _soak_module()
    report = soak.run_soak(tiny_model_dir, duration_s=25, alone=10)
    print(soak.markdown(report))
    assert report["peak_rss_mb"] < 1500, report
    assert report["health_failures"] == 0 and report["health_checks"] > 20, report
    assert report["server_errors"] == 0, report["outcomes"]  # no 500 of any kind
    assert report["outcomes"].get("good 200", 0) > 5, report["outcomes"]
    assert report["unexpected"] == [], report["unexpected"]
    assert report["shutdown_s"] is not None and report["shutdown_s"] < 15, report
