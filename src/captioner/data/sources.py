"""Every caption source -> one shape: DatasetDict{"train","test"} of {image, captions: list[str]}.

Sources (`load_captions(source)`):
  * a Hugging Face Hub id, or a local folder `datasets` can load (imagefolder with
    metadata.jsonl/csv, parquet, ...) or that `save_to_disk` wrote;
  * a folder of images with same-stem `.txt` sidecars, one caption per non-empty line;
  * a CSV / JSONL / JSON manifest whose image paths are relative to the manifest;
  * webdataset `.tar` shards (a file or a folder of them): jpg|jpeg|png|webp + txt|json.
Each reader builds a `datasets.Dataset`; one shared pass then drops (or fails on) examples
with no usable caption or image, so `captioner data check` and the loaders agree exactly.

`datasets` (1.5 s to import here) is imported inside the functions that use it: the CLI imports
this module for `DataArguments` when it builds `--help`. Shards are read with the standard
library's `tarfile`, as local files only (see `_tar_samples`).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import lzma
import os
import re
import tarfile
import zlib
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from huggingface_hub.utils import logging as hub_logging

from captioner.data.images import (
    DEFAULT_MAX_PIXELS,
    DEFAULT_MIN_SIZE,
    IMAGE_EXTENSIONS,
    check_image,
    load_image,
    source_name,
)
from captioner.errors import BadImageError, CaptionerError
from captioner.hub import hub_reachable, is_offline

log = logging.getLogger("captioner.data.sources")

IMAGE_COLUMNS = ("image", "file_name", "image_path", "path", "filename", "file", "img")
CAPTION_COLUMNS = ("text", "captions", "caption", "sentences", "txt")
MANIFEST_SUFFIXES = (".csv", ".tsv", ".jsonl", ".json")
WDS_IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
# One tar member is held in memory at a time; a real image or caption is far below this.
MAX_TAR_MEMBER_BYTES = 64 * 1024 * 1024
# webdataset's sample key and extension (`dir/key.ext.more` -> `dir/key`, `ext.more`) and the
# metadata members it skips (`__key__`-like names)
_WDS_NAME = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")
_WDS_META = re.compile(r"^__[^/]*__($|/)")


@dataclass
class DataArguments:
    """Which examples a command reads. Every command that reads a dataset takes these options
    under these names (`captioner train` through HfArgumentParser, the others as typer flags);
    the split seed is `--seed` (TrainingArguments' own for `train`)."""

    data: str | None = field(
        default=None,
        metadata={"help": "Dataset: Hub id, folder (+ .txt sidecars or metadata), manifest, .tar"},
    )
    image_column: str | None = field(
        default=None, metadata={"help": "Image column (default: image, file_name, ...)."}
    )
    caption_column: str | None = field(
        default=None,
        metadata={"help": "Caption column (default: text, captions, ...; a list = several)."},
    )
    test_size: float = field(
        default=0.1,
        metadata={"help": "Held-out fraction (or row count) when there is no test split."},
    )
    on_bad_image: str = field(
        default="skip",
        metadata={"help": "skip (counted and reported) | fail", "choices": ("skip", "fail")},
    )
    max_pixels: int = field(
        default=DEFAULT_MAX_PIXELS,
        metadata={"help": "Larger images are bad (decompression bombs)."},
    )
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "Evaluate only the first N examples of the eval split."}
    )

    def load(self, seed: int = 0):
        """`load_captions` with these options."""
        if not self.data:
            raise CaptionerError("no dataset given (--data)")
        return load_captions(
            self.data,
            image_column=self.image_column,
            caption_column=self.caption_column,
            test_size=self.test_size,
            seed=seed,
            on_bad_image=self.on_bad_image,
            max_pixels=self.max_pixels,
        )

    def load_all(self):
        """`load_all_rows` with these options: every row, no split."""
        if not self.data:
            raise CaptionerError("no dataset given (--data)")
        return load_all_rows(
            self.data,
            image_column=self.image_column,
            caption_column=self.caption_column,
            on_bad_image=self.on_bad_image,
            max_pixels=self.max_pixels,
        )


