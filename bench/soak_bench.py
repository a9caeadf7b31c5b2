"""Soak test of the hardened server: a bounded mix of good, bad, huge, slow and abandoned requests
against 127.0.0.1, with the server's peak RSS, /health answering throughout, and the latency of
the good requests under the mix compared with the same requests alone.

The server is `create_app` + `uvicorn.run(**uvicorn_options())` in a subprocess (what
`captioner serve` runs), serving the `tiny` preset (random weights). The mix, per virtual user,
round-robin: good uploads, non-images, truncated files, PNG bombs, TIFF tile bombs, oversized
JSON, deeply nested JSON, URL fetches (off), requests of 4 large images (the pixel budget's
job), clients that hang up after 0.1 s, bodies that stall mid-way and request heads that never
finish; and (issue 19) bad_words lists over the bound, OpenAI chat requests (good ones, and
bodies of 3 MB of tiny objects that used to be parsed on the event loop), and temperatures too
small to sample with. A 150 MB chunked JSON body is sent once. Then SIGTERM with an upload open.

    .venv/bin/python bench/soak_bench.py                    # 60 s of mix
    .venv/bin/python bench/soak_bench.py --duration 20 --users 4

Prints a markdown section for bench/RESULTS.md. tests/test_hardening.py runs a shorter one.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import platform
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import httpx
import psutil
from PIL import Image

SERVER = """
import sys, uvicorn
from captioner.engine import Captioner
from captioner.serve import create_app
from captioner.serve.app import uvicorn_options
model, port = sys.argv[1], int(sys.argv[2])
app = create_app(
    Captioner.from_pretrained(model), max_upload_bytes=2_000_000, max_pixels=4_000_000,
    max_decoded_bytes=256 * 2**20, max_queue=64, max_batch_size=8, max_wait_ms=10,
    idle_timeout_s=2.0, body_timeout_s=5.0, allowed_hosts=["127.0.0.1"], model_name="tiny",
)
uvicorn.run(app, host="127.0.0.1", port=port, log_level="error",
            **uvicorn_options(limit_concurrency=48, header_timeout_s=3.0, graceful_shutdown_s=5))
"""

# kind -> the answers that count as handled (anything else is "unexpected")
EXPECTED = {
    "good": {200, 503},
    "not an image": {415},
    "truncated": {422},
    "png bomb": {422},
    "tiff tile bomb": {422},
    "json 1 MB": {413},
    "json deep": {422},
    "url fetch": {403},
    "4 large images": {200, 503},
    "abandoned": {"hung up", 200, 503},  # 200: answered before the client left
    "stalled body": {408},
    "stalled head": {"closed"},
    "json 150 MB": {413, "closed"},
    # 503: the upload or body was being reserved in the memory budget when it was full
    "bad_words 300": {422, 503},
    "chat good": {200, 503},
    "chat 3 MB of objects": {413, 503},
    "temperature 1e-45": {422, 503},
    "chat temperature 1e-45": {400, 503},
}
MIX = [
    "good", "good", "not an image", "good", "truncated", "good", "png bomb", "good",
    "tiff tile bomb", "good", "json 1 MB", "4 large images", "good", "json deep", "url fetch",
    "good", "abandoned", "stalled body", "good", "stalled head", "bad_words 300", "chat good",
    "chat 3 MB of objects", "good", "temperature 1e-45", "chat temperature 1e-45",
]  # fmt: skip


# ---- inputs ----


def png(w: int, h: int, color=(200, 40, 40)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), color).save(buf, "PNG")
    return buf.getvalue()


def noise_png(side: int) -> bytes:
    buf = io.BytesIO()
    Image.frombytes("RGB", (side, side), os.urandom(3 * side * side)).save(buf, "PNG")
    return buf.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bomb_png(side: int) -> bytes:
    comp, row = zlib.compressobj(9), b"\x00" * (side + 1)
    idat = b"".join(comp.compress(row) for _ in range(side)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    chunks = _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + chunks


def tiff_tile_bomb(tile: int = 4096) -> bytes:
    comp = zlib.compressobj(9)
    data = b"".join(comp.compress(b"\0" * tile) for _ in range(tile)) + comp.flush()
    entries = [(256, 4, 32), (257, 4, 32), (258, 3, 8), (259, 3, 8), (262, 3, 1), (277, 3, 1)]
    entries += [(322, 4, tile), (323, 4, tile), (324, 4, 8), (325, 4, len(data))]
    out = b"II*\x00" + struct.pack("<I", 8 + len(data)) + data + struct.pack("<H", len(entries))
    for tag, kind, value in entries:
        out += struct.pack("<HHI" + ("I" if kind == 4 else "H2x"), tag, kind, 1, value)
    return out + struct.pack("<I", 0)


class Inputs:
    def __init__(self) -> None:
        self.goods = [png(64, 64, (20 * i % 256, 90, 160)) for i in range(16)]
        self.cut = noise_png(64)[:400]
        self.bomb = bomb_png(4000)  # 16 M pixels > the server's 4 M
        self.tiff = tiff_tile_bomb()
        self.large = png(1900, 1900, (10, 120, 30))  # 3.6 M pixels, ~22 MB while decoding
        self.json_1mb = b"[" + b"{}," * 350_000 + b"{}]"
        self.deep = b"[" * 20_000 + b"]" * 20_000
        self.bad_words = ",".join(f"word{i}" for i in range(300))
        self.data_url = "data:image/png;base64," + base64.b64encode(self.goods[0]).decode()
        chat = chat_body(self.data_url)
        # under the 2.7 MB chat body limit: 2.6 MB of `{},` is 870,000 objects to parse
        self.chat_objects = json.dumps(
            {**chat, "metadata": [{}] * 870_000}, separators=(",", ":")
        ).encode()


def chat_body(url: str, **fields: Any) -> dict[str, Any]:
    part = {"type": "image_url", "image_url": {"url": url}}
    return {"model": "tiny", "messages": [{"role": "user", "content": [part]}], **fields}


# ---- the server ----


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model_dir: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    cmd = [sys.executable, "-c", SERVER, str(model_dir), str(port)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {proc.stderr.read().decode()[-2000:]}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.3)
    proc.kill()
    raise RuntimeError("server did not start in 180 s")


class RssSampler(threading.Thread):
    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.process = psutil.Process(pid)
        self.peak = 0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                self.peak = max(self.peak, self.process.memory_info().rss)
            except psutil.Error:
                return
            time.sleep(0.05)


def vm_hwm(pid: int) -> int:
    """The kernel's own peak RSS of the process (catches spikes between samples)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


