"""Reviewing a dataset's captions where they live: an index of its images, edits written back to
the file each caption came from, backups, bulk edits and the path rules (`captioner review`).

`open_review(source)` indexes a source by scanning names only (sidecar captions are read when
first asked for), so 50,000 images open in about a second:

  * a folder of images with `.txt` sidecars (one caption per non-empty line): editable, each
    edit rewrites one sidecar (and creates it for an image that had none);
  * a CSV/TSV/JSONL manifest, or a folder holding one manifest and no `.txt` files: editable,
    an edit rewrites the rows of that image and keeps every other row byte for byte;
  * an imagefolder with a top-level `metadata.jsonl`/`metadata.csv`: editable like a manifest,
    and the images it does not list are shown too (saving one adds its row);
  * everything else `load_captions` reads (a Hub id, parquet/arrow, `save_to_disk`, webdataset
    shards, JSON manifests, imagefolders with split folders): read-only, with a note;
    `ReviewDataset.export(dest)` writes them out as an editable folder (images + sidecars).

Path rules: nothing outside the source's folder is read or written. The folder scan does not
follow symlinks; a manifest row whose path is absolute, has a `..` part, is a URL or goes
through a symlink is refused with a note. Every write goes to a temporary file in the same
folder, then `os.replace`; a target that is a symlink is refused, and the file replaced is
first copied under `.captioner-backup/<time>/` (a hidden folder, which every loader skips).

`ReviewSession` holds one review's unsaved state: edits and exclusions over the dataset, undo,
search, filters, paging, bulk edits with a preview, and `save()`.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import os
import re
import stat
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from captioner.data.images import IMAGE_EXTENSIONS
from captioner.data.sources import (
    CAPTION_COLUMNS,
    IMAGE_COLUMNS,
    MANIFEST_SUFFIXES,
    as_captions,
    looks_like_path,
    pick_column,
)
from captioner.errors import CaptionerError

log = logging.getLogger(__name__)

BACKUP_DIR = ".captioner-backup"
EDITABLE_MANIFESTS = (".csv", ".tsv", ".jsonl")
MAX_CAPTION_CHARS = 10_000
MAX_CAPTIONS = 100
MAX_NOTES = 50  # notes kept verbatim; beyond, they are counted
MAX_PREVIEW = 200
MAX_PATTERN_CHARS = 500
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
# str.splitlines splits on these as well as on \n, so sources.py would read a JSONL row holding
# one of them raw as two broken lines: they are written escaped.
_LINE_BREAKS = {"\u2028": "\\u2028", "\u2029": "\\u2029", "\x85": "\\u0085"}

# What a finding filter may ask for, besides `check_hygiene`'s kinds.
NO_CAPTION = "no caption"
UNREADABLE = "unreadable image"


class ReviewError(CaptionerError):
    """A request the review cannot do; `status` is the HTTP answer (400 unless said)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass(slots=True)
class Entry:
    """One image of the review."""

    name: str  # path relative to the root (posix), or a row label for read-only sources
    path: Path | None = None  # the image file, checked to be inside the root; None: missing
    captions: list[str] | None = None  # None: not read yet (sidecars are read on demand)
    rows: list[int] = field(default_factory=list)  # manifest rows holding its captions
    row: int | None = None  # the dataset row (read-only sources)
    locked: str | None = None  # why it cannot be edited
    missing: str | None = None  # why its image cannot be read (listed all the same)


@dataclass
class Saved:
    files: list[str]  # written, relative to the root
    backups: list[str]  # copies of the files replaced, relative to the root


# --- paths ---


def safe_relative(rel: str) -> PurePosixPath:
    """A manifest's image path as a relative path inside its folder, or ReviewError: absolute
    paths, `..` parts, URLs, drive letters and NUL bytes are refused."""
    text = rel.strip().replace("\\", "/")
    if not text or "\x00" in text:
        raise ReviewError("empty path")
    if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", text):
        raise ReviewError("a URL or drive path, not a path inside the folder")
    path = PurePosixPath(text)
    if path.is_absolute():
        raise ReviewError("an absolute path (only paths inside the folder are read)")
    if ".." in path.parts:
        raise ReviewError("a '..' path (only paths inside the folder are read)")
    parts = [p for p in path.parts if p != "."]
    if not parts:
        raise ReviewError("empty path")
    return PurePosixPath(*parts)


