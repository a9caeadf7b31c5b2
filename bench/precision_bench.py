"""Fast CPU captioning: float32, bfloat16, int8 and ONNX Runtime (float32, int8) against the
guide's one-image loop, with caption agreement; and the OpenAI-compatible endpoint vs /caption.

    .venv/bin/python bench/precision_bench.py                  # everything, ~17 min on 2 cores
    .venv/bin/python bench/precision_bench.py --presets tiny --n 100 --skip trained serve

Three parts, all in one run so that every ratio compares numbers measured under the same load:

1. speed: the `tiny` and `small` presets with random weights (they never emit [SEP], so every
   caption is the full 49 tokens, as in caption_bench.py), 256 px JPEGs. The guide's loop is
   caption_bench.py's (`generate(max_length=50)` one image at a time) on `--guide_n` images, half
   before the modes and half after (the load on a shared machine moves); each
   mode captions `--n` images through `engine.Captioner` with `max_new_tokens=49` and the
   automatic batch size. Agreement with float32 is printed, but on random weights it measures
   nothing useful: logits of an untrained model are near-ties everywhere.
2. trained: both presets trained briefly on generated scenes (`captioner train`, `--max_steps`),
   then each mode captions held-out scenes (other seed): agreement with float32 greedy captions
   (the number that matters), exact match against the references, and images/s on captions
   that end where the model ends them.
3. serve: `captioner serve` on the random `tiny` (20 new tokens per caption), requests/s through
   POST /v1/chat/completions (JSON, base64 data: URL) vs POST /caption (multipart) at
   concurrency 1 and 32, batching on (max 16, 5 ms).

torch runs with `--threads` intra-op threads (default 1, see caption_bench.py on why), ONNX
Runtime with the same number. Prints markdown for bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import functools
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from caption_bench import CAPTIONS, make_images, run_side
from serve_bench import free_port, images, multipart

print = functools.partial(print, flush=True)  # noqa: A001 (rows appear as they are measured)

MODES = ("float32", "bfloat16", "int8", "onnx", "onnx-int8")


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return f"load average {os.getloadavg()}"


def captioner_for(mode: str, model_dir: Path, onnx_dirs: dict[str, Path]):
    from captioner.engine import Captioner
    from captioner.models import precision
    from captioner.models.build import load_model
    from captioner.models.export import load_onnx

    if mode.startswith("onnx"):
        return Captioner(*load_onnx(onnx_dirs[mode]), device="cpu")
    model, processor = load_model(model_dir)
    model = precision.prepare(
        model, "bfloat16" if mode == "bfloat16" else "float32", int8=mode == "int8"
    )
    return Captioner(model, processor, device="cpu")


def timed_captions(captioner, paths: list, **options) -> tuple[float, list[str], int]:
    batch = captioner.auto_batch_size(1, options.get("max_new_tokens", 30))
    captioner.caption(paths[:8], batch_size=8, **options)  # warm-up: first-call allocations
    start = time.perf_counter()
    captions = captioner.caption(paths, batch_size=batch, **options)
    return len(paths) / (time.perf_counter() - start), captions, batch


def export_all(model_dir: Path, work: Path) -> tuple[dict[str, Path], dict[str, float]]:
    from captioner.models.export import export_onnx

    dirs, seconds = {}, {}
    for mode, int8 in (("onnx", False), ("onnx-int8", True)):
        start = time.perf_counter()
        dirs[mode] = export_onnx(model_dir, work / mode, int8=int8, overwrite=True)
        seconds[mode] = time.perf_counter() - start
    return dirs, seconds


# ---- 1. speed on random weights ----


def speed(presets: list[str], n: int, guide_n: int, threads: int, work: Path) -> list[dict]:
    from captioner.models import precision
    from captioner.models.build import build_preset

    paths = make_images(work / "images", max(n, guide_n))
    print("\n### Speed: random weights, 49 tokens per caption\n")
    print("| preset | mode | batch | images/s | × guide | × own float32 | agreement* |")
    print("|---|---|---:|---:|---:|---:|---:|")
    rows = []
    for preset in presets:
        model_dir = build_preset(preset, CAPTIONS, work / preset)
        onnx_dirs, export_s = export_all(model_dir, work / f"{preset}-export")
        # the guide runs half before and half after the modes: on a shared machine the load moves
        half = (
            [str(p) for p in paths[: guide_n // 2]],
            [str(p) for p in paths[guide_n // 2 : guide_n]],
        )
        guide = run_side("guide", str(model_dir), half[0], None, threads)
        reference = None
        fp32_speed = None
        table = []
        for mode in MODES:
            captioner = captioner_for(mode, model_dir, onnx_dirs)
            rate, captions, batch = timed_captions(captioner, paths[:n], max_new_tokens=49)
            del captioner
            if mode == "float32":
                reference, fp32_speed = captions, rate
            agree = precision.agreement(reference, captions)
            table.append((mode, batch, rate, rate / fp32_speed, agree))
        after = run_side("guide", str(model_dir), half[1], None, threads)
        guide_rate = guide_n / (guide["seconds"] + after["seconds"])
        same = precision.agreement(guide["captions"] + after["captions"], reference[:guide_n])
        rows.append({"preset": preset, "mode": "guide", "images_per_s": guide_rate})
        print(
            f"| {preset} | guide loop ({guide['images_per_s']:.2f} before, "
            f"{after['images_per_s']:.2f} after) | 1 | {guide_rate:.2f} | 1.0× | | |"
        )
        for mode, batch, rate, own, agree in table:
            rows.append({"preset": preset, "mode": mode, "images_per_s": rate, "agree": agree})
            print(
                f"| {preset} | {mode} | {batch} | {rate:.2f} | {rate / guide_rate:.1f}× | "
                f"{own:.2f}× | {agree:.0%} |"
            )
        print(
            f"<!-- {preset}: guide and engine float32 captions identical on {same:.0%}; export "
            f"{export_s['onnx']:.1f} s, int8 export {export_s['onnx-int8']:.1f} s -->"
        )
    return rows


# ---- 2. trained models: agreement that means something ----


def train_preset(preset: str, scenes: Path, out: Path, steps: int) -> Path:
    cmd = [sys.executable, "-m", "captioner.cli", "train", "--model", preset]
    cmd += ["--data", str(scenes), "--output_dir", str(out), "--max_steps", str(steps)]
    cmd += ["--per_device_train_batch_size", "32", "--eval_strategy", "no"]
    cmd += ["--save_strategy", "no", "--logging_steps", str(max(steps // 4, 1))]
    cmd += ["--test_size", "0.01"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)
    return out


def references(folder: Path) -> tuple[list[Path], list[list[str]]]:
    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    return [folder / r["file_name"] for r in rows], [r["captions"] for r in rows]


def trained(presets: list[str], steps: dict[str, int], n_test: int, work: Path) -> list[dict]:
    from captioner.data.scenes import generate_scenes
    from captioner.models import precision

    scenes = generate_scenes(work / "scenes", 1500, 0, difficulty="easy")
    held_out = generate_scenes(work / "held_out", n_test, 1, difficulty="easy")
    paths, refs = references(held_out)
    norm = [{" ".join(r.lower().split()) for r in group} for group in refs]
    print(f"\n### Trained briefly on 1,500 easy scenes; {n_test} held-out scenes (other seed)\n")
    print("| preset (steps, train s) | mode | images/s | agreement with float32 | exact match |")
    print("|---|---|---:|---:|---:|")
    rows = []
    for preset in presets:
        start = time.perf_counter()
        model_dir = train_preset(preset, scenes, work / f"trained-{preset}", steps[preset])
        train_s = time.perf_counter() - start
        onnx_dirs, _ = export_all(model_dir, work / f"trained-{preset}-export")
        reference = None
        for mode in MODES:
            captioner = captioner_for(mode, model_dir, onnx_dirs)
            rate, captions, _ = timed_captions(captioner, paths)
            del captioner
            reference = reference or captions
            agree = precision.agreement(reference, captions)
            exact = sum(" ".join(c.split()) in g for c, g in zip(captions, norm, strict=True))
            rows.append({"preset": preset, "mode": mode, "images_per_s": rate, "agree": agree})
            label = f"{preset} ({steps[preset]}, {train_s:.0f} s)"
            print(f"| {label} | {mode} | {rate:.1f} | {agree:.1%} | {exact / len(paths):.1%} |")
    return rows


# ---- 3. serving: /v1/chat/completions vs /caption ----


def start_server(model_dir: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "captioner.cli", "serve", str(model_dir), "--port", str(port)]
    cmd += ["--max_batch_size", "16", "--max_wait_ms", "5"]
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


async def load(url: str, path: str, bodies: list, n: int, concurrency: int, ok) -> dict:
    """`concurrency` clients, each sending its next request when its last one returns."""
    latencies: list[float] = []
    errors = 0
    counter = iter(range(n))
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async def client_loop(client: httpx.AsyncClient) -> None:
        nonlocal errors
        for i in counter:
            content, headers = bodies[i % len(bodies)]
            t = time.perf_counter()
            try:
                r = await client.post(path, content=content, headers=headers)
                good = r.status_code == 200 and ok(r.json())
            except httpx.HTTPError:
                good = False
            latencies.append(time.perf_counter() - t)
            errors += not good

    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as client:
        content, headers = bodies[0]
        await client.post(path, content=content, headers=headers)  # warm-up
        start = time.perf_counter()
        await asyncio.gather(*(client_loop(client) for _ in range(concurrency)))
        wall = time.perf_counter() - start
    latencies.sort()
    return {
        "rps": n / wall,
        "p50_ms": 1000 * statistics.median(latencies),
        "p99_ms": 1000 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
        "errors": errors,
    }


def serve(requests: int, concurrency: list[int], work: Path) -> list[dict]:
    from captioner.models.build import build_preset

    model_dir = build_preset("tiny", CAPTIONS, work / "serve-tiny")
    payloads = images()
    tokens = 20
    caption_bodies = [
        multipart(f"{i}.png", p, {"max_new_tokens": str(tokens)}) for i, p in enumerate(payloads)
    ]
    chat_bodies = []
    for p in payloads:
        url = "data:image/png;base64," + base64.b64encode(p).decode()
        body = {
            "model": str(model_dir),
            "max_tokens": tokens,
            "messages": [
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}
            ],
        }
        chat_bodies.append((json.dumps(body).encode(), {"content-type": "application/json"}))
    endpoints = [
        ("/caption", caption_bodies, lambda b: isinstance(b.get("caption"), str)),
        ("/v1/chat/completions", chat_bodies, lambda b: b["object"] == "chat.completion"),
    ]
    print(f"\n### Serving: tiny, random weights, {tokens} new tokens, {requests} requests/row\n")
    print("| endpoint | concurrency | req/s | p50 ms | p99 ms | errors |")
    print("|---|---:|---:|---:|---:|---:|")
    rows = []
    proc, url = start_server(model_dir)
    try:
        for c in concurrency:
            for path, bodies, ok in endpoints:
                r = asyncio.run(load(url, path, bodies, requests, c, ok))
                rows.append({"endpoint": path, "concurrency": c, **r})
                print(
                    f"| {path} | {c} | {r['rps']:.1f} | {r['p50_ms']:.0f} | {r['p99_ms']:.0f} | "
                    f"{r['errors']} |"
                )
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--presets", nargs="+", default=["tiny", "small"])
    ap.add_argument("--n", type=int, default=300, help="images per mode (speed)")
    ap.add_argument("--guide_n", type=int, default=100, help="images through the guide's loop")
    ap.add_argument("--threads", type=int, default=1, help="torch / ONNX Runtime threads")
    ap.add_argument("--steps", type=int, nargs=2, default=[300, 150], help="tiny, small")
    ap.add_argument("--test_n", type=int, default=300, help="held-out scenes (trained)")
    ap.add_argument("--requests", type=int, default=300, help="per serving row")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--skip", nargs="*", default=[], choices=["speed", "trained", "serve"])
    ap.add_argument("--json", type=Path, help="also write every row here")
    args = ap.parse_args()

    import logging

    import torch
    from transformers.utils import logging as hf_logging

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.disable(logging.WARNING)
    hf_logging.disable_progress_bar()
    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="precision_bench_"))
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    print(
        f"# {when} | {platform.machine()} | {os.cpu_count()} CPUs | torch {torch.__version__} | "
        f"threads {args.threads or 'default'}\n# before: {uptime()}"
    )
    started = time.perf_counter()
    results: dict[str, list] = {}
    if "speed" not in args.skip:
        results["speed"] = speed(args.presets, args.n, args.guide_n, args.threads, work)
    if "trained" not in args.skip:
        steps = dict(zip(("tiny", "small"), args.steps, strict=True))
        results["trained"] = trained(args.presets, steps, args.test_n, work)
    if "serve" not in args.skip:
        results["serve"] = serve(args.requests, args.concurrency, work)
    print(f"\n# after: {uptime()} | {time.perf_counter() - started:.0f} s in all")
    print("# * agreement on random weights is not meaningful (near-tied logits everywhere)")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