# ---- the requests ----


async def one(client: httpx.AsyncClient, url: str, kind: str, inputs: Inputs, i: int):
    """Send one request of `kind`; (outcome, seconds)."""
    start = time.perf_counter()
    opts = {"max_new_tokens": "8"}
    try:
        if kind == "good":
            files = {"file": (f"g{i}.png", inputs.goods[i % len(inputs.goods)], "image/png")}
            r = await client.post("/caption", files=files, data=opts)
        elif kind == "not an image":
            r = await client.post("/caption", files={"file": ("t.png", b"%PDF-1.4 not an image")})
        elif kind == "truncated":
            r = await client.post("/caption", files={"file": ("cut.png", inputs.cut)})
        elif kind == "png bomb":
            r = await client.post("/caption", files={"file": ("bomb.png", inputs.bomb)})
        elif kind == "tiff tile bomb":
            r = await client.post("/caption", files={"file": ("tile.tif", inputs.tiff)})
        elif kind == "json 1 MB":
            headers = {"content-type": "application/json"}
            r = await client.post("/caption", content=inputs.json_1mb, headers=headers)
        elif kind == "json deep":
            headers = {"content-type": "application/json"}
            r = await client.post("/caption", content=inputs.deep, headers=headers)
        elif kind == "url fetch":
            r = await client.post("/caption", json={"url": "http://127.0.0.1:9/a.png"})
        elif kind == "4 large images":
            files = [("files", (f"l{k}.png", inputs.large, "image/png")) for k in range(4)]
            r = await client.post("/caption", files=files, data=opts)
        elif kind == "abandoned":
            files = {"file": (f"a{i}.png", inputs.goods[i % len(inputs.goods)], "image/png")}
            try:
                r = await client.post(
                    "/caption", files=files, data={"max_new_tokens": "40"}, timeout=0.1
                )
            except httpx.TimeoutException:
                return "hung up", time.perf_counter() - start
        elif kind == "stalled body":
            return await stalled(url, head_only=False), time.perf_counter() - start
        elif kind == "stalled head":
            return await stalled(url, head_only=True), time.perf_counter() - start
        elif kind == "bad_words 300":
            files = {"file": (f"w{i}.png", inputs.goods[i % len(inputs.goods)], "image/png")}
            r = await client.post("/caption", files=files, data={"bad_words": inputs.bad_words})
        elif kind == "chat good":
            body = chat_body(inputs.data_url, max_tokens=8)
            r = await client.post("/v1/chat/completions", json=body)
        elif kind == "chat 3 MB of objects":
            headers = {"content-type": "application/json"}
            r = await client.post(
                "/v1/chat/completions", content=inputs.chat_objects, headers=headers
            )
        elif kind == "temperature 1e-45":
            files = {"file": (f"t{i}.png", inputs.goods[i % len(inputs.goods)], "image/png")}
            form = {"do_sample": "true", "temperature": "1e-45", "max_new_tokens": "8"}
            r = await client.post("/caption", files=files, data=form)
        elif kind == "chat temperature 1e-45":
            body = chat_body(inputs.data_url, max_tokens=8, temperature=1e-45)
            r = await client.post("/v1/chat/completions", json=body)
        elif kind == "json 150 MB":
            r = await client.post(
                "/caption", content=json_150mb(), headers={"content-type": "application/json"}
            )
        else:
            raise ValueError(kind)
    except (httpx.RemoteProtocolError, httpx.WriteError, httpx.ReadError):
        return "closed", time.perf_counter() - start
    return r.status_code, time.perf_counter() - start


