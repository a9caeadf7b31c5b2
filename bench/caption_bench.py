"""Captioning throughput: the guide's loop vs the `Captioner` engine, same model, same images.

    python bench/caption_bench.py                 # tiny + small presets, 500 images each side
    python bench/caption_bench.py --n 100 --presets tiny

The guide captions one image at a time: PIL open, `processor(images=...)`,
`model.generate(pixel_values, max_length=50)`, `batch_decode`. The engine gets the same paths and
an automatic batch size. Both sides generate the same number of tokens (`max_length=50` is 49 new
tokens after GIT's [CLS]; the engine gets `max_new_tokens=49`) and their greedy captions are
compared, so the speed-up is not bought with shorter or different captions. Presets are built
from scratch (random weights: they never emit [SEP], so every caption runs the full 49 tokens on
both sides). Each side runs in its own subprocess so its peak RSS is its own; the clock starts
after the model has loaded and stops when the last caption is decoded.

`--threads` (default 1) sets torch's intra-op threads on both sides. On a shared 2-core machine
two OpenMP threads per process oversubscribe the cores and every op waits at barriers: measured
here under load ~8, the engine ran at 45 images/s with 1 thread and 4 with 2.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

print = functools.partial(print, flush=True)  # noqa: A001 (rows appear as each side ends)

CAPTIONS = [
    f"a {c} {s} {where} a {bg} background"
    for c in ("red", "green", "blue", "white", "yellow")
    for s in ("circle", "square", "triangle", "star")
    for where in ("on", "in front of")
    for bg in ("black", "gray", "striped")
]


def make_images(folder: Path, n: int, size: int = 256) -> list[Path]:
    """`n` distinct JPEGs (photo-sized decode work, unlike 48 px test images)."""
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        img = Image.new("RGB", (size, size), (40 + i % 170, 90, 140 - i % 90))
        draw = ImageDraw.Draw(img)
        for k in range(4):
            x, y = (i * 37 + k * 53) % (size - 60), (i * 17 + k * 71) % (size - 60)
            draw.ellipse(
                [x, y, x + 30 + k * 8, y + 30 + k * 5], fill=(k * 60, 255 - k * 50, i % 255)
            )
        paths.append(folder / f"img_{i:04d}.jpg")
        img.save(paths[-1], quality=90)
    return paths


def run_side(
    side: str, model_dir: str, paths: list[str], batch_size: int | None, threads: int
) -> dict:
    """One side, in this process: returns images/s, peak RSS and the captions."""
    import torch

    if threads:
        torch.set_num_threads(threads)

    from captioner.models.build import load_model

    model, processor = load_model(model_dir)
    model.eval()
    if side == "guide":
        from PIL import Image

        start = time.perf_counter()
        captions = []
        for path in paths:  # the guide's inference cell, once per image
            image = Image.open(path)
            inputs = processor(images=image, return_tensors="pt")
            ids = model.generate(pixel_values=inputs.pixel_values, max_length=50)
            captions.append(processor.batch_decode(ids, skip_special_tokens=True)[0])
        seconds = time.perf_counter() - start
        chosen = 1
    else:
        from captioner.engine import Captioner

        captioner = Captioner(model, processor, device="cpu")
        chosen = batch_size or captioner.auto_batch_size(1, 49)
        start = time.perf_counter()
        captions = captioner.caption(paths, batch_size=chosen, max_new_tokens=49)
        seconds = time.perf_counter() - start
    return {
        "side": side,
        "images": len(paths),
        "seconds": seconds,
        "images_per_s": len(paths) / seconds,
        "batch_size": chosen,
        "torch_threads": torch.get_num_threads(),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "worker_peak_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
        "captions": [" ".join(c.split()) for c in captions],
    }


def subprocess_side(
    side: str, model_dir: Path, paths: list[Path], batch_size: int | None, threads: int
) -> dict:
    listing = Path(tempfile.mkstemp(suffix=".txt")[1])
    listing.write_text("\n".join(map(str, paths)))
    cmd = [sys.executable, __file__, "--side", side, "--model", str(model_dir)]
    cmd += ["--threads", str(threads)]
    cmd += ["--list", str(listing)] + (["--batch_size", str(batch_size)] if batch_size else [])
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
    listing.unlink()
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=500, help="images per side")
    parser.add_argument("--presets", nargs="+", default=["tiny", "small"])
    parser.add_argument("--batch_size", type=int, default=None, help="engine; default automatic")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    parser.add_argument("--side", choices=["guide", "engine"], help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--list", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:  # child process: one side, JSON on the last stdout line
        paths = Path(args.list).read_text().splitlines()
        print(json.dumps(run_side(args.side, args.model, paths, args.batch_size, args.threads)))
        return

    import logging

    from captioner.models.build import build_preset

    logging.disable(logging.WARNING)
    work = Path(tempfile.mkdtemp(prefix="caption_bench_"))
    paths = make_images(work / "images", args.n)
    load = os.getloadavg()[0]
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    print(
        f"# {when} | {platform.machine()} | {os.cpu_count()} CPUs | load average {load:.1f} | "
        f"{args.n} images 256x256 JPEG | torch threads {args.threads or 'default'}\n"
    )
    print("| preset | side | batch | images/s | peak RSS MB (main + worker) | speed-up |")
    print("|---|---|---|---|---|---|")
    notes = []
    for preset in args.presets:
        model_dir = build_preset(preset, CAPTIONS, work / preset)
        guide = subprocess_side("guide", model_dir, paths, None, args.threads)
        engine = subprocess_side("engine", model_dir, paths, args.batch_size, args.threads)
        same = sum(a == b for a, b in zip(guide["captions"], engine["captions"], strict=True))
        for r in (guide, engine):
            rss = f"{r['peak_rss_mb']:.0f}" + (
                f" + {r['worker_peak_rss_mb']:.0f}" if r["worker_peak_rss_mb"] > 1 else ""
            )
            speedup = r["images_per_s"] / guide["images_per_s"]
            print(
                f"| {preset} | {r['side']} | {r['batch_size']} | {r['images_per_s']:.2f} | {rss} "
                f"| {speedup:.1f}x |"
            )
        notes.append(f"{preset}: identical greedy captions on {same}/{args.n} images")
    print("\n" + "; ".join(notes) + f"; load average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