class ImageColumn(Sequence):
    """`dataset[i]["image"]` on demand, undecoded ({"bytes", "path"}): the captioning loader
    decodes each image in its worker, so a split is never held in memory as pixels."""

    def __init__(self, dataset: Any) -> None:
        import datasets

        self.dataset = dataset.cast_column("image", datasets.Image(decode=False))

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return self.dataset[i]["image"]


def first_rows(dataset: Any, max_samples: int | None) -> Any:
    """The first `max_samples` rows (a fixed subset: the same at every evaluation)."""
    if max_samples is not None and max_samples < len(dataset):
        return dataset.select(range(max_samples))
    return dataset


def _features():
    import datasets

    strings = getattr(datasets, "List", datasets.Sequence)(datasets.Value("string"))  # List: 4.x+
    return datasets.Features({"image": datasets.Image(), "captions": strings})


@dataclass
class BadExample:
    file: str
    reason: str


@dataclass
class Scan:
    """What a source holds: clean splits, the examples that were dropped, and why."""

    splits: dict[str, Any]  # split name -> datasets.Dataset(image, captions)
    bad: list[BadExample] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(len(d) for d in self.splits.values()) + len(self.bad)


def load_captions(
    source: str | os.PathLike,
    *,
    image_column: str | None = None,
    caption_column: str | None = None,
    test_size: float | int = 0.1,
    seed: int = 0,
    on_bad_image: str = "skip",
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    min_size: int = DEFAULT_MIN_SIZE,
):
    """Load any supported source as DatasetDict{"train", "test"} with `image` and `captions`.

    Column names default to the first match of IMAGE_COLUMNS / CAPTION_COLUMNS (`image` and
    `text` first, as in the guide); a list-valued caption column gives several captions. A source
    with a `test` (or else `validation`) split keeps it; otherwise `test_size` of the training
    rows, shuffled by `seed`, become the test split (`test_size` may also be a row count).

    `image` is datasets' Image feature (decoded lazily; EXIF applied by datasets); pass each image
    through `images.load_image` for the RGB conversion, as collate and the report do.
    """
    scan = _scan_clean(source, image_column, caption_column, on_bad_image, max_pixels, min_size)
    return _train_test(scan.splits, test_size, seed)


def load_all_rows(
    source: str | os.PathLike,
    *,
    image_column: str | None = None,
    caption_column: str | None = None,
    on_bad_image: str = "skip",
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    min_size: int = DEFAULT_MIN_SIZE,
):
    """Every row of every split of `source` as one Dataset(image, captions), in stored order:
    no held-out split is cut (`captioner eval --split all` on a folder meant as a test set)."""
    import datasets

    scan = _scan_clean(source, image_column, caption_column, on_bad_image, max_pixels, min_size)
    parts = [ds for ds in scan.splits.values() if len(ds)]
    return datasets.concatenate_datasets(parts) if parts else _dataset([], [])


def _scan_clean(source, image_column, caption_column, on_bad_image, max_pixels, min_size) -> Scan:
    """`scan_source`, then skip (with one warning) or fail on bad examples."""
    if on_bad_image not in ("skip", "fail"):
        raise CaptionerError(f"--on_bad_image must be 'skip' or 'fail', not {on_bad_image!r}")
    scan = scan_source(source, image_column, caption_column, max_pixels, min_size)
    if scan.bad:
        first = scan.bad[0]
        hint = f"`captioner data check {source}` lists them all"
        if on_bad_image == "fail":
            raise CaptionerError(
                f"{len(scan.bad)} bad example(s) in {source}, first: {first.file}: {first.reason}"
                f" ({hint}; --on_bad_image skip drops them)"
            )
        log.warning("skipped %d of %d examples in %s (%s)", len(scan.bad), scan.total, source, hint)
    return scan


