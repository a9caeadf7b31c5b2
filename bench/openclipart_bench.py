"""The second real-drawing set (issue 18, part 5), so nothing is tuned to the icon themes alone:
Open Clip Art drawings captioned by their human titles, trained on some artists and tested on
artists never trained on.

    .venv/bin/python bench/openclipart_bench.py build                  # apt download + render
    .venv/bin/python bench/openclipart_bench.py run --recipe baseline  # icons_bench's recipes
    .venv/bin/python bench/openclipart_bench.py table

`build` downloads `openclipart-svg` (for each drawing's `dc:title` and creator, read from its
`cc:Work`) and `openclipart-png` (the drawings) with `apt-get download`, unpacks them with
`dpkg-deb -x` and renders each PNG at 128 px on white. Titles are lowercased and kept when they
are 1-6 plain words, not a collection's title (used by more than 3 files, or naming a theme,
icon set, collection or clip art library) and not the creator's name. Splits, by artist (seeded):
`train`, and `held_out_artists` (20 % of the images: artists never trained on; its
`seen_titles` part has titles that also occur in training, the rest are new).
"""

from __future__ import annotations

import argparse
import json
import random
import re
import shutil
import sys
import time
from collections import Counter, defaultdict
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import icons_bench  # noqa: E402  (its downloader, renderer and recipes)

OUT = icons_bench.ROOT / "bench" / "out" / "openclipart"
PACKAGES = ("openclipart-svg", "openclipart-png")
HELD_OUT = 0.2
COLLECTION = re.compile(
    r"open ?clip ?art|collection|clip ?art|public domain|theme|icons?\b|iconset|untitled|"
    r"^image|^drawing|^svg|^various",
    re.I,
)
PLAIN = re.compile(r"[A-Za-z][A-Za-z ,'\-]*")


def titles(svg_root: Path) -> dict[str, tuple[str, str]]:
    """relative path without suffix -> (title, creator) from each SVG's `cc:Work`."""
    found = {}
    for f in svg_root.rglob("*.svg"):
        work = re.search(r"<cc:Work\b.*?</cc:Work>", f.read_text(errors="ignore"), re.S)
        if not work:
            continue
        title = re.search(r"<dc:title>([^<]*)</dc:title>", work.group(0))
        creator = re.search(r"<dc:creator>.*?<dc:title>([^<]*)</dc:title>", work.group(0), re.S)
        found[str(f.relative_to(svg_root).with_suffix(""))] = (
            title.group(1).strip() if title else "",
            creator.group(1).strip() if creator else "",
        )
    return found


def usable(found: dict[str, tuple[str, str]]) -> dict[str, tuple[str, str]]:
    uses = Counter(t.lower() for t, _ in found.values())
    keep = {}
    for key, (title, creator) in found.items():
        words = title.replace("-", " ").replace("_", " ").replace(",", " ").lower().split()
        if not (title and PLAIN.fullmatch(title) and 1 <= len(words) <= 6):
            continue
        if COLLECTION.search(title) or uses[title.lower()] > 3 or title == creator:
            continue
        keep[key] = (" ".join(words), creator or "unknown")
    return keep


def build(out: Path, seed: int = 0, workers: int = 2) -> dict:
    start = time.time()
    debs, unpacked = out / "debs", out / "unpacked"
    icons_bench._download(debs, list(PACKAGES))
    svg_root = icons_bench._unpack(debs, PACKAGES[0], unpacked) / "usr/share/openclipart/svg"
    png_root = icons_bench._unpack(debs, PACKAGES[1], unpacked) / "usr/share/openclipart/png"
    keep = {k: v for k, v in usable(titles(svg_root)).items() if (png_root / f"{k}.png").exists()}
    keys = sorted(keep)
    with ProcessPoolExecutor(workers) as pool:
        pngs = list(pool.map(icons_bench.render, [str(png_root / f"{k}.png") for k in keys]))
    by_artist: dict[str, list[tuple[str, bytes]]] = defaultdict(list)
    for key, png in zip(keys, pngs, strict=True):
        if png is not None:
            by_artist[keep[key][1]].append((keep[key][0], png))
    artists = sorted(by_artist)
    random.Random(seed).shuffle(artists)
    total = sum(len(v) for v in by_artist.values())
    splits: dict[str, list[tuple[str, bytes]]] = {"train": [], "held_out_artists": []}
    held = 0
    for artist in artists:
        # big artists stay in training: one would otherwise be most of the test split
        if held < HELD_OUT * total and len(by_artist[artist]) <= 0.05 * total:
            splits["held_out_artists"] += by_artist[artist]
            held += len(by_artist[artist])
        else:
            splits["train"] += by_artist[artist]
    train_titles = {t for t, _ in splits["train"]}
    stats = {"splits": {}, "artists": len(artists)}
    for split, items in splits.items():
        folder = out / split
        shutil.rmtree(folder, ignore_errors=True)
        (folder / "img").mkdir(parents=True)
        with open(folder / "captions.jsonl", "w") as f:
            for i, (title, png) in enumerate(items):
                (folder / f"img/{i:05d}.png").write_bytes(png)
                row = {"image": f"img/{i:05d}.png", "captions": [title],
                       "seen_title": title in train_titles}  # fmt: skip
                f.write(json.dumps(row) + "\n")
        stats["splits"][split] = {"images": len(items), "titles": len({t for t, _ in items})}
    seen = sum(t in train_titles for t, _ in splits["held_out_artists"])
    stats["held_out_artists_seen_titles"] = seen
    stats["seconds"] = round(time.time() - start, 1)
    (out / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    return stats


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("build").add_argument("--seed", type=int, default=0)
    r = sub.add_parser("run")
    r.add_argument("--recipe", required=True, choices=sorted(icons_bench.RECIPES))
    r.add_argument("--epochs", type=float, default=None)
    sub.add_parser("table")
    args = parser.parse_args(argv)
    if args.cmd == "build":
        print(json.dumps(build(OUT, args.seed), indent=2))
    elif args.cmd == "run":
        print(json.dumps(icons_bench.run(OUT, args.recipe, args.epochs), indent=2))
    else:
        print(icons_bench.table(OUT))


if __name__ == "__main__":
    main()
