"""Loopback load test of `captioner serve`: requests/s and latency, dynamic batching on vs off.

Builds the `tiny` preset (random weights: every request decodes `--max_new_tokens` tokens, since
an untrained model never stops early), starts `captioner serve` in a subprocess per batching
mode, and sends a bounded number of uploads at each concurrency with httpx.

    .venv/bin/python bench/serve_bench.py                       # 2000 requests per cell
    .venv/bin/python bench/serve_bench.py --requests 300 --concurrency 1 8 32

Prints a markdown table (paste it into bench/RESULTS.md under "Serving").

`--stream` measures token streaming instead: time to the first piece of text and to the whole
caption, POST /v1/chat/completions with `stream: true` against the same requests unstreamed,
with batching on. Its model is the preset with its weights scaled up (`--preset small` by
default), so that its random captions are text rather than repeated start tokens.

    .venv/bin/python bench/serve_bench.py --stream --requests 64 --concurrency 1 16
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import httpx
from PIL import Image, ImageDraw

from captioner.serve.settings import ServerSettings

CAPTIONS = [
    f"a {c} {s} on a {bg} background"
    for c in ("red", "green", "blue", "white")
    for s in ("circle", "square", "triangle")
    for bg in ("black", "gray")
]


def images(n: int = 16) -> list[bytes]:
    out = []
    for i in range(n):
        img = Image.new("RGB", (96, 96), (40 + 10 * i, 90, 90))
        ImageDraw.Draw(img).ellipse([10 + i, 10, 60 + i, 60], fill=(220, 30 + 12 * i, 30))
        buf = io.BytesIO()
        img.save(buf, "PNG")
        out.append(buf.getvalue())
    return out


def multipart(name: str, data: bytes, fields: dict) -> tuple[bytes, dict]:
    """One multipart/form-data body (file + option fields) and its headers, encoded by httpx."""
    req = httpx.Request("POST", "http://x/", files={"file": (name, data, "image/png")}, data=fields)
    return req.read(), {"content-type": req.headers["content-type"]}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model_dir: Path, max_batch_size: int, max_wait_ms: float) -> tuple:
    port = free_port()
    cmd = [sys.executable, "-m", "captioner.cli", "serve", str(model_dir), "--port", str(port)]
    cmd += ["--max_batch_size", str(max_batch_size), "--max_wait_ms", str(max_wait_ms)]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.3)
    proc.kill()
    raise SystemExit("server did not start")


async def load(url: str, n: int, concurrency: int, payloads: list[bytes], options: dict) -> dict:
    """`concurrency` clients, each sending its next request as soon as the last one returns."""
    latencies: list[float] = []
    errors = 0
    counter = iter(range(n))
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    # Multipart bodies are encoded once: the load generator shares the 2 cores with the server,
    # so every millisecond it spends per request is taken from the thing being measured.
    bodies = [multipart(f"{i}.png", p, options) for i, p in enumerate(payloads)]

    async def client_loop(client: httpx.AsyncClient) -> None:
        nonlocal errors
        for i in counter:
            content, headers = bodies[i % len(bodies)]
            t = time.perf_counter()
            try:
                r = await client.post("/caption", content=content, headers=headers)
                ok = r.status_code == 200 and isinstance(r.json().get("caption"), str)
            except httpx.HTTPError:
                ok = False
            latencies.append(time.perf_counter() - t)
            errors += not ok

    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as client:
        await client.post("/caption", files={"file": ("w.png", payloads[0])}, data=options)  # warm
        start = time.perf_counter()
        await asyncio.gather(*(client_loop(client) for _ in range(concurrency)))
        wall = time.perf_counter() - start
    latencies.sort()
    return {
        "rps": n / wall,
        "p50_ms": 1000 * statistics.median(latencies),
        "p99_ms": 1000 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
        "errors": errors,
        "wall_s": wall,
    }


async def stream_load(
    url: str, model: str, n: int, concurrency: int, payloads: list[bytes], max_tokens: int,
    stream: bool,
) -> dict:  # fmt: skip
    """`concurrency` clients of /v1/chat/completions: per request the time to its first piece of
    text (streamed: the first content chunk; plain: the answer) and to its end."""
    firsts: list[float] = []
    totals: list[float] = []
    errors = 0
    counter = iter(range(n))
    urls = ["data:image/png;base64," + base64.b64encode(p).decode() for p in payloads]

    def body(i: int) -> dict:
        part = {"type": "image_url", "image_url": {"url": urls[i % len(urls)]}}
        messages = [{"role": "user", "content": [part]}]
        return {"model": model, "messages": messages, "max_tokens": max_tokens, "stream": stream}

    async def client_loop(client: httpx.AsyncClient) -> None:
        nonlocal errors
        for i in counter:
            t, first, ok = time.perf_counter(), None, False
            try:
                async with client.stream("POST", "/v1/chat/completions", json=body(i)) as r:
                    async for line in r.aiter_lines():
                        if first is None and '"content": "' in line and '"content": ""' not in line:
                            first = time.perf_counter() - t
                        ok = ok or line == "data: [DONE]" or (not stream and "choices" in line)
                ok = ok and r.status_code == 200
            except httpx.HTTPError:
                pass
            totals.append(time.perf_counter() - t)
            firsts.append(first if first is not None else totals[-1])
            errors += not ok

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as client:
        start = time.perf_counter()
        await asyncio.gather(*(client_loop(client) for _ in range(concurrency)))
        wall = time.perf_counter() - start
    return {
        "ttft_p50_ms": 1000 * statistics.median(firsts),
        "total_p50_ms": 1000 * statistics.median(totals),
        "total_p99_ms": 1000 * sorted(totals)[min(len(totals) - 1, int(0.99 * len(totals)))],
        "rps": n / wall,
        "errors": errors,
    }


def chatty_preset(preset: str, out: Path) -> Path:
    """`preset` with random weights scaled up (as tests/conftest.py's chatty model), writing only
    tokens that are whole text: its greedy captions are long runs of text that differ per
    image and never end early."""
    if (out / "config.json").exists():
        return out
    import torch

    from captioner.models.build import build_preset, load_model

    build_preset(preset, CAPTIONS, out)
    model, processor = load_model(out)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.3)
        # a random byte-level model mostly writes half UTF-8 characters and control bytes,
        # which no stream can show before they complete: it may write only whole text pieces
        # (what a trained model does), so the time to the first text measures streaming
        vocab = processor.tokenizer.convert_ids_to_tokens(list(range(model.config.vocab_size)))
        head = model.get_output_embeddings()
        for i, token in enumerate(vocab):
            text = processor.tokenizer.convert_tokens_to_string([token or ""])
            if not text.strip() or "\ufffd" in text or not text.isprintable():
                head.bias[i] = -1e4
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def stream_main(args: argparse.Namespace) -> None:
    model_dir = chatty_preset(args.preset, Path(f"bench/out/serve_{args.preset}_text"))
    payloads = images()
    proc, url = start_server(model_dir, args.max_batch_size, args.max_wait_ms)
    model = str(model_dir)
    rows = []
    try:
        warm = asyncio.run(stream_load(url, model, 2, 1, payloads, args.max_new_tokens, True))
        assert warm["errors"] == 0, warm
        for c in args.concurrency:
            for stream in (False, True):
                res = asyncio.run(
                    stream_load(url, model, args.requests, c, payloads, args.max_new_tokens, stream)
                )
                rows.append((c, stream, res))
                print(f"c={c:3d} stream={stream!s:5}  {json.dumps(res)}", flush=True)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    uptime = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    print(
        f"\n{stamp}; {platform.machine()}, {os.cpu_count()} cores, CPU; `uptime` at the end: "
        f"{uptime}; {args.preset} preset (weights scaled), {args.max_new_tokens} tokens per "
        f"caption, {args.requests} requests per row, batching on (max {args.max_batch_size}, "
        f"wait {args.max_wait_ms:g} ms).\n"
    )
    print(
        "| concurrency | stream | first text p50 ms | total p50 ms | total p99 ms | req/s | errors |"  # noqa: E501
    )
    print("|---:|---|---:|---:|---:|---:|---:|")
    for c, stream, r in rows:
        print(
            f"| {c} | {'yes' if stream else 'no'} | {r['ttft_p50_ms']:.0f} | "
            f"{r['total_p50_ms']:.0f} | {r['total_p99_ms']:.0f} | {r['rps']:.1f} | {r['errors']} |"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=2000, help="per (mode, concurrency) cell")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--max_batch_size", type=int, default=16, help="for the batching-on runs")
    ap.add_argument("--max_wait_ms", type=float, default=ServerSettings().max_wait_ms)
    ap.add_argument("--max_new_tokens", type=int, default=20)
    ap.add_argument("--model_dir", type=Path, default=Path("bench/out/serve_tiny"))
    ap.add_argument("--stream", action="store_true", help="time to first token vs total")
    ap.add_argument("--preset", default="small", help="with --stream: the preset to serve")
    args = ap.parse_args()
    if args.stream:
        return stream_main(args)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if not (args.model_dir / "config.json").exists():
        from captioner.models.build import build_preset

        build_preset("tiny", CAPTIONS, args.model_dir)
    payloads = images()
    options = {"max_new_tokens": str(args.max_new_tokens)}
    modes = [("off (max_batch_size 1)", 1, 0.0)]
    on = f"on (max {args.max_batch_size}, wait {args.max_wait_ms:g} ms)"
    modes.append((on, args.max_batch_size, args.max_wait_ms))
    rows = []
    for label, mbs, wait in modes:
        proc, url = start_server(args.model_dir, mbs, wait)
        try:
            for c in args.concurrency:
                before = httpx.get(url + "/health").json()
                res = asyncio.run(load(url, args.requests, c, payloads, options))
                after = httpx.get(url + "/health").json()
                batches = max(after["batches"] - before["batches"], 1)
                res["mean_batch"] = (after["images"] - before["images"]) / batches
                rows.append((label, c, res))
                print(
                    f"batching {label:32s} c={c:3d}  {res['rps']:7.1f} req/s  "
                    f"p50 {res['p50_ms']:7.1f} ms  p99 {res['p99_ms']:7.1f} ms  "
                    f"errors {res['errors']}  ({res['wall_s']:.0f} s)",
                    flush=True,
                )
        finally:
            proc.terminate()
            proc.wait(timeout=30)

    print()
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    print(
        f"{stamp}; {platform.machine()}, {os.cpu_count()} cores, CPU, "
        f"load average {os.getloadavg()[0]:.1f} at the end; tiny preset, "
        f"{args.max_new_tokens} new tokens per caption, {args.requests} requests per row, "
        "96x96 PNG uploads over loopback."
    )
    print()
    print("| batching | concurrency | req/s | p50 ms | p99 ms | errors | mean batch |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for label, c, r in rows:
        print(
            f"| {label} | {c} | {r['rps']:.1f} | {r['p50_ms']:.0f} | {r['p99_ms']:.0f} | "
            f"{r['errors']} | {r['mean_batch']:.1f} |"
        )
    by = {(label.split()[0], c): r["rps"] for label, c, r in rows}
    for c in args.concurrency:
        if ("on", c) in by and ("off", c) in by:
            print(f"\nconcurrency {c}: batching on / off = {by[('on', c)] / by[('off', c)]:.2f}x")


if __name__ == "__main__":
    main()