def scan_source(
    source: str | os.PathLike,
    image_column: str | None = None,
    caption_column: str | None = None,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    min_size: int = DEFAULT_MIN_SIZE,
    full: bool = False,
) -> Scan:
    """Read `source` with the matching reader, then validate every caption and image once
    (`full`: decode every image too)."""
    raw, bad = _read(source, image_column, caption_column)
    splits = {}
    for name, ds in raw.items():
        where = f"{source}[{name}]"
        splits[name] = _clean(
            ds, where, image_column, caption_column, bad, max_pixels, min_size, full
        )
    if _is_imagefolder(source):  # `datasets` silently drops images that metadata does not list
        root = Path(source).expanduser()
        seen = {str(Path(b.file).resolve()) for b in bad}
        for ds in splits.values():
            seen.update(str(Path(r["path"]).resolve()) for r in _paths(ds) if r and r["path"])
        for f in sorted(root.rglob("*")):
            if f.suffix.lower() in IMAGE_EXTENSIONS and str(f.resolve()) not in seen:
                if not _hidden(f, root):
                    bad.append(BadExample(str(f), "not listed in metadata (no caption)"))
    return Scan(splits, bad)


# --- readers: source -> ({split: Dataset}, bad examples found while reading) ---


def _read(source: str | os.PathLike, image_column: str | None, caption_column: str | None):
    import datasets

    path = Path(source).expanduser()
    if not path.exists():
        if looks_like_path(str(source)):
            raise CaptionerError(f"{source}: no such file or directory")
        return _from_hub(str(source)), []
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix in MANIFEST_SUFFIXES:
            return _from_manifest(path, image_column, caption_column)
        if suffix == ".tar":
            return _from_webdataset([path], caption_column)
        if suffix in (".parquet", ".arrow"):
            return _hf_load(suffix.lstrip("."), str(path), data_files=str(path)), []
        raise CaptionerError(f"{path}: not a dataset (expected a folder, manifest or .tar shard)")
    if (path / "dataset_dict.json").exists() or (path / "state.json").exists():
        loaded = datasets.load_from_disk(str(path))
        return (dict(loaded) if isinstance(loaded, datasets.DatasetDict) else {"train": loaded}), []
    files = [f for f in sorted(path.rglob("*")) if f.is_file() and not _hidden(f, path)]
    if not files:
        raise CaptionerError(f"{path}: empty folder, nothing to load")
    if any(f.suffix.lower() == ".tar" for f in files):
        return _from_webdataset([f for f in files if f.suffix.lower() == ".tar"], caption_column)
    if _is_imagefolder(path) and all(f.parent == path for f in files):
        # flat imagefolder: listing the files spares datasets' split-pattern search (4 s -> 1.5 s
        # for 2,000 images)
        wanted = [
            str(f) for f in files if f.suffix.lower() in IMAGE_EXTENSIONS or f.stem == "metadata"
        ]
        return _hf_load("imagefolder", str(path), data_files={"train": wanted}), []
    if _is_imagefolder(path) or not any(f.suffix.lower() in IMAGE_EXTENSIONS for f in files):
        return _hf_load(str(path), str(path)), []
    manifests = [f for f in files if f.parent == path and f.suffix.lower() in MANIFEST_SUFFIXES]
    if len(manifests) == 1 and not any(f.suffix == ".txt" for f in files):
        return _from_manifest(manifests[0], image_column, caption_column)  # folder + captions.csv
    return _from_sidecars(path, files)


def _hf_load(name: str, shown: str, **kwargs: Any) -> dict[str, Any]:
    import datasets

    try:
        return dict(datasets.load_dataset(name, **kwargs))
    except (ValueError, OSError, datasets.exceptions.DatasetGenerationError) as err:
        raise CaptionerError(f"{shown}: cannot load as a dataset ({_short(err)})") from None


def _from_hub(repo_id: str) -> dict[str, Any]:
    """The guide's call, `datasets.load_dataset(id)`, with a quick failure instead of retries."""
    import datasets

    if not is_offline() and not hub_reachable():
        raise CaptionerError(
            f"cannot load '{repo_id}': not a local path, and the Hugging Face Hub is unreachable "
            "(no network?); set HF_HUB_OFFLINE=1 to use a cached copy"
        )
    verbosity = hub_logging.get_verbosity()
    hub_logging.set_verbosity_error()  # its retry warnings would bury our one-line error
    try:
        return dict(datasets.load_dataset(repo_id))
    except Exception as err:  # connection, offline, not found, gated, bad name: all one line
        if isinstance(err, ConnectionError) and "Offline" in str(err):
            why = "HF_HUB_OFFLINE=1 is set and there is no cached copy"
        else:
            why = _short(err)
        raise CaptionerError(f"cannot load '{repo_id}': not a local path, and {why}") from None
    finally:
        hub_logging.set_verbosity(verbosity)