def check_inside(root: Path, rel: PurePosixPath, *, must_exist: bool = True) -> Path:
    """`root/rel` if no part of it is a symlink (and it exists, when `must_exist`): checked with
    lstat part by part, so a link anywhere on the way is refused, not followed."""
    path = root
    for i, part in enumerate(rel.parts):
        path = path / part
        try:
            mode = os.lstat(path).st_mode
        except FileNotFoundError:
            if must_exist:
                raise ReviewError(f"{rel}: no such file") from None
            return root.joinpath(*rel.parts)
        if stat.S_ISLNK(mode):
            raise ReviewError(f"{rel}: goes through a symlink ({path.name}); not followed")
        if i < len(rel.parts) - 1 and not stat.S_ISDIR(mode):
            raise ReviewError(f"{rel}: {part} is not a folder")
    return path


def read_inside(root: Path, rel: PurePosixPath, limit: int = 256 * 1024 * 1024) -> bytes:
    """The bytes of `root/rel`, refusing symlinks on the way and non-regular files."""
    path = check_inside(root, rel)
    fd = os.open(path, os.O_RDONLY | _NOFOLLOW)
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise ReviewError(f"{rel}: not a regular file")
        data = f.read(limit + 1)
    if len(data) > limit:
        raise ReviewError(f"{rel}: larger than {limit:,} bytes", status=413)
    return data


def write_atomic(root: Path, rel: PurePosixPath, data: bytes, backups: Path | None) -> str | None:
    """Write `root/rel` through a temporary file and `os.replace`. A symlink on the way is
    refused; an existing file is first copied to `backups/rel`. Returns the backup written."""
    target = check_inside(root, rel, must_exist=False)
    parent = target.parent
    if not parent.is_dir():
        raise ReviewError(f"{rel}: its folder does not exist")
    backup = None
    mode = 0o644
    try:
        st = os.lstat(target)
    except FileNotFoundError:
        st = None
    if st is not None:
        if not stat.S_ISREG(st.st_mode):
            raise ReviewError(f"{rel}: not a regular file; not written")
        mode = stat.S_IMODE(st.st_mode)
        if backups is not None:
            old = read_inside(root, rel)
            dest = backups.joinpath(*rel.parts)
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(old)
            backup = str(dest.relative_to(root).as_posix())
    fd, tmp = tempfile.mkstemp(dir=parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError, ValueError):
            os.unlink(tmp)
        raise
    return backup


def new_backup_folder(root: Path) -> Path:
    """`root/.captioner-backup/<YYYYmmdd-HHMMSS>[-n]`, not created yet."""
    base = root / BACKUP_DIR
    if base.is_symlink():
        raise ReviewError(f"{BACKUP_DIR} is a symlink; not written through")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    folder, n = base / stamp, 1
    while folder.exists():
        n += 1
        folder = base / f"{stamp}-{n}"
    return folder


def clean_captions(captions: Iterable[Any]) -> list[str]:
    """Captions as stored: one per line, stripped, empty ones dropped; bounded."""
    out: list[str] = []
    for c in captions:
        if not isinstance(c, str):
            raise ReviewError("captions must be strings", status=422)
        out += [line.strip() for line in c.splitlines() if line.strip()]
    if len(out) > MAX_CAPTIONS:
        raise ReviewError(f"more than {MAX_CAPTIONS} captions for one image", status=422)
    for c in out:
        if len(c) > MAX_CAPTION_CHARS:
            raise ReviewError(f"a caption longer than {MAX_CAPTION_CHARS:,} characters", status=422)
    return out


# --- the sources ---


class ReviewDataset:
    """An indexed source: its entries, how their captions are read and written back."""

    kind = "read-only"
    read_only = True

    def __init__(self, source: str, root: Path | None) -> None:
        self.source = source
        self.root = root
        self.entries: list[Entry] = []
        self.notes: list[str] = []
        self._skipped = 0
        self._lock = threading.Lock()

    def note(self, text: str) -> None:
        if len(self.notes) < MAX_NOTES:
            self.notes.append(text)
        else:
            self._skipped += 1

    @property
    def all_notes(self) -> list[str]:
        more = [f"... and {self._skipped} more notes"] if self._skipped else []
        return self.notes + more

    def captions(self, i: int) -> list[str]:
        entry = self.entries[i]
        if entry.captions is None:
            entry.captions = self._read_captions(entry)
        return entry.captions

    def _read_captions(self, entry: Entry) -> list[str]:
        return []

    def preload(self, stop: threading.Event | None = None) -> None:
        """Read every caption not read yet (a search then needs no file reads)."""
        for i in range(len(self.entries)):
            if stop is not None and stop.is_set():
                return
            if self.entries[i].captions is None:
                self.captions(i)

    def image_bytes(self, i: int) -> bytes:
        entry = self.entries[i]
        if entry.path is None or self.root is None:
            raise ReviewError(f"{entry.name}: {entry.missing or 'no image'}", status=404)
        return read_inside(self.root, PurePosixPath(entry.path.relative_to(self.root).as_posix()))

    def image_stamp(self, i: int) -> str:
        """Changes when the image does (for the thumbnail cache)."""
        entry = self.entries[i]
        if entry.path is None:
            return "missing"
        st = os.lstat(entry.path)
        return f"{entry.path}|{st.st_size}|{st.st_mtime_ns}"

    def write(self, changes: dict[int, list[str]]) -> Saved:
        raise ReviewError(f"{self.source} is read-only ({self.kind}): export it to edit", 409)

    def export(self, dest: str | os.PathLike, captions_of: Callable[[int], list[str]]) -> int:
        """Every image and its captions as an editable folder (`NNNNN-name.ext` + `.txt`) in
        `dest`, which must not exist or be empty. Returns the number of images written."""
        out = Path(dest).expanduser()
        if out.is_symlink() or (out.exists() and (not out.is_dir() or any(out.iterdir()))):
            raise ReviewError(f"{out}: exists and is not an empty folder", 409)
        out.mkdir(parents=True, exist_ok=True)
        n = 0
        for i, entry in enumerate(self.entries):
            try:
                data = self.image_bytes(i)
            except (ReviewError, OSError) as err:
                log.warning("export: %s skipped (%s)", entry.name, err)
                continue
            stem = re.sub(r"[^\w.-]+", "_", PurePosixPath(entry.name).stem)[:80] or "image"
            name = f"{i:05d}-{stem}{_image_suffix(entry.name, data)}"
            (out / name).write_bytes(data)
            text = "".join(c + "\n" for c in captions_of(i))
            (out / name).with_suffix(".txt").write_text(text, encoding="utf-8")
            n += 1
        return n