async def json_150mb():
    yield b"["
    for _ in range(500):
        yield b"{}," * 100_000  # 300 KB at a time: 150 MB in all
    yield b"{}]"


async def stalled(url: str, head_only: bool) -> Any:
    """A client that sends part of a request and then nothing: the server must end it."""
    host, port = url.rsplit("//", 1)[1].split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        if head_only:
            writer.write(b"POST /caption HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
        else:
            writer.write(
                b"POST /caption HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: "
                b"multipart/form-data; boundary=x\r\nContent-Length: 100000\r\n\r\n--x\r\n"
            )
        await writer.drain()
        data = await asyncio.wait_for(reader.read(200), 30)
        if not data:
            return "closed"
        return int(data.split(b" ", 2)[1])
    except (asyncio.TimeoutError, ConnectionError):
        return "timeout"
    finally:
        writer.close()


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


async def run_mix(url: str, inputs: Inputs, duration_s: float, users: int) -> dict[str, Any]:
    outcomes: Counter = Counter()
    unexpected: list[tuple[str, Any]] = []
    good_latency: list[float] = []
    health: dict[str, Any] = {"checks": 0, "failures": 0, "worst_s": 0.0, "latency": []}
    end = time.monotonic() + duration_s
    limits = httpx.Limits(max_connections=users * 2)
    headers = {"host": "127.0.0.1"}
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits, headers=headers) as c:

        async def user(u: int) -> None:
            i = u * 7
            while time.monotonic() < end:
                kind = MIX[i % len(MIX)]
                outcome, took = await one(c, url, kind, inputs, i)
                outcomes[f"{kind} {outcome}"] += 1
                if outcome not in EXPECTED[kind]:
                    unexpected.append((kind, outcome))
                if kind == "good" and outcome == 200:
                    good_latency.append(took)
                i += 1

        async def poll_health() -> None:
            async with httpx.AsyncClient(base_url=url, timeout=5, headers=headers) as hc:
                while time.monotonic() < end:
                    start = time.perf_counter()
                    try:
                        ok = (await hc.get("/health")).status_code == 200
                    except httpx.HTTPError:
                        ok = False
                    took = time.perf_counter() - start
                    health["checks"] += 1
                    health["failures"] += not ok
                    health["worst_s"] = max(health["worst_s"], took)
                    health["latency"].append(took)
                    await asyncio.sleep(0.25)

        async def once_150mb() -> None:
            outcome, _ = await one(c, url, "json 150 MB", inputs, 0)
            outcomes[f"json 150 MB {outcome}"] += 1
            if outcome not in EXPECTED["json 150 MB"]:
                unexpected.append(("json 150 MB", outcome))

        await asyncio.gather(poll_health(), once_150mb(), *(user(u) for u in range(users)))
    return {
        "outcomes": dict(sorted(outcomes.items())),
        "unexpected": unexpected,
        "good_latency": good_latency,
        "health": health,
    }


async def run_alone(url: str, inputs: Inputs, n: int) -> list[float]:
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        out = []
        for i in range(n):
            outcome, took = await one(client, url, "good", inputs, i)
            if outcome == 200:
                out.append(took)
        return out


def sigterm_with_upload_open(proc: subprocess.Popen, url: str) -> float | None:
    """Seconds from SIGTERM to exit while a client holds an upload half sent."""
    host, port = url.rsplit("//", 1)[1].split(":")
    s = socket.create_connection((host, int(port)))
    s.sendall(
        b"POST /caption HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; "
        b"boundary=x\r\nContent-Length: 1000000\r\n\r\n--x\r\n" + b"x" * 1000
    )
    time.sleep(0.2)
    start = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=30)
        return time.monotonic() - start
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return None
    finally:
        s.close()


