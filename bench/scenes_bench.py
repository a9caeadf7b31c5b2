"""How long `generate_scenes` takes for 2,000 scenes of each difficulty ("2,000 images in
well under a minute"). Usage: `.venv/bin/python bench/scenes_bench.py`; prints a Markdown table."""

from __future__ import annotations

import os
import platform
import tempfile
import time

from captioner.data.scenes import SETTINGS, generate_scenes


def main() -> None:
    print(
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} · {platform.machine()} · "
        f"{os.cpu_count()} cores"
    )
    print("| difficulty | image size | scenes | seconds | scenes/s |\n|---|---:|---:|---:|---:|")
    for name, setting in SETTINGS.items():
        with tempfile.TemporaryDirectory() as out:
            start = time.perf_counter()
            generate_scenes(out, n=2000, seed=0, difficulty=name)
            took = time.perf_counter() - start
        print(f"| {name} | {setting.image_size} | 2000 | {took:.1f} | {2000 / took:.0f} |")


if __name__ == "__main__":
    main()