def _image_suffix(name: str, data: bytes) -> str:
    suffix = PurePosixPath(name).suffix.lower()
    if suffix in IMAGE_EXTENSIONS:
        return suffix
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            return "." + (img.format or "png").lower().replace("jpeg", "jpg")
    except Exception:  # noqa: BLE001 - unknown bytes keep a neutral suffix
        return ".bin"


class SidecarDataset(ReviewDataset):
    """Images with same-stem `.txt` sidecars."""

    kind = "folder of images with .txt sidecars"
    read_only = False

    def __init__(
        self,
        source: str,
        root: Path,
        images: list[str],
        texts: set[str],
        links: frozenset[str] | set[str] = frozenset(),
    ) -> None:
        super().__init__(source, root)
        by_stem: dict[str, list[str]] = {}
        for rel in images:
            by_stem.setdefault(rel.rsplit(".", 1)[0], []).append(rel)
        for stem, rels in by_stem.items():
            for rel in rels:
                entry = Entry(rel, root / rel)
                if len(rels) > 1:
                    entry.locked = f"several images share {stem}.txt ({', '.join(rels)})"
                    self.note(f"{rel}: {entry.locked}; not editable")
                elif f"{stem}.txt" in links:
                    entry.captions = []
                    entry.locked = f"{stem}.txt is a symlink; not read or written"
                elif f"{stem}.txt" not in texts:
                    entry.captions = []
                self.entries.append(entry)

    def sidecar(self, entry: Entry) -> PurePosixPath:
        return PurePosixPath(entry.name.rsplit(".", 1)[0] + ".txt")

    def _read_captions(self, entry: Entry) -> list[str]:
        assert self.root is not None
        try:
            data = read_inside(self.root, self.sidecar(entry), limit=4 * 1024 * 1024)
            text = data.decode("utf-8-sig")
        except (ReviewError, OSError) as err:
            entry.locked = f"caption file unreadable ({err})"
            return []
        except UnicodeDecodeError:
            entry.locked = "caption file is not UTF-8 text"
            return []
        return [line.strip() for line in text.splitlines() if line.strip()]

    def write(self, changes: dict[int, list[str]]) -> Saved:
        assert self.root is not None
        backups_at = new_backup_folder(self.root)
        saved = Saved([], [])
        for i, captions in sorted(changes.items()):
            entry = self.entries[i]
            if entry.locked:
                raise ReviewError(f"{entry.name}: {entry.locked}", 409)
            rel = self.sidecar(entry)
            data = "".join(c + "\n" for c in captions).encode("utf-8")
            backup = write_atomic(self.root, rel, data, backups_at)
            entry.captions = list(captions)
            saved.files.append(rel.as_posix())
            if backup:
                saved.backups.append(backup)
        return saved


@dataclass
class _Row:
    raw: str  # the row's text as read, its line ending included
    cells: Any  # a dict (JSONL) or a list (CSV)
    rel: str | None = None
    captions: list[str] = field(default_factory=list)
    deleted: bool = False


