"""`captioner review` on 50,000 images: time to first paint and the server's memory.

Writes N real 16x16 PNGs (one tiny image, the same bytes in every file: the index never opens an
image, so their content does not matter; thumbnails decode them) and a `.txt` sidecar for all
but every tenth, then starts `run_review` in a subprocess and measures, over loopback:

  * first paint: process start -> the page (GET /, review.js, review.css), /api/info and the
    first grid page (/api/items, 60 items) all answered, i.e. everything the page needs before it
    draws; the browser's own rendering is not included;
  * a page deep in the grid (offset N-60), the first search over all captions (reads every
    sidecar once) and the same search again, 60 cold thumbnails and the same 60 again;
  * the server's RSS (VmRSS) after all of that, and its peak (VmHWM).

    .venv/bin/python bench/review_bench.py                 # 50,000 images
    .venv/bin/python bench/review_bench.py --images 5000 --append

`--append` adds a section to bench/RESULTS.md (machine, date, `uptime` load before/after).
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import httpx
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def make_folder(folder: Path, n: int) -> float:
    start = time.perf_counter()
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 60, 60)).save(buf, "PNG")
    data = buf.getvalue()
    for i in range(n):
        sub = folder / f"{i // 1000:03d}"  # 1,000 per folder, as real datasets are laid out
        if i % 1000 == 0:
            sub.mkdir(parents=True, exist_ok=True)
        (sub / f"img_{i:06d}.png").write_bytes(data)
        if i % 10:
            (sub / f"img_{i:06d}.txt").write_text(f"a red square number {i}\n")
    return time.perf_counter() - start


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> tuple[float, float]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return "uptime unavailable"


def timed(client: httpx.Client, path: str) -> tuple[float, httpx.Response]:
    start = time.perf_counter()
    r = client.get(path)
    r.raise_for_status()
    return (time.perf_counter() - start) * 1000, r


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=50_000)
    parser.add_argument("--append", action="store_true", help="append to bench/RESULTS.md")
    args = parser.parse_args()
    load_before = uptime()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "data"
        made_s = make_folder(folder, args.images)
        port = free_port()
        env = {**os.environ, "CAPTIONER_CACHE": str(Path(tmp) / "cache"), "HF_HUB_OFFLINE": "1"}
        code = (
            "import sys; from captioner.serve.review import run_review; "
            "run_review(sys.argv[1], port=int(sys.argv[2]), say=lambda s: None)"
        )
        start = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-c", code, str(folder), str(port)], env=env)
        base = f"http://127.0.0.1:{port}"
        try:
            with httpx.Client(base_url=base, timeout=120) as client:
                while True:
                    try:
                        client.get("/")
                        break
                    except httpx.TransportError:
                        if proc.poll() is not None:
                            raise SystemExit("the server exited") from None
                        time.sleep(0.02)
                listening_s = time.perf_counter() - start
                for path in ("/", "/review.js", "/review.css", "/api/info", "/api/items?limit=60"):
                    client.get(path).raise_for_status()
                first_paint_s = time.perf_counter() - start
                page_ms, _ = timed(client, "/api/items?limit=60")
                deep_ms, _ = timed(client, f"/api/items?offset={args.images - 60}&limit=60")
                search1_ms, r = timed(client, "/api/items?limit=60&q=number%2049")
                search2_ms, _ = timed(client, "/api/items?limit=60&q=number%2049")
                hits = r.json()["total"]
                mid = max(0, min(5000, args.images - 60))
                page = client.get(f"/api/items?limit=60&offset={mid}").json()
                ids = [x["id"] for x in page["items"]]
                t = time.perf_counter()
                for i in ids:
                    client.get(f"/api/thumb/{i}").raise_for_status()
                thumbs_cold_ms = (time.perf_counter() - t) * 1000
                t = time.perf_counter()
                for i in ids:
                    client.get(f"/api/thumb/{i}").raise_for_status()
                thumbs_warm_ms = (time.perf_counter() - t) * 1000
                rss, peak = rss_mb(proc.pid)
        finally:
            proc.terminate()
            proc.wait(timeout=20)
    load_after = uptime()
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    machine = (
        f"{platform.machine()}, {os.cpu_count()} CPUs visible, Python {platform.python_version()}"
    )
    rows = [
        ("images (16x16 PNG, same bytes; 90 % with a .txt sidecar)", f"{args.images:,}"),
        ("writing the folder (not part of the review)", f"{made_s:.1f} s"),
        ("process start -> listening (imports + index by names)", f"{listening_s:.2f} s"),
        (
            "**first paint**: start -> page + js + css + info + first 60 items",
            f"**{first_paint_s:.2f} s**",
        ),
        ("first grid page again (60 items)", f"{page_ms:.0f} ms"),
        (f"grid page at offset {args.images - 60:,}", f"{deep_ms:.0f} ms"),
        (f"first search (reads every sidecar once; {hits:,} hits)", f"{search1_ms:.0f} ms"),
        ("same search again (captions cached)", f"{search2_ms:.0f} ms"),
        ("60 thumbnails, cold (decode + JPEG + disk cache)", f"{thumbs_cold_ms:.0f} ms"),
        ("60 thumbnails, from the disk cache", f"{thumbs_warm_ms:.0f} ms"),
        ("**server RSS** after all of the above (peak)", f"**{rss:.0f} MB** ({peak:.0f} MB)"),
    ]
    table = ["| measure | value |", "|---|---:|", *[f"| {a} | {b} |" for a, b in rows]]
    section = "\n".join(
        [
            "",
            f"## Review: `captioner review` on {args.images:,} images",
            "",
            f"`bench/review_bench.py`, {when}, {machine}.",
            f"Load before: `{load_before}`; after: `{load_after}`.",
            "",
            *table,
            "",
        ]
    )
    print(section)
    if args.append:
        with open(ROOT / "bench" / "RESULTS.md", "a") as f:
            f.write(section)


if __name__ == "__main__":
    main()
