"""Data hygiene: duplicated images, train/test leakage and caption problems, listed by file.

`check_hygiene(source)` loads the source as training will (`load_captions` with the same
`test_size` and `seed`, so "test" is the held-out split training and evaluation will really use)
and reads every image once: a SHA-256 of its bytes finds exact duplicates, and a perceptual hash
(`imagehash.phash`, 64 bits) compared by Hamming distance finds near-duplicates (resized,
re-encoded, lightly edited copies). A group of copies that spans splits is a train/test leak: the
held-out score then partly measures memorisation. Captions are checked too: one caption shared
by different images, captions with no word in them, and (when asked) captions over a word limit.

`write_clean_manifest(report, path)` writes a CSV/JSONL manifest of the same data with one image
per group of copies (their captions merged) and the empty/overlong captions left out, without
touching the originals; every loader reads it like any other manifest.

Near-duplicates are found by comparing every pair of hashes with vectorised XOR + popcount in
blocks (about 10^9 pairs a second), which is quadratic but simple and exact; 100,000 images
take seconds.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
import re
import shutil
import stat
from collections import defaultdict
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import imagehash
import numpy as np
from PIL import Image

from captioner.data.images import DEFAULT_MAX_PIXELS, decode_rgb, open_checked
from captioner.data.sources import load_captions
from captioner.errors import BadImageError, CaptionerError

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)

log = logging.getLogger(__name__)

DEFAULT_NEAR_THRESHOLD = 6  # pHash bits that may differ; resized + re-encoded copies differ by 0-4
LEAK = "train/test leak"
EXACT = "exact duplicate"
NEAR = "near-duplicate"
EMPTY = "empty caption"
LONG = "overlong caption"
SHARED = "shared caption"
KIND_ORDER = (LEAK, EXACT, NEAR, EMPTY, LONG, SHARED)
# Findings that are worth a look but are often fine (many images may truly be "a red circle").
NOTE_KINDS = (SHARED,)
# pHash sees luminance structure only: a yellow star on gray and a green star on black hash
# alike. Near-duplicates must also match in colour: the mean difference of their 4x4 RGB
# thumbnails (0-255) at most this; resizing and JPEG re-encoding move it by a few units.
COLOUR_TOLERANCE = 24
_COLOUR_GRID = (4, 4)
# JPEG decodes at 1/2..1/8 scale for free; pHash looks at 32x32 pixels anyway.
_DRAFT_SIZE = 256
_BATCH = 256
_PAIRS_PER_BLOCK = 1 << 22  # hash comparisons held in memory at once (32 MB of uint64)
_WORD = re.compile(r"\w")
_MANIFEST_SUFFIXES = (".csv", ".jsonl")


@dataclass
class Item:
    """One image row of the checked data."""

    split: str
    index: int
    file: str
    captions: list[str]
    digest: str | None = None  # SHA-256 of the image file's bytes
    phash: int | None = None  # 64-bit perceptual hash
    colour: np.ndarray | None = field(default=None, repr=False)  # 4x4 RGB thumbnail
    error: str | None = None  # why the image could not be read (then it is not compared)

    @property
    def label(self) -> str:
        return f"{self.file} [{self.split}]"


@dataclass
class Finding:
    kind: str
    items: list[Item]
    detail: str

    @property
    def files(self) -> list[str]:
        return [item.file for item in self.items]


@dataclass
class HygieneReport:
    source: str
    items: list[Item]
    findings: list[Finding]
    splits: Mapping[str, Any] = field(repr=False)  # the datasets checked (for the manifest)
    near_threshold: int | None = DEFAULT_NEAR_THRESHOLD
    max_caption_words: int | None = None

    @property
    def problems(self) -> list[Finding]:
        """Leaks, duplicates and bad captions: what should be fixed before training."""
        return [f for f in self.findings if f.kind not in NOTE_KINDS]

    @property
    def notes(self) -> list[Finding]:
        return [f for f in self.findings if f.kind in NOTE_KINDS]

    @property
    def unreadable(self) -> list[Item]:
        return [item for item in self.items if item.error is not None]

    def files(self, kinds: tuple[str, ...] | None = None) -> set[str]:
        """Every file some finding (of `kinds`) names."""
        return {file for f in self.findings if kinds is None or f.kind in kinds for file in f.files}

    def counts(self) -> dict[str, int]:
        found: dict[str, int] = defaultdict(int)
        for f in self.findings:
            found[f.kind] += 1
        return {kind: found[kind] for kind in KIND_ORDER if found[kind]}

    def rows(self, max_files: int = 8) -> list[tuple[str, str, str]]:
        """(kind, files one per line with their split, detail) for a table; a long group of
        files is cut to `max_files` lines plus a count."""
        out = []
        for f in self.findings:
            labels = [item.label for item in f.items]
            if len(labels) > max_files:
                labels = labels[: max_files - 1] + [f"... and {len(labels) - max_files + 1} more"]
            out.append((f.kind, "\n".join(labels), f.detail))
        return out

    def summary(self) -> str:
        sizes = defaultdict(int)
        for item in self.items:
            sizes[item.split] += 1
        where = ", ".join(f"{k} {n}" for k, n in sizes.items())
        counts = self.counts()
        found = ", ".join(f"{n} {kind}{'' if n == 1 else 's'}" for kind, n in counts.items())
        unreadable = f", {len(self.unreadable)} unreadable" if self.unreadable else ""
        return f"hygiene of {len(self.items)} images ({where}){unreadable}: {found or 'clean'}"


def check_hygiene(
    source: str | os.PathLike | Mapping[str, Any],
    *,
    near_threshold: int | None = DEFAULT_NEAR_THRESHOLD,
    max_caption_words: int | None = None,
    test_size: float | int = 0.1,
    seed: int = 0,
    image_column: str | None = None,
    caption_column: str | None = None,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    workers: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> HygieneReport:
    """Find duplicated and leaked images and caption problems in `source`.

    `source`: anything `load_captions` reads (split with `test_size`/`seed` exactly as training
    splits it), or a mapping of split name -> dataset with `image` and `captions` columns.
    `near_threshold`: the largest pHash Hamming distance that counts as a near-duplicate (None
    or negative: exact duplicates only). `max_caption_words`: also report longer captions.
    `progress` is called with the number of images hashed after each batch.
    """
    if isinstance(source, Mapping):
        splits, name = dict(source), "<datasets>"
    else:
        name = str(source)
        splits = dict(
            load_captions(
                source,
                image_column=image_column,
                caption_column=caption_column,
                test_size=test_size,
                seed=seed,
                max_pixels=max_pixels,
            )
        )
    items = _fingerprint_all(splits, max_pixels, workers, progress)
    readable = [item for item in items if item.error is None]
    by_digest: dict[str, list[Item]] = defaultdict(list)
    for item in readable:
        by_digest[item.digest].append(item)
    findings = [
        _copies(group, EXACT, "identical files") for group in by_digest.values() if len(group) > 1
    ]
    if near_threshold is not None and near_threshold >= 0:
        findings += _near_duplicates(by_digest, near_threshold)
    findings += _caption_findings(items, by_digest, max_caption_words)
    findings.sort(key=lambda f: KIND_ORDER.index(f.kind))
    return HygieneReport(name, items, findings, splits, near_threshold, max_caption_words)


# --- reading and hashing every image once ---


def _fingerprint_all(splits, max_pixels, workers, progress) -> list[Item]:
    import datasets

    items: list[Item] = []
    workers = workers or min(8, len(os.sched_getaffinity(0)))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for split, ds in splits.items():
            if len(ds) == 0:
                continue
            ds = ds.cast_column("image", datasets.Image(decode=False))
            index = 0
            for batch in ds.iter(batch_size=_BATCH):
                jobs = []
                for src, captions in zip(batch["image"], batch["captions"], strict=True):
                    item = Item(split, index, _file_name(src, split, index), list(captions))
                    jobs.append((item, src))
                    index += 1
                for item in pool.map(lambda job: _fingerprint(*job, max_pixels), jobs):
                    items.append(item)
                if progress is not None:
                    progress(len(jobs))
    return items


def _fingerprint(item: Item, src: dict, max_pixels: int | None) -> Item:
    try:
        data = _image_bytes(src, item.file)
        item.digest = hashlib.sha256(data).hexdigest()
        with open_checked({"bytes": data, "path": item.file}, max_pixels) as img:
            img.draft("RGB", (_DRAFT_SIZE, _DRAFT_SIZE))  # a no-op for formats other than JPEG
            rgb = decode_rgb(img, item.file)
        item.phash = _to_int(imagehash.phash(rgb))
        item.colour = np.asarray(rgb.resize(_COLOUR_GRID, Image.Resampling.BOX), np.int16).ravel()
    except BadImageError as err:
        item.error = err.reason
        log.warning("hygiene: skipping %s: %s", item.file, err.reason)
    return item


def _image_bytes(src: dict, name: str) -> bytes:
    if src.get("bytes") is not None:
        return bytes(src["bytes"])
    path = src.get("path")
    if not path:
        raise BadImageError(name, "no image data")
    try:
        # O_NONBLOCK: a FIFO named like an image must not hang the check
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        with open(fd, "rb") as file:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise BadImageError(name, "not a regular file")
            if hasattr(os, "set_blocking"):
                os.set_blocking(fd, True)
            return file.read()
    except OSError as err:
        raise BadImageError(name, f"cannot read ({err.strerror or err})") from None


def _file_name(src: dict, split: str, index: int) -> str:
    return str(src.get("path") or f"<{split}[{index}]>")


def _to_int(h: imagehash.ImageHash) -> int:
    return int.from_bytes(np.packbits(np.asarray(h.hash, dtype=bool).ravel()).tobytes(), "big")


# --- duplicates ---


def _copies(group: list[Item], kind: str, how: str, distance: int | None = None) -> Finding:
    splits = list(dict.fromkeys(item.split for item in group))
    near = f" (pHash distance <= {distance})" if distance is not None else ""
    if len(splits) > 1:
        return Finding(LEAK, group, f"{how}{near} in {' and '.join(splits)}")
    return Finding(kind, group, f"{len(group)} {how}{near}")


def _near_duplicates(by_digest: dict[str, list[Item]], threshold: int) -> list[Finding]:
    """Groups of distinct files whose hashes are within `threshold` bits and whose colours
    match (linked pairs, so a chain of small edits is one group). Each group lists every copy of
    its files, so a near copy of an image whose exact twin sits in the other split is a leak."""
    groups = list(by_digest.values())
    if len(groups) < 2:
        return []
    hashes = np.array([g[0].phash for g in groups], dtype=np.uint64)
    colours = np.stack([g[0].colour for g in groups])
    parent = list(range(len(groups)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    linked: dict[int, int] = {}  # group index -> largest distance of a link it takes part in
    rows = max(1, _PAIRS_PER_BLOCK // len(hashes))
    for start in range(0, len(hashes), rows):
        block = _popcount(hashes[start : start + rows, None] ^ hashes[None, :])
        for i, j in zip(*np.nonzero(block <= threshold), strict=True):
            i = int(i) + start
            j = int(j)
            if j <= i or np.abs(colours[i] - colours[j]).max() > COLOUR_TOLERANCE:
                continue
            d = int(block[i - start, j])
            linked[i] = max(linked.get(i, 0), d)
            linked[j] = max(linked.get(j, 0), d)
            parent[root(i)] = root(j)
    members: dict[int, list[int]] = defaultdict(list)
    for i in sorted(linked):
        members[root(i)].append(i)
    findings = []
    for indices in members.values():
        group = [item for i in indices for item in groups[i]]
        distance = max(linked[i] for i in indices)
        findings.append(_copies(group, NEAR, "similar images", distance))
    return findings


def _popcount(x: np.ndarray) -> np.ndarray:
    if hasattr(np, "bitwise_count"):  # numpy >= 2.0
        return np.bitwise_count(x)
    table = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)
    return table[x[..., None].view(np.uint8)].sum(-1)


# --- captions ---


def _caption_findings(items, by_digest, max_words: int | None) -> list[Finding]:
    findings = []
    shared: dict[str, list[Item]] = defaultdict(list)
    for item in items:
        for caption in item.captions:
            if not _WORD.search(caption):
                findings.append(Finding(EMPTY, [item], f"caption {caption!r} has no words"))
                continue
            words = len(caption.split())
            if max_words is not None and words > max_words:
                short = caption if len(caption) <= 60 else caption[:57] + "..."
                findings.append(Finding(LONG, [item], f"{words} words > {max_words}: {short!r}"))
            key = _normalise(caption)
            if not shared[key] or shared[key][-1] is not item:
                shared[key].append(item)
    # one finding per set of images, listing the captions they share
    by_images: dict[tuple[int, ...], tuple[list[Item], list[str]]] = {}
    for key, group in shared.items():
        # copies of one file share their captions by being copies: reported as duplicates
        if len(group) > 1 and len({item.digest or id(item) for item in group}) > 1:
            by_images.setdefault(tuple(map(id, group)), (group, []))[1].append(key)
    for group, keys in by_images.values():
        shown = ", ".join(repr(k) for k in keys[:3]) + (f" (+{len(keys) - 3})" if keys[3:] else "")
        findings.append(Finding(SHARED, group, f"{len(group)} images share {shown}"))
    return findings


def _normalise(caption: str) -> str:
    return " ".join(caption.lower().split()).rstrip(".!?;:, ")


# --- the cleaned manifest ---


@dataclass
class CleanManifest:
    path: Path
    rows: int
    dropped: list[str]  # files left out: extra copies, leaked copies, images left without caption
    copied_to: Path | None = None  # where images outside the manifest's folder were copied


def write_clean_manifest(report: HygieneReport, out_path: str | os.PathLike) -> CleanManifest:
    """Write a manifest (.csv or .jsonl, by suffix) of `report`'s data with one image per group of
    copies (the first, train before test; the group's captions merged), empty captions and
    captions over `max_caption_words` removed, and unreadable images left out.

    Paths are relative to the manifest, as manifests need: images under its folder are referred
    to where they are; others (elsewhere on disk, inside shards or Hub datasets) are copied into
    `<manifest stem>_images/` beside it, a folder made new for them (files created with O_EXCL |
    O_NOFOLLOW through its descriptor: no link followed, nothing overwritten). Nothing existing
    is modified: an existing `out_path` or images folder is an error. Note that a folder source
    holding exactly one manifest is read as that manifest, so write this one elsewhere than into
    such a folder.
    """
    out = Path(out_path).expanduser()
    suffix = out.suffix.lower()
    if suffix not in _MANIFEST_SUFFIXES:
        raise CaptionerError(f"{out}: the cleaned manifest must be a .csv or .jsonl file")
    if os.path.lexists(out):
        raise CaptionerError(f"{out}: already exists; name a new file (originals stay untouched)")
    keep, dropped = _plan(report)
    images = _undecoded(report.splits)
    root = out.parent.resolve()
    root.mkdir(parents=True, exist_ok=True)
    planned = [(captions, images[item.split][item.index]["image"]) for item, captions in keep]
    places = [_relative(src, root) for _, src in planned]
    copies = None
    if any(place is None for place in places):
        copies = _NewFolder(root / f"{out.stem}_images")
    rows = []
    try:
        for (captions, src), rel in zip(planned, places, strict=True):
            if rel is None:
                rel = f"{copies.path.name}/{copies.add(src, len(rows))}"
            rows.append({"image": rel, "captions": captions})
    finally:
        if copies is not None:
            copies.close()
    try:
        f = open(out, "x", encoding="utf-8", newline="")  # noqa: SIM115 - O_EXCL: no link followed
    except FileExistsError:
        raise CaptionerError(f"{out}: already exists; name a new file") from None
    with f:
        if suffix == ".jsonl":
            f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        else:
            writer = csv.writer(f)
            writer.writerow(["image", "captions"])
            for row in rows:
                writer.writerow([row["image"], json.dumps(row["captions"], ensure_ascii=False)])
    return CleanManifest(out, len(rows), dropped, copies.path if copies else None)


def _plan(report: HygieneReport) -> tuple[list[tuple[Item, list[str]]], list[str]]:
    """(kept items with their captions, files dropped), in the report's item order (train first):
    each group of copies keeps its earliest item."""
    position = {id(item): n for n, item in enumerate(report.items)}
    parent = list(range(len(report.items)))

    def root(n: int) -> int:
        while parent[n] != n:
            parent[n] = parent[parent[n]]
            n = parent[n]
        return n

    for f in report.findings:
        if f.kind in (EXACT, NEAR, LEAK):
            first = root(position[id(f.items[0])])
            for item in f.items[1:]:
                a, b = sorted((first, root(position[id(item)])))
                parent[b] = a  # the earlier item stays the group's root
                first = a
    merged: dict[int, list[str]] = defaultdict(list)
    dropped = []
    for n, item in enumerate(report.items):
        if item.error is not None:
            dropped.append(item.file)
            continue
        merged[root(n)].extend(c for c in item.captions if _usable(c, report))
        if root(n) != n:
            dropped.append(item.file)
    keep = []
    for n, item in enumerate(report.items):
        if item.error is None and root(n) == n:
            captions = list(dict.fromkeys(merged[n]))
            if captions:
                keep.append((item, captions))
            else:
                dropped.append(item.file)
    return keep, dropped


def _usable(caption: str, report: HygieneReport) -> bool:
    limit = report.max_caption_words
    return bool(_WORD.search(caption)) and (limit is None or len(caption.split()) <= limit)


def _undecoded(splits: Mapping[str, Any]) -> dict[str, Any]:
    import datasets

    return {
        name: ds.cast_column("image", datasets.Image(decode=False))
        for name, ds in splits.items()
        if len(ds)
    }


def _relative(src: dict, root: Path) -> str | None:
    path = src.get("path")
    if not path or not Path(path).is_file():
        return None
    resolved = Path(path).resolve()
    return resolved.relative_to(root).as_posix() if resolved.is_relative_to(root) else None


class _NewFolder:
    """A folder this run creates (an existing one, or a link at its name, is an error) and
    writes through its descriptor: each file is created with O_EXCL | O_NOFOLLOW, so no link is
    followed and nothing that exists is overwritten, even if the folder is tampered with."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            os.mkdir(path)
        except FileExistsError:
            raise CaptionerError(
                f"{path}: already exists; the images are copied into a new folder (remove it, "
                "or name another manifest)"
            ) from None
        try:
            self.fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | _NOFOLLOW)
        except OSError as err:
            raise CaptionerError(f"{path}: cannot open ({err.strerror or err})") from None

    def add(self, src: dict, n: int) -> str:
        """Copy one image (`{"bytes"}` or `{"path"}`) in as a new file; its name."""
        name = f"{n:06d}_{Path(src.get('path') or 'image').name}"
        data = src.get("bytes")
        if data is not None and not Path(name).suffix:
            name += _sniff_suffix(data)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW
        try:
            fd = os.open(name, flags, 0o666, dir_fd=self.fd)
        except OSError as err:
            raise CaptionerError(
                f"{self.path / name}: cannot create ({err.strerror or err})"
            ) from None
        with os.fdopen(fd, "wb") as target:
            if data is not None:
                target.write(data)
            else:
                with open(src["path"], "rb") as source:
                    shutil.copyfileobj(source, target)
        return name

    def close(self) -> None:
        os.close(self.fd)


def _sniff_suffix(data: bytes) -> str:
    with Image.open(io.BytesIO(data)) as img:
        return {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp"}.get(img.format or "", ".png")