class ManifestDataset(ReviewDataset):
    """A CSV/TSV/JSONL manifest (and imagefolder metadata): image paths relative to its folder."""

    kind = "manifest"
    read_only = False

    def __init__(
        self,
        source: str,
        manifest: Path,
        image_column: str | None = None,
        caption_column: str | None = None,
        unlisted: Sequence[str] = (),
    ) -> None:
        super().__init__(source, manifest.parent)
        assert self.root is not None
        self.manifest = PurePosixPath(manifest.name)
        self.suffix = manifest.suffix.lower()
        text = read_inside(self.root, self.manifest).decode("utf-8-sig")
        self.bom = read_inside(self.root, self.manifest)[:3] == b"\xef\xbb\xbf"
        self.newline = "\r\n" if "\r\n" in text else "\n"
        self.header: _Row | None = None
        self.rows = self._parse(text)
        columns = list(
            dict.fromkeys(
                k for r in self.rows for k in (r.cells if isinstance(r.cells, dict) else [])
            )
        )
        if self.suffix != ".jsonl":
            columns = list(self.header.cells) if self.header else []
        self.image_column = pick_column(columns, image_column, IMAGE_COLUMNS, "image", manifest)
        self.caption_column = pick_column(
            columns, caption_column, CAPTION_COLUMNS, "caption", manifest
        )
        by_rel: dict[str, Entry] = {}
        for n, row in enumerate(self.rows):
            value = self._cell(row, self.image_column)
            if not isinstance(value, str) or not value.strip():
                continue
            try:
                rel = safe_relative(value)
                path = check_inside(self.root, rel, must_exist=False)
            except ReviewError as err:
                self.note(f"{manifest.name} row {n + 1}: {value!r} refused: {err}")
                continue
            row.rel = rel.as_posix()
            row.captions = _manifest_captions(self._cell(row, self.caption_column))
            entry = by_rel.get(row.rel)
            if entry is None:
                entry = by_rel[row.rel] = Entry(row.rel, path, captions=[])
                if not path.is_file():
                    entry.missing = "image file missing"
                    self.note(f"{row.rel}: listed in {manifest.name} but missing")
                self.entries.append(entry)
            entry.rows.append(n)
            assert entry.captions is not None
            entry.captions += row.captions
        for rel in unlisted:
            if rel not in by_rel:
                self.entries.append(Entry(rel, self.root / rel, captions=[]))

    def _parse(self, text: str) -> list[_Row]:
        if self.suffix == ".jsonl":
            rows = []
            for n, line in enumerate(text.splitlines(keepends=True), 1):
                try:
                    cells = json.loads(line) if line.strip() else None
                except json.JSONDecodeError:
                    cells = None
                if line.strip() and not isinstance(cells, dict):
                    self.note(f"{self.manifest} line {n}: not a JSON object (kept as is)")
                rows.append(_Row(line, cells if isinstance(cells, dict) else {}))
            return rows
        lines = list(io.StringIO(text, newline=""))
        reader = csv.reader(iter(lines), delimiter=self.delimiter)
        rows, start = [], 0
        for cells in reader:
            raw = "".join(lines[start : reader.line_num])
            start = reader.line_num
            if self.header is None:
                self.header = _Row(raw, cells)
                continue
            rows.append(_Row(raw, cells))
        return rows

    @property
    def delimiter(self) -> str:
        return "\t" if self.suffix == ".tsv" else ","

    def _cell(self, row: _Row, column: str) -> Any:
        if isinstance(row.cells, dict):
            return row.cells.get(column)
        assert self.header is not None
        cols = self.header.cells
        i = cols.index(column) if column in cols else -1
        return row.cells[i] if 0 <= i < len(row.cells) else None

    def _set(self, row: _Row, column: str, value: Any) -> None:
        if isinstance(row.cells, dict):
            row.cells[column] = value
            return
        assert self.header is not None
        i = self.header.cells.index(column)
        row.cells += [""] * (i + 1 - len(row.cells))
        row.cells[i] = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)

    def _render(self, row: _Row) -> str:
        if isinstance(row.cells, dict):
            text = json.dumps(row.cells, ensure_ascii=False)
            for char, escaped in _LINE_BREAKS.items():
                text = text.replace(char, escaped)
            return text + self.newline
        buf = io.StringIO()
        csv.writer(buf, delimiter=self.delimiter, lineterminator=self.newline).writerow(row.cells)
        return buf.getvalue()

    def write(self, changes: dict[int, list[str]]) -> Saved:
        assert self.root is not None
        for i, captions in changes.items():
            entry = self.entries[i]
            rows = [self.rows[n] for n in entry.rows]
            keep_shape = len(rows) == len(captions) and all(
                isinstance(self._cell(r, self.caption_column), str) for r in rows
            )
            if keep_shape and captions:
                for row, caption in zip(rows, captions, strict=True):
                    self._set(row, self.caption_column, caption)
                    row.raw = self._render(row)
            else:
                if not rows:
                    cells: Any = {} if self.suffix == ".jsonl" else [""] * len(self.header.cells)  # type: ignore[union-attr]
                    new = _Row("", cells, entry.name)
                    self._set(new, self.image_column, entry.name)
                    self.rows.append(new)
                    entry.rows.append(len(self.rows) - 1)
                    rows = [new]
                value: Any = captions[0] if len(captions) == 1 else captions
                if not captions:
                    value = ""
                self._set(rows[0], self.caption_column, value)
                rows[0].raw = self._render(rows[0])
                for row in rows[1:]:
                    row.deleted = True
                entry.rows = entry.rows[:1]
            entry.captions = list(captions)
        head = self.header.raw if self.header else ""
        if head and not head.endswith(("\n", "\r")):
            head += self.newline
        parts = [head] if head else []
        for r in self.rows:  # a last row without its newline gets one before rows follow it
            if r.deleted:
                continue
            if parts and not parts[-1].endswith(("\n", "\r")):
                parts[-1] += self.newline
            parts.append(r.raw)
        data = ("\ufeff" if self.bom else "") + "".join(parts)
        backup = write_atomic(
            self.root, self.manifest, data.encode("utf-8"), new_backup_folder(self.root)
        )
        self.rows = [r for r in self.rows if not r.deleted]
        self._reindex()
        return Saved([self.manifest.as_posix()], [backup] if backup else [])

    def _reindex(self) -> None:
        where: dict[str, list[int]] = {}
        for n, row in enumerate(self.rows):
            if row.rel is not None:
                where.setdefault(row.rel, []).append(n)
        for entry in self.entries:
            entry.rows = where.get(entry.name, [])


