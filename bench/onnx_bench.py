"""ONNX export against torch, whole `captioner caption` command: images/s and greedy captions
identical to torch float32, per model.

    .venv/bin/python bench/onnx_bench.py runs/demo/model runs/demo/scenes --n 1000
    .venv/bin/python bench/onnx_bench.py MODEL IMAGES --modes float32 onnx onnx-int8

Each mode is one `captioner caption MODEL @list -o rows.jsonl` subprocess on the same `--n`
images (sorted), timed from start to exit (startup, loading, decoding, writing: what a user
waits for). The ONNX folders are exported first (not timed). torch float32 runs first and again
last, so that a load that moved during the run shows; its mean is the 1.0x. Prints a markdown
table for bench/RESULTS.md, with `uptime` before and after.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "captioner.cli"]
FLAGS = {"float32": [], "bfloat16": ["--dtype", "bfloat16"], "int8": ["--int8"]}


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def caption(model: Path, listing: Path, out: Path, flags: list[str]) -> tuple[float, list[str]]:
    out.unlink(missing_ok=True)
    start = time.perf_counter()
    subprocess.run([*CLI, "caption", str(model), f"@{listing}", "-o", str(out),
                    "--no_progress", *flags], check=True, capture_output=True)  # fmt: skip
    seconds = time.perf_counter() - start
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    return seconds, [r.get("caption") for r in sorted(rows, key=lambda r: r["image"])]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("images", type=Path, help="a folder of images")
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--modes", nargs="+",
                        default=["float32", "bfloat16", "int8", "onnx", "onnx-int8"])  # fmt: skip
    parser.add_argument("--work", type=Path, default=ROOT / "bench/out/onnx_bench")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    from captioner.models.export import export_onnx

    work = args.work / args.model.name
    work.mkdir(parents=True, exist_ok=True)
    paths = sorted(p for p in args.images.rglob("*") if p.suffix in (".png", ".jpg"))[: args.n]
    listing = work / "images.txt"
    listing.write_text("".join(f"{p.resolve()}\n" for p in paths))
    models = {m: args.model for m in FLAGS}
    for mode, int8 in (("onnx", False), ("onnx-int8", True)):
        if mode in args.modes:
            start = time.perf_counter()
            models[mode] = export_onnx(args.model, work / mode, int8=int8, overwrite=True)
            print(f"exported {mode} in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    print(f"before: {uptime()}")
    order = ["float32", *[m for m in args.modes if m != "float32"], "float32"]
    seconds: dict[str, list[float]] = {}
    captions: dict[str, list[str]] = {}
    for mode in order:
        s, captions[mode] = caption(models[mode], listing, work / f"{mode}.jsonl",
                                    FLAGS.get(mode, []))  # fmt: skip
        seconds.setdefault(mode, []).append(s)
        print(f"{mode}: {s:.1f} s", file=sys.stderr)
    print(f"after: {uptime()}")
    base = len(paths) / (sum(seconds["float32"]) / len(seconds["float32"]))
    print(f"\n{args.model} ({len(paths)} images)\n")
    print("| mode | wall s | images/s | × torch float32 | identical to torch float32 |")
    print("|---|---:|---:|---:|---:|")
    for mode in dict.fromkeys(order):
        wall = sum(seconds[mode]) / len(seconds[mode])
        same = sum(a == b for a, b in zip(captions["float32"], captions[mode], strict=True))
        runs = " / ".join(f"{s:.1f}" for s in seconds[mode])
        print(f"| {mode} | {runs} | {len(paths) / wall:.1f} | {len(paths) / wall / base:.2f}× "
              f"| {same / len(paths):.1%} |")  # fmt: skip


if __name__ == "__main__":
    main()