def _from_sidecars(root: Path, files: list[Path]):
    """image.jpg + image.txt pairs (the LoRA-training convention)."""
    by_stem: dict[Path, list[Path]] = defaultdict(list)
    for f in files:
        if f.suffix.lower() in IMAGE_EXTENSIONS:
            by_stem[f.with_suffix("")].append(f)
    images, captions, bad = [], [], []
    for stem, found in by_stem.items():
        if len(found) > 1:
            names = ", ".join(f.name for f in found)
            for f in found:
                bad.append(BadExample(str(f), f"several images share one caption stem ({names})"))
            continue
        txt = stem.with_suffix(".txt")
        if not txt.is_file():  # a FIFO or device named like a caption would block the read
            bad.append(BadExample(str(found[0]), f"no caption file ({txt.name})"))
            continue
        try:
            text = txt.read_bytes().decode("utf-8-sig")
        except UnicodeDecodeError:
            bad.append(BadExample(str(txt), "caption file is not UTF-8 text"))
            continue
        lines = [line for line in text.splitlines() if line.strip()]
        if not lines:
            bad.append(BadExample(str(txt), "empty caption file"))
            continue
        images.append(str(found[0]))
        captions.append(lines)
    return {"train": _dataset(images, captions)}, bad


def _from_manifest(manifest: Path, image_column: str | None, caption_column: str | None):
    """CSV/TSV/JSONL/JSON rows of (image path relative to the manifest, caption or captions).

    Several rows for one image add up (COCO style); a caption cell holding a JSON list counts as
    several captions.
    """
    rows, bad = _manifest_rows(manifest)
    if not rows:
        raise CaptionerError(f"{manifest}: manifest has no rows")
    columns = list(dict.fromkeys(k for _, row in rows for k in row))
    img_col = pick_column(columns, image_column, IMAGE_COLUMNS, "image", manifest)
    cap_col = pick_column(columns, caption_column, CAPTION_COLUMNS, "caption", manifest)
    root = manifest.parent.resolve()
    grouped: dict[str, list[str]] = {}
    for where, row in rows:
        rel = row.get(img_col)
        if not isinstance(rel, str) or not rel.strip():
            bad.append(BadExample(where, f"no image path in column '{img_col}'"))
            continue
        if urlparse(rel).scheme in ("http", "https", "s3", "gs"):
            bad.append(BadExample(rel, "image URLs are not downloaded; use local files"))
            continue
        target = (root / rel.strip()).resolve()
        if not target.is_relative_to(root):
            bad.append(BadExample(rel, f"points outside the manifest's folder ({where})"))
            continue
        value = row.get(cap_col)
        if isinstance(value, str) and value.lstrip().startswith("["):
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                pass
        grouped.setdefault(str(target), []).extend(as_captions(value))
    return {"train": _dataset(list(grouped), list(grouped.values()))}, bad


def _manifest_rows(manifest: Path) -> tuple[list[tuple[str, dict]], list[BadExample]]:
    try:
        text = manifest.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError:
        raise CaptionerError(f"{manifest}: manifest is not UTF-8 text") from None
    suffix = manifest.suffix.lower()
    if suffix in (".csv", ".tsv"):
        reader = csv.DictReader(
            io.StringIO(text, newline=""), delimiter="," if suffix == ".csv" else "\t"
        )
        return [(f"{manifest}:{reader.line_num}", row) for row in reader], []
    if suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise CaptionerError(f"{manifest}: invalid JSON ({err})") from None
        if not isinstance(data, list):
            raise CaptionerError(f"{manifest}: expected a JSON list of objects")
        return [(f"{manifest}[{i}]", r) for i, r in enumerate(data) if isinstance(r, dict)], []
    rows, bad = [], []
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        if not isinstance(row, dict):
            bad.append(BadExample(f"{manifest}:{i}", "not a JSON object"))
            continue
        rows.append((f"{manifest}:{i}", row))
    return rows, bad