class ImagefolderDataset(ManifestDataset):
    kind = "imagefolder (metadata)"


class RowsDataset(ReviewDataset):
    """A read-only source loaded with `load_all_rows`: images served from the dataset."""

    def __init__(self, source: str, root: Path | None, kind: str) -> None:
        super().__init__(source, root)
        from captioner.data.sources import ImageColumn, load_all_rows

        self.kind = kind
        ds = load_all_rows(source, on_bad_image="skip")
        self.images = ImageColumn(ds)
        captions = ds["captions"]
        for i, caps in enumerate(captions):
            image = self.images[i] or {}
            name = str(image.get("path") or f"row-{i:05d}")
            if root is not None:
                with contextlib.suppress(OSError, ValueError):
                    name = Path(name).resolve().relative_to(root.resolve()).as_posix()
            self.entries.append(Entry(name, None, captions=[c.strip() for c in caps], row=i))
        self.note(f"{kind}: read-only. Export it as an editable folder (images + .txt) to edit.")

    def image_bytes(self, i: int) -> bytes:
        image = self.images[self.entries[i].row] or {}
        if image.get("bytes"):
            return bytes(image["bytes"])
        path = image.get("path")
        if path and self.root is not None:
            with contextlib.suppress(OSError, ValueError):
                rel = Path(path).resolve().relative_to(self.root.resolve())
                return read_inside(self.root.resolve(), PurePosixPath(rel.as_posix()))
        raise ReviewError(f"{self.entries[i].name}: image not readable from the source", 404)

    def image_stamp(self, i: int) -> str:
        return f"{self.source}|{self.kind}|{i}|{self.entries[i].name}"


def open_review(
    source: str | os.PathLike,
    *,
    image_column: str | None = None,
    caption_column: str | None = None,
) -> ReviewDataset:
    """Index `source` for review (see the module's docstring for what is editable)."""
    text = str(source)
    path = Path(text).expanduser()
    if not path.exists() and not path.is_symlink():
        if looks_like_path(text):
            raise CaptionerError(f"{text}: no such file or directory")
        return RowsDataset(text, None, "Hub dataset")
    if path.is_symlink():
        path = path.resolve()
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix in EDITABLE_MANIFESTS:
            return ManifestDataset(text, path, image_column, caption_column)
        kinds = {".tar": "webdataset shard", ".parquet": "parquet", ".arrow": "arrow"}
        kinds[".json"] = "JSON manifest"
        if suffix in kinds:
            return RowsDataset(text, path.parent, kinds[suffix])
        raise CaptionerError(f"{path}: not a dataset (expected a folder, manifest or .tar shard)")
    root = path
    if (root / "dataset_dict.json").exists() or (root / "state.json").exists():
        return RowsDataset(text, root, "save_to_disk folder")
    images, texts, others, notes, links = _scan(root)
    if any(f.lower().endswith(".tar") for f in others):
        return RowsDataset(text, root, "webdataset shards")
    top = {f for f in others if "/" not in f}
    for meta in ("metadata.jsonl", "metadata.csv"):
        if meta in top:
            ds: ReviewDataset = ImagefolderDataset(
                text, root / meta, image_column or "file_name", caption_column, unlisted=images
            )
            break
    else:
        if any(f.endswith("/metadata." + e) for f in others for e in ("jsonl", "csv", "parquet")):
            return RowsDataset(text, root, "imagefolder with split folders")
        if "metadata.parquet" in top or not images:
            return RowsDataset(text, root, "dataset folder")
        manifests = [f for f in top if PurePosixPath(f).suffix.lower() in MANIFEST_SUFFIXES]
        if len(manifests) == 1 and not texts:
            if PurePosixPath(manifests[0]).suffix.lower() not in EDITABLE_MANIFESTS:
                return RowsDataset(text, root, "JSON manifest")
            ds = ManifestDataset(text, root / manifests[0], image_column, caption_column)
        else:
            ds = SidecarDataset(text, root, images, texts, links)
    for n in notes:
        ds.note(n)
    return ds