def run_soak(
    model_dir: str | os.PathLike, duration_s: float = 60, users: int = 6, alone: int = 30
) -> dict[str, Any]:
    """Start the server, measure good requests alone, run the mix, SIGTERM; the figures."""
    inputs = Inputs()
    load_before = os.getloadavg()
    proc, url = start_server(Path(model_dir))
    sampler = RssSampler(proc.pid)
    sampler.start()
    try:
        startup_rss = psutil.Process(proc.pid).memory_info().rss
        alone_latency = asyncio.run(run_alone(url, inputs, alone))
        mix = asyncio.run(run_mix(url, inputs, duration_s, users))
        stats = httpx.get(url + "/health", timeout=10).json()
        peak = max(sampler.peak, vm_hwm(proc.pid))
        shutdown_s = sigterm_with_upload_open(proc, url)
    finally:
        sampler.stop.set()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    outcomes = mix["outcomes"]
    server_errors = sum(
        n
        for key, n in outcomes.items()
        if key.rsplit(" ", 1)[1].isdigit()
        and int(key.rsplit(" ", 1)[1]) >= 500
        and not key.endswith(" 503")
    )
    return {
        "when": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "load_before": load_before,
        "load_after": os.getloadavg(),
        "duration_s": duration_s,
        "users": users,
        "outcomes": outcomes,
        "requests": sum(outcomes.values()),
        "unexpected": mix["unexpected"],
        "server_errors": server_errors,
        "startup_rss_mb": round(startup_rss / 2**20),
        "peak_rss_mb": round(peak / 2**20),
        "health_checks": mix["health"]["checks"],
        "health_failures": mix["health"]["failures"],
        "health_worst_s": round(mix["health"]["worst_s"], 3),
        "health_ms": _latency(mix["health"]["latency"]),
        "alone_ms": _latency(alone_latency),
        "mix_ms": _latency(mix["good_latency"]),
        "server_stats": {k: stats[k] for k in ("batches", "images", "largest_batch", "abandoned")},
        "shutdown_s": None if shutdown_s is None else round(shutdown_s, 2),
    }


def _latency(values: list[float]) -> dict[str, Any]:
    return {
        "n": len(values),
        "p50": None if not values else round(statistics.median(values) * 1000, 1),
        "p99": None if not values else round(percentile(values, 0.99) * 1000, 1),
    }


def markdown(report: dict[str, Any]) -> str:
    la = ", ".join(f"{x:.2f}" for x in report["load_before"])
    lb = ", ".join(f"{x:.2f}" for x in report["load_after"])
    lines = [
        f"{report['when']} · {report['machine']} · load average before {la}, after {lb} · "
        f"{report['duration_s']:.0f} s of mix, {report['users']} concurrent clients + /health "
        "polled every 0.25 s",
        "",
        "| requests by kind and outcome | count |",
        "|---|---:|",
    ]
    lines += [f"| {k} | {n} |" for k, n in report["outcomes"].items()]
    alone, mix = report["alone_ms"], report["mix_ms"]
    lines += [
        "",
        f"- requests: {report['requests']}; unexpected outcomes: {len(report['unexpected'])}; "
        f"5xx other than 503: {report['server_errors']}",
        f"- server RSS: {report['startup_rss_mb']} MB after start, peak "
        f"**{report['peak_rss_mb']} MB** (kernel VmHWM and 50 ms samples)",
        f"- /health: {report['health_checks']} checks, {report['health_failures']} failed, "
        f"p50 {report['health_ms']['p50']} ms, p99 **{report['health_ms']['p99']} ms**, "
        f"slowest {report['health_worst_s'] * 1000:.0f} ms",
        f"- good requests (64x64 PNG, 8 tokens): alone p50 {alone['p50']} ms / p99 "
        f"{alone['p99']} ms (n={alone['n']}); under the mix p50 {mix['p50']} ms / p99 "
        f"{mix['p99']} ms (n={mix['n']})",
        f"- batcher: {report['server_stats']}",
        f"- SIGTERM with an upload half sent: exited after {report['shutdown_s']} s",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=60)
    parser.add_argument("--users", type=int, default=6)
    parser.add_argument("--alone", type=int, default=30)
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from conftest import TINY_CAPTIONS

    from captioner.models.build import build_preset

    with tempfile.TemporaryDirectory() as tmp:
        model = build_preset("tiny", TINY_CAPTIONS, Path(tmp) / "tiny")
        report = run_soak(model, args.duration, args.users, args.alone)
    print(json.dumps({k: v for k, v in report.items() if k != "outcomes"}, default=str))
    print(markdown(report))


if __name__ == "__main__":
    main()