def _from_webdataset(shards: list[Path], caption_column: str | None):
    """webdataset shards: one sample = the tar members sharing a key (`a/b.jpg` + `a/b.txt`)."""
    bad: list[BadExample] = []
    images, captions = [], []
    for shard in shards:
        for sample in _tar_samples(shard, bad):
            name = f"{shard}/{sample['__key__']}"
            found = [k for k in WDS_IMAGE_KEYS if k in sample]
            if len(found) != 1:
                why = "no image" if not found else f"several images ({', '.join(found)})"
                bad.append(BadExample(name, why))
                continue
            try:
                caps = _wds_captions(sample, caption_column)
            except UnicodeDecodeError:
                bad.append(BadExample(name, "caption is not UTF-8 text"))
                continue
            except json.JSONDecodeError:
                bad.append(BadExample(f"{name}.json", "invalid JSON"))
                continue
            if not caps:
                bad.append(BadExample(f"{name}.{found[0]}", "no caption"))
                continue
            images.append({"bytes": sample[found[0]], "path": f"{name}.{found[0]}"})
            captions.append(caps)
    return {"train": _dataset(images, captions)}, bad


def _tar_samples(shard: Path, bad: list[BadExample]) -> Iterator[dict[str, Any]]:
    """The samples of one shard, grouped by key as webdataset groups them.

    The shard is opened here as a local file and streamed with `tarfile`: a shard's name is never
    handed to a library that reads names as URLs (webdataset runs `pipe:...` names as shell
    commands). A member whose header declares more than `MAX_TAR_MEMBER_BYTES` is reported and
    skipped without being read into memory (a gzip bomb inflates to its declared size, not more);
    its sample is dropped. A shard that breaks off is reported once; its samples read so far stay.
    """
    current: dict[str, Any] | None = None
    try:
        with open(shard, "rb") as file, tarfile.open(fileobj=file, mode="r|*") as stream:
            for member in stream:
                match = _WDS_NAME.match(member.name)
                if not member.isreg() or not match or _WDS_META.match(member.name):
                    continue
                key, ext = match.group(1), match.group(2).lower()
                if current is None or key != current["__key__"]:
                    if current is not None and "__dropped__" not in current:
                        yield current
                    current = {"__key__": key}
                if ext in current:
                    bad.append(BadExample(f"{shard}/{member.name}", "duplicate member (skipped)"))
                    continue
                if member.size > MAX_TAR_MEMBER_BYTES:
                    bad.append(
                        BadExample(
                            f"{shard}/{member.name}",
                            f"tar member of {member.size:,} bytes is over the "
                            f"{MAX_TAR_MEMBER_BYTES:,} byte limit (skipped unread)",
                        )
                    )
                    current["__dropped__"] = True
                    continue
                member_file = stream.extractfile(member)
                current[ext] = member_file.read() if member_file is not None else b""
                stream.members = []  # a streamed shard: keep no per-member state
    except (tarfile.TarError, OSError, EOFError, ValueError, zlib.error, lzma.LZMAError) as err:
        bad.append(BadExample(str(shard), f"unreadable tar shard ({_short(err)})"))
        return  # the sample in progress may be missing members: dropped with the shard's end
    if current is not None and "__dropped__" not in current:
        yield current


def _wds_captions(sample: dict, caption_column: str | None) -> list[str]:
    if "txt" in sample:
        return [line for line in sample["txt"].decode("utf-8-sig").splitlines() if line.strip()]
    if "json" in sample:
        meta = json.loads(sample["json"].decode("utf-8"))
        if isinstance(meta, dict):
            col = caption_column or next((c for c in CAPTION_COLUMNS if c in meta), None)
            return as_captions(meta.get(col)) if col else []
        return as_captions(meta)
    return []


# --- the shared cleaning pass and the split ---