def _scan(root: Path) -> tuple[list[str], set[str], list[str], list[str], set[str]]:
    """Names under `root` (relative, posix): images, .txt files, other files, notes, symlinks.
    Hidden names are skipped; symlinks are noted and never followed."""
    images: list[str] = []
    texts: set[str] = set()
    others: list[str] = []
    notes: list[str] = []
    links: set[str] = set()
    stack = [("", root)]
    while stack:
        prefix, folder = stack.pop()
        try:
            listing = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as err:
            notes.append(f"{prefix or '.'}: unreadable folder ({err.strerror})")
            continue
        subdirs = []
        for e in listing:
            if e.name.startswith("."):
                continue
            rel = prefix + e.name
            if e.is_symlink():
                links.add(rel)
                notes.append(f"{rel}: a symlink; ignored (nothing outside the folder is read)")
            elif e.is_dir(follow_symlinks=False):
                subdirs.append((rel + "/", Path(e.path)))
            elif e.is_file(follow_symlinks=False):
                suffix = os.path.splitext(e.name)[1].lower()
                if suffix in IMAGE_EXTENSIONS:
                    images.append(rel)
                elif suffix == ".txt":
                    texts.add(rel)
                else:
                    others.append(rel)
        stack += reversed(subdirs)
    images.sort()
    return images, texts, others, notes, links


def _manifest_captions(value: Any) -> list[str]:
    """A manifest cell as the loaders read it: a JSON list in a string counts as several."""
    if isinstance(value, str) and value.lstrip().startswith("["):
        with contextlib.suppress(json.JSONDecodeError):
            value = json.loads(value)
    return as_captions(value)


# --- bulk edits ---


@dataclass
class BulkEdit:
    """One edit applied to every caption of the chosen images.

    `op`: replace (`find` -> `replace`, plain or `regex`), add_prefix / add_suffix (`text`,
    skipped where already there: a trigger word is added once), remove_prefix / remove_suffix
    (`text`), remove_word (`text` as a whole word, with the spaces and commas around it).
    """

    op: str
    find: str = ""
    replace: str = ""
    regex: bool = False
    text: str = ""
    OPS = ("replace", "add_prefix", "add_suffix", "remove_prefix", "remove_suffix", "remove_word")

    def __post_init__(self) -> None:
        if self.op not in self.OPS:
            raise ReviewError(f"unknown bulk edit {self.op!r} (one of {', '.join(self.OPS)})", 422)
        if len(self.find) > MAX_PATTERN_CHARS or len(self.text) > MAX_PATTERN_CHARS:
            raise ReviewError(f"patterns are at most {MAX_PATTERN_CHARS} characters", 422)
        if self.op == "replace":
            if not self.find:
                raise ReviewError("find what? (empty pattern)", 422)
            try:
                self._pattern = re.compile(self.find if self.regex else re.escape(self.find))
            except re.error as err:
                raise ReviewError(f"bad regular expression: {err}", 422) from None
            if self.regex:  # check the replacement's group references once, up front
                try:
                    self._pattern.sub(self.replace, "")
                except (re.error, IndexError) as err:
                    raise ReviewError(f"bad replacement: {err}", 422) from None
        elif not self.text.strip():
            raise ReviewError("which text? (empty)", 422)
        if self.op == "remove_word":
            word = re.escape(self.text.strip())
            self._pattern = re.compile(rf"(?<!\w){word}(?!\w)[,;]?")

    def apply(self, caption: str) -> str:
        op, text = self.op, self.text
        if op == "replace":
            repl = self.replace if self.regex else self.replace.replace("\\", "\\\\")
            try:
                return self._pattern.sub(repl, caption)
            except (re.error, IndexError) as err:
                raise ReviewError(f"bad replacement: {err}", 422) from None
        if op == "add_prefix":
            return caption if caption.startswith(text) else text + caption
        if op == "add_suffix":
            return caption if caption.endswith(text) else caption + text
        if op == "remove_prefix":
            return caption[len(text) :] if caption.startswith(text) else caption
        if op == "remove_suffix":
            return caption[: -len(text)] if caption.endswith(text) else caption
        return re.sub(r"\s{2,}", " ", self._pattern.sub("", caption)).strip(" ,;")

    def apply_all(self, captions: list[str]) -> list[str]:
        return clean_captions(self.apply(c) for c in captions)


