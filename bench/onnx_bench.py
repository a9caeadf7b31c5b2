"""ONNX export against torch, whole `captioner caption` command: images/s and greedy captions
identical to torch float32, per model.

    .venv/bin/python bench/onnx_bench.py runs/demo/model runs/demo/scenes --n 1000
    .venv/bin/python bench/onnx_bench.py MODEL IMAGES --modes float32 onnx onnx-int8

Each mode is one `captioner caption MODEL @list -o rows.jsonl` subprocess on the same `--n`
images (sorted), timed from start to exit (startup, loading, decoding, writing: what a user
waits for). The ONNX folders are exported first (not timed). The modes run in `--rounds` rounds,
every other one in reverse order, so that a load that moves steadily weighs on every mode alike;
a mode's images/s is its total images over its total seconds. Prints a markdown table for
bench/RESULTS.md, with `uptime` before and after.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "captioner.cli"]
# float32 reuses the feature cache training filled (the tower does not run for those images);
# float32-pixels runs the tower on every image, as bfloat16, int8 and the ONNX exports do.
FLAGS = {
    "float32": [],
    "float32-pixels": ["--feature_cache", "off"],
    "bfloat16": ["--dtype", "bfloat16"],
    "int8": ["--int8"],
}


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def cpu_seconds() -> float:
    """User + system CPU of every finished child (the command and its loader worker)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def caption(model: Path, listing: Path, out: Path, flags: list[str]):
    """(wall s, CPU s, captions in image order) of one command."""
    out.unlink(missing_ok=True)
    start, cpu = time.perf_counter(), cpu_seconds()
    subprocess.run([*CLI, "caption", str(model), f"@{listing}", "-o", str(out),
                    "--no_progress", *flags], check=True, capture_output=True)  # fmt: skip
    seconds, cpu = time.perf_counter() - start, cpu_seconds() - cpu
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    return seconds, cpu, [r.get("caption") for r in sorted(rows, key=lambda r: r["image"])]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("images", type=Path, help="a folder of images")
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--modes", nargs="+",
                        default=["float32", "bfloat16", "int8", "onnx", "onnx-int8"])  # fmt: skip
    parser.add_argument("--rounds", type=int, default=2)
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
    modes = ["float32", *[m for m in args.modes if m != "float32"]]
    order = [m for r in range(args.rounds) for m in (modes if r % 2 == 0 else modes[::-1])]
    seconds: dict[str, list[float]] = {}
    cpu: dict[str, list[float]] = {}
    captions: dict[str, list[str]] = {}
    for mode in order:
        s, c, captions[mode] = caption(models[mode], listing, work / f"{mode}.jsonl",
                                       FLAGS.get(mode, []))  # fmt: skip
        seconds.setdefault(mode, []).append(s)
        cpu.setdefault(mode, []).append(c)
        print(f"{mode}: {s:.1f} s, {c:.1f} CPU s ({uptime()})", file=sys.stderr)
    print(f"after: {uptime()}")

    def rate(mode: str, table: dict[str, list[float]]) -> float:
        return len(paths) * len(table[mode]) / sum(table[mode])

    print(f"\n{args.model} ({len(paths)} images)\n")
    print("| mode | wall s per run | images/s | × torch float32 | images per CPU-s | × | "
          "identical to torch float32 |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|")
    for mode in modes:
        same = sum(a == b for a, b in zip(captions["float32"], captions[mode], strict=True))
        runs = " / ".join(f"{s:.1f}" for s in seconds[mode])
        wall, per_cpu = rate(mode, seconds), rate(mode, cpu)
        print(f"| {mode} | {runs} | {wall:.1f} | {wall / rate('float32', seconds):.2f}× | "
              f"{per_cpu:.1f} | {per_cpu / rate('float32', cpu):.2f}× | "
              f"{same / len(paths):.1%} |")  # fmt: skip


if __name__ == "__main__":
    main()