def _clean(
    ds: Any,
    where: str,
    image_column: str | None,
    caption_column: str | None,
    bad: list[BadExample],
    max_pixels: int | None,
    min_size: int,
    full: bool,
) -> Any:
    """Drop rows without a caption or a usable image; return Dataset(image, captions).

    `full` decodes every image (`data check`); otherwise headers, sizes and the format's own
    structural check only, so loading a large dataset does not decode it an extra time."""
    import datasets

    img_col = pick_column(ds.column_names, image_column, IMAGE_COLUMNS, "image", where)
    cap_col = pick_column(ds.column_names, caption_column, CAPTION_COLUMNS, "caption", where)
    ds = ds.select_columns(list(dict.fromkeys([img_col, cap_col])))
    if isinstance(ds.features[img_col], datasets.Image):
        ds = ds.cast_column(img_col, datasets.Image(decode=False))
    keep, captions = [], []
    for i, row in enumerate(ds):
        image = row[img_col]
        name = source_name(image, f"{where}[{i}]")
        caps = as_captions(row[cap_col])
        if not caps:
            bad.append(BadExample(name, "no caption"))
            continue
        try:
            (load_image if full else check_image)(image, max_pixels=max_pixels, min_size=min_size)
        except BadImageError as err:
            bad.append(BadExample(name, err.reason))
            continue
        keep.append(i)
        captions.append(caps)
    # stay in Arrow (no image bytes through Python): select rows, swap in the clean captions
    quiet = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()  # bookkeeping bars ("Flattening the indices") are noise
    try:
        out = ds.select(keep).select_columns([img_col]).flatten_indices()
        if img_col != "image":
            out = out.rename_column(img_col, "image")
        out = out.cast_column("image", datasets.Image())
        return out.add_column("captions", captions, feature=_features()["captions"])
    finally:
        if not quiet:
            datasets.enable_progress_bars()


def _train_test(splits: dict[str, Any], test_size: float | int, seed: int):
    import datasets

    test = splits.get("test", splits.get("validation"))
    rest = [d for k, d in splits.items() if k not in ("test", "validation")]
    if "train" in splits:
        train = splits["train"]
    elif rest:
        train = datasets.concatenate_datasets(rest)
    else:
        train = _dataset([], [])
    if test is None:
        if test_size >= 1 and float(test_size).is_integer():
            test_size = int(test_size)  # a row count (flags give 8.0; datasets wants 8)
        if test_size > 0 and len(train) >= 2:
            try:
                parts = train.train_test_split(test_size=test_size, seed=seed)
            except ValueError as err:  # e.g. test_size=30 with 20 rows
                raise CaptionerError(f"--test_size {test_size}: {err}") from None
            train, test = parts["train"], parts["test"]
        else:
            test = train.select([])
    return datasets.DatasetDict({"train": train, "test": test})


# --- small helpers ---


def _dataset(images: list, captions: list[list[str]]):
    """The one output shape: `image` as a datasets Image feature, `captions` as list[str]."""
    import datasets

    return datasets.Dataset.from_dict({"image": images, "captions": captions}, features=_features())


def as_captions(value: Any) -> list[str]:
    """A cell -> a list of non-empty captions with whitespace collapsed."""
    if value is None:
        return []
    items = value if isinstance(value, (list, tuple)) else [value]
    return [" ".join(str(v).split()) for v in items if v is not None and str(v).strip()]


def pick_column(
    columns: list[str], wanted: str | None, candidates: tuple, what: str, where: Any
) -> str:
    """The `what` column of a table: `wanted` if given (it must exist), else the first of
    `candidates` present; a CaptionerError naming `where` otherwise."""
    if wanted:
        if wanted in columns:
            return wanted
        raise CaptionerError(
            f"{where}: no {what} column '{wanted}' (columns: {', '.join(columns)})"
        )
    for name in candidates:
        if name in columns:
            return name
    raise CaptionerError(
        f"{where}: no {what} column found (columns: {', '.join(columns)}); pass --{what}_column"
    )


def _is_imagefolder(source: str | os.PathLike) -> bool:
    path = Path(source).expanduser()
    return path.is_dir() and any(
        (d / f"metadata.{ext}").is_file()
        for d in [path, *[p for p in path.iterdir() if p.is_dir()]]
        for ext in ("jsonl", "csv", "parquet")
    )


def _paths(ds: Any) -> list[dict]:
    import datasets

    return ds.cast_column("image", datasets.Image(decode=False))["image"]


def _hidden(f: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in f.relative_to(root).parts)


def looks_like_path(source: str) -> bool:
    """Hub ids are `name` or `owner/name`; anything else that does not exist is a missing path."""
    return (
        source.startswith((".", "/", "~"))
        or "\\" in source
        or source.count("/") > 1
        or Path(source).suffix.lower() in MANIFEST_SUFFIXES + (".tar", ".parquet", ".arrow")
    )


def _short(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"[:300]