# --- a review session: unsaved edits, undo, search and filters ---


@dataclass
class Change:
    """One undoable step: the captions (and exclusion) of each image before it."""

    label: str
    before: dict[int, tuple[list[str], bool]]


class ReviewSession:
    """Unsaved edits over a `ReviewDataset`: `edit`, `bulk`, `exclude`, `undo`, `save`."""

    def __init__(self, dataset: ReviewDataset) -> None:
        self.dataset = dataset
        self.pending: dict[int, list[str]] = {}
        self.excluded: set[int] = set()
        self.undo_stack: list[Change] = []
        self.findings: dict[int, list[str]] = {}  # image -> finding kinds (from a data check)
        self.lock = threading.RLock()

    def __len__(self) -> int:
        return len(self.dataset.entries)

    def captions(self, i: int) -> list[str]:
        self.check_id(i)
        with self.lock:
            if i in self.pending:
                return self.pending[i]
            return self.dataset.captions(i)

    def check_id(self, i: int) -> None:
        if not 0 <= i < len(self.dataset.entries):
            raise ReviewError(f"no image {i}", 404)

    def _set(self, i: int, captions: list[str]) -> None:
        if captions == self.dataset.captions(i):
            self.pending.pop(i, None)
        else:
            self.pending[i] = captions

    def edit(self, changes: dict[int, list[str]], label: str = "edit") -> int:
        """Stage new captions; one undo step. Returns how many images changed."""
        if self.dataset.read_only:
            raise ReviewError(
                f"{self.dataset.source} is read-only ({self.dataset.kind}): export it to edit",
                409,
            )
        with self.lock:
            before: dict[int, tuple[list[str], bool]] = {}
            for i, captions in changes.items():
                self.check_id(i)
                entry = self.dataset.entries[i]
                if entry.locked:
                    raise ReviewError(f"{entry.name}: {entry.locked}", 409)
                captions = clean_captions(captions)
                old = self.captions(i)
                if captions != old:
                    before[i] = (old, i in self.excluded)
                    self._set(i, captions)
            if before:
                self.undo_stack.append(Change(label, before))
            return len(before)

    def exclude(self, ids: Iterable[int], excluded: bool = True) -> int:
        with self.lock:
            before = {}
            for i in ids:
                self.check_id(i)
                if (i in self.excluded) != excluded:
                    before[i] = (self.captions(i), i in self.excluded)
                    (self.excluded.add if excluded else self.excluded.discard)(i)
            if before:
                self.undo_stack.append(Change("exclude" if excluded else "include", before))
            return len(before)

    def undo(self) -> str | None:
        with self.lock:
            if not self.undo_stack:
                return None
            change = self.undo_stack.pop()
            for i, (captions, was_excluded) in change.before.items():
                self._set(i, captions)
                (self.excluded.add if was_excluded else self.excluded.discard)(i)
            return change.label

    def bulk(
        self, edit: BulkEdit, ids: Iterable[int] | None = None, *, apply: bool = False
    ) -> dict[str, Any]:
        """Preview (or apply, one undo step) `edit` on `ids` (default: every image)."""
        with self.lock:
            targets = range(len(self)) if ids is None else list(ids)
            changed: dict[int, list[str]] = {}
            for i in targets:
                self.check_id(i)
                if self.dataset.entries[i].locked:
                    continue
                old = self.captions(i)
                new = edit.apply_all(old)
                if new != old:
                    changed[i] = new
            preview = [
                {
                    "id": i,
                    "name": self.dataset.entries[i].name,
                    "before": self.captions(i),
                    "after": new,
                }
                for i, new in list(changed.items())[:MAX_PREVIEW]
            ]
            if apply and changed:
                self.edit(changed, label=f"bulk {edit.op}")
            return {"count": len(changed), "changes": preview, "applied": apply}

    def save(self) -> Saved:
        with self.lock:
            if not self.pending:
                return Saved([], [])
            saved = self.dataset.write(dict(self.pending))
            self.pending.clear()
            return saved

    def write_cleaned(self) -> str:
        """A JSONL manifest (`cleaned-<time>.jsonl` in the root) of the images not excluded,
        with their current captions (unsaved edits included); the originals are untouched."""
        root = self.dataset.root
        if root is None or self.dataset.read_only:
            raise ReviewError("a cleaned manifest is written for editable sources only", 409)
        with self.lock:
            lines = []
            for i, entry in enumerate(self.dataset.entries):
                if i in self.excluded or entry.path is None:
                    continue
                captions = self.captions(i)
                if captions:
                    row = {"file_name": entry.name, "captions": captions}
                    lines.append(json.dumps(row, ensure_ascii=False) + "\n")
        name = f"cleaned-{time.strftime('%Y%m%d-%H%M%S')}.jsonl"
        text = "".join(lines)
        for char, escaped in _LINE_BREAKS.items():
            text = text.replace(char, escaped)
        write_atomic(root, PurePosixPath(name), text.encode("utf-8"), None)
        return name

    # --- browsing ---

    def matches(self, i: int, query: str, finding: str | None, regex: re.Pattern | None) -> bool:
        if finding:
            if finding == NO_CAPTION:
                if self.captions(i):
                    return False
            elif finding == "unsaved":
                if i not in self.pending:
                    return False
            elif finding == "excluded":
                if i not in self.excluded:
                    return False
            elif finding not in self.findings.get(i, ()):
                return False
        if not query:
            return True
        entry = self.dataset.entries[i]
        haystack = [entry.name, *self.captions(i)]
        if regex is not None:
            return any(regex.search(h) for h in haystack)
        q = query.lower()
        return any(q in h.lower() for h in haystack)

    def page(
        self,
        offset: int = 0,
        limit: int = 60,
        query: str = "",
        finding: str | None = None,
        regex: bool = False,
    ) -> tuple[int, list[int]]:
        """(how many images match, the ids of those from `offset`, at most `limit`)."""
        pattern = None
        if query and regex:
            if len(query) > MAX_PATTERN_CHARS:
                raise ReviewError(f"patterns are at most {MAX_PATTERN_CHARS} characters", 422)
            try:
                pattern = re.compile(query, re.IGNORECASE)
            except re.error as err:
                raise ReviewError(f"bad regular expression: {err}", 422) from None
        with self.lock:
            if not query and not finding:
                n = len(self)
                return n, list(range(offset, min(n, offset + limit)))
            hits = [i for i in range(len(self)) if self.matches(i, query, finding, pattern)]
        return len(hits), hits[offset : offset + limit]

    def item(self, i: int) -> dict[str, Any]:
        self.check_id(i)
        entry = self.dataset.entries[i]
        with self.lock:
            return {
                "id": i,
                "name": entry.name,
                "captions": self.captions(i),
                "saved": self.dataset.captions(i),
                "unsaved": i in self.pending,
                "excluded": i in self.excluded,
                "locked": entry.locked,
                "missing": entry.missing,
                "findings": self.findings.get(i, []),
            }


def hygiene_findings(
    dataset: ReviewDataset, progress: Callable[[int], None] | None = None
) -> dict[int, list[str]]:
    """Run `check_hygiene` on the source (as saved) and map its findings to the entries, plus
    unreadable images (header and structure checks, like the loaders)."""
    from captioner.data.hygiene import check_hygiene
    from captioner.data.images import check_image

    out: dict[int, list[str]] = {}
    by_path: dict[str, int] = {}
    for i, entry in enumerate(dataset.entries):
        by_path[_key(entry.path) if entry.path else entry.name] = i
        if entry.missing:
            out.setdefault(i, []).append(UNREADABLE)
        elif entry.path is not None:
            try:
                check_image(dataset.image_bytes(i))
            except Exception:  # noqa: BLE001 - any failure to read is the finding
                out.setdefault(i, []).append(UNREADABLE)
    try:
        report = check_hygiene(dataset.source, progress=progress)
    except CaptionerError as err:  # e.g. no captioned image yet: the image checks still count
        log.warning("data check: %s", err)
        return out
    for finding in report.findings:
        for file in finding.files:
            i = by_path.get(_key(file))
            if i is None and dataset.root is not None:
                with contextlib.suppress(OSError, ValueError):
                    i = by_path.get(
                        Path(file).resolve().relative_to(dataset.root.resolve()).as_posix()
                    )
            if i is not None and finding.kind not in out.get(i, []):
                out.setdefault(i, []).append(finding.kind)
    for item in report.unreadable:
        i = by_path.get(_key(item.file))
        if i is not None and UNREADABLE not in out.get(i, []):
            out.setdefault(i, []).append(UNREADABLE)
    return out


def _key(path: Any) -> str:
    try:
        return str(Path(path).resolve())
    except (OSError, RuntimeError, TypeError):
        return str(path)


def iter_ids(values: Iterable[Any], n: int) -> Iterator[int]:
    for v in values:
        if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < n:
            raise ReviewError(f"no image {v!r}", 422)
        yield v
