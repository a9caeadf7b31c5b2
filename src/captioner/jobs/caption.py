"""`captioner caption`: caption files, folders, globs, URLs and stdin lists into JSONL/CSV/sidecars.

The job around the engine (`generate.Captioner`): find the images, skip what is already done
(`--resume`, `--skip_existing`), write one row per image as soon as its batch is captioned
(flushed, so a killed run loses at most the batch in flight), and report bad images as rows with
an `error` field instead of stopping.

Files are written so that nothing outside the target is touched and nothing is lost:
- sidecars and new or replaced outputs are written to a `tempfile.mkstemp` file in the target's
  folder and moved into place with `os.replace`, which never follows a symlink at the target's
  name (a `cat.txt` that links elsewhere is replaced, its target untouched); an output is only
  appended to when it is a regular file;
- nothing is truncated or replaced before the model has loaded (a wrong model name leaves an
  `--overwrite` target as it was);
- two images that would share one sidecar (`cat.jpg` + `cat.png` -> `cat.txt`) are error rows,
  unless `on_collision="full_name"` (`cat.jpg.txt`, `cat.png.txt`);
- any file name the OS gives is captioned and written: names that are not valid UTF-8 are kept
  surrogate-escaped (JSONL writes `\\udcXX` escapes that read back to the same name, CSV the
  original bytes), so `--resume` finds them again.
"""

from __future__ import annotations

import contextlib
import csv
import glob
import io
import json
import os
import re
import stat
import sys
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from captioner.data.fetch import is_url
from captioner.data.images import IMAGE_EXTENSIONS
from captioner.decoding import DecodingOptions
from captioner.engine import Captioner
from captioner.errors import CaptionerError
from captioner.jobs.progress import progress_bar

COLUMNS = ("image", "caption", "error")
COLLISION_POLICIES = ("error", "full_name")
_SURROGATE = re.compile("[\ud800-\udfff]")


@dataclass
class CaptionSummary:
    """What a job did: counts, plus the failed `(image, reason)` pairs and notes (what was
    repaired in an earlier output) for the report."""

    captioned: int = 0
    skipped: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


@dataclass
class PreviousRows:
    """What an existing JSONL/CSV output holds, for `--resume` (read only: nothing is changed)."""

    done: set[str] = field(default_factory=set)  # images with a caption row
    errors: set[str] = field(default_factory=set)  # images with error rows only
    torn_tail: bool = False  # a killed run left half a last line


def expand_inputs(inputs: Iterable[str], stdin: IO[str] | None = None) -> list[str]:
    """Files, folders (recursive), globs, http(s) URLs and `-` (one input per stdin line).

    Folders and globs are sorted so runs are repeatable; duplicates are dropped. A path that does
    not exist is kept: it becomes an error row ("file not found"), like any other bad input.
    """
    out: list[str] = []
    for item in inputs:
        if item == "-":
            lines = _stdin_lines(stdin or sys.stdin)
            lines = [s.strip() for s in lines if s.strip() and not s.lstrip().startswith("#")]
            out.extend(expand_inputs(lines))
        elif is_url(item):
            out.append(item)
        elif os.path.isdir(item):
            found = (Path(r) / f for r, _, files in os.walk(item) for f in files)
            out.extend(sorted(str(p) for p in found if p.suffix.lower() in IMAGE_EXTENSIONS))
        elif glob.has_magic(item) and not os.path.exists(item):
            matches = sorted(glob.glob(item, recursive=True))
            if not matches:
                raise CaptionerError(f"{item}: no files match this pattern")
            out.extend(m for m in matches if os.path.isfile(m))
        else:
            out.append(item)
    return list(dict.fromkeys(out))


def _stdin_lines(stream: IO[str]) -> list[str]:
    """Lines of a list of paths; bytes that are not UTF-8 become the same surrogate escapes the
    OS's own listings use, so such a name still opens."""
    raw = getattr(stream, "buffer", None)
    if raw is not None:
        return [os.fsdecode(line) for line in raw.read().splitlines()]
    return stream.read().splitlines()


def sidecar_path(image: str, extension: str = ".txt") -> Path:
    """`photo.jpg` -> `photo.txt` (kohya / taggui convention)."""
    return Path(image).with_suffix(extension)


def read_previous(output: Path) -> PreviousRows:
    """The rows of an existing JSONL/CSV output, by image. Half a last line (a killed run) is
    ignored here, and cut off only once the model has loaded."""
    previous = PreviousRows()
    if not os.path.lexists(output):
        return previous
    data = _read_regular(output)
    if data and not data.endswith(b"\n"):
        previous.torn_tail = True
        data = data[: data.rfind(b"\n") + 1]
    for image, error in _parse_rows(output, data.decode("utf-8", errors="surrogateescape")):
        (previous.errors if error else previous.done).add(image)
    previous.errors -= previous.done
    return previous


def done_in_output(output: Path) -> set[str]:
    """Images already present in a JSONL/CSV output (any row, error rows included)."""
    previous = read_previous(output)
    return previous.done | previous.errors


def _parse_rows(output: Path, text: str) -> list[tuple[str, bool]]:
    """(image, is an error row) for each row of an output's text."""
    if output.suffix.lower() == ".csv":
        rows = csv.DictReader(io.StringIO(text, newline=""))
        return [(r["image"], bool(r.get("error"))) for r in rows if r.get("image")]
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            out.append((row["image"], "error" in row))
        except (ValueError, KeyError, TypeError):
            raise CaptionerError(
                f"{output}:{n}: not a caption row; cannot resume from it"
            ) from None
    return out


def _read_regular(path: Path) -> bytes:
    """A regular file's bytes, without following a symlink at `path`."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | os.O_NONBLOCK)
    except OSError as err:
        raise CaptionerError(f"{path}: cannot read ({_why(err)})") from None
    with open(fd, "rb") as f:
        if not _is_regular(os.fstat(fd)):
            raise CaptionerError(f"{path}: not a regular file")
        return f.read()


class _Writer:
    """One row per image to JSONL (file or stdout) or CSV, flushed row by row."""

    def __init__(self, file: IO[str], own: bool, is_csv: bool, header: bool) -> None:
        self.file, self.own = file, own
        self.csv = None
        if is_csv:
            self.csv = csv.DictWriter(self.file, fieldnames=COLUMNS, extrasaction="ignore")
            if header:
                self.csv.writeheader()
                self.file.flush()

    @classmethod
    def to_stdout(cls, stdout: IO[str]) -> _Writer:
        return cls(stdout, own=False, is_csv=False, header=False)

    @classmethod
    def create(cls, output: Path) -> _Writer:
        """A new output (or `--overwrite`): written in a temp file beside it that replaces
        whatever is at its name at once, so rows land in place as they are written."""
        fd, tmp = _mkstemp_beside(output)
        try:
            file = _text(fd)
            os.replace(tmp, output)
        except OSError as err:
            _discard(tmp)
            raise CaptionerError(f"{output}: cannot write ({_why(err)})") from None
        return cls(file, own=True, is_csv=_is_csv(output), header=True)

    @classmethod
    def append(cls, output: Path, previous: PreviousRows, retry: set[str]) -> _Writer:
        """`--resume`: drop half a last line and the error rows about to be retried (through a
        replacing temp file), then append to the output, which must be a regular file."""
        if previous.torn_tail or retry:
            _rewrite_without(output, retry)
        flags = os.O_WRONLY | os.O_APPEND | getattr(os, "O_NOFOLLOW", 0)
        try:
            fd = os.open(output, flags)
            if not _is_regular(os.fstat(fd)):
                os.close(fd)
                raise CaptionerError(f"{output}: not a regular file; cannot append to it")
        except OSError as err:
            raise CaptionerError(f"{output}: cannot append ({_why(err)})") from None
        file = _text(fd)
        header = _is_csv(output) and os.fstat(fd).st_size == 0
        return cls(file, own=True, is_csv=_is_csv(output), header=header)

    def write(self, row: dict[str, Any]) -> None:
        try:
            if self.csv is not None:
                caps = row.get("captions")
                caption = json.dumps(caps, ensure_ascii=False) if caps else row.get("caption")
                self.csv.writerow(dict(row, caption=caption))
            else:
                self.file.write(jsonl_line(row))
            self.file.flush()
        except OSError as err:  # a full disk stops the run with one line, rows so far kept
            raise CaptionerError(f"cannot write the output ({_why(err)})") from None

    def close(self) -> None:
        if self.own:
            self.file.close()


def jsonl_line(row: dict[str, Any]) -> str:
    """One JSON line. Non-ASCII text stays readable; a surrogate-escaped file name (bytes that
    are not UTF-8) is written as its `\\udcXX` escape, which reads back to the same name."""
    text = json.dumps(row, ensure_ascii=False)
    return _SURROGATE.sub(lambda m: f"\\u{ord(m.group()):04x}", text) + "\n"


def write_text_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` through a temp file in its folder and `os.replace`: a killed run
    never leaves half a file, and a symlink (or FIFO) at `path` is replaced, never followed."""
    fd, tmp = _mkstemp_beside(path)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", errors="surrogateescape") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        _discard(tmp)
        raise


def caption_files(
    model: str | os.PathLike | Captioner,
    inputs: Iterable[str],
    *,
    output: str | os.PathLike | None = None,
    sidecar: bool = False,
    caption_extension: str = ".txt",
    skip_existing: bool = False,
    overwrite: bool = False,
    resume: bool = False,
    retry_errors: bool = False,
    on_collision: str = "error",
    decoding: DecodingOptions | None = None,
    batch_size: int | None = None,
    device: str | None = None,
    trust_remote_code: bool = False,
    dtype: str = "float32",
    int8: bool = False,
    progress: bool = False,
    stdin: IO[str] | None = None,
    stdout: IO[str] | None = None,
) -> CaptionSummary:
    """Caption every image in `inputs`; rows go to `output` (.jsonl/.csv) or stdout as JSONL.

    With `sidecar`, each image also gets `image<caption_extension>` next to it (then nothing is
    printed to stdout unless `output` is given); `on_collision` says what happens when two
    images would share one (`error`: error rows; `full_name`: `image.jpg.txt`). `retry_errors`
    (with `resume`) captions again the images whose earlier row is an error, replacing that row.
    Checks that need no model run first, so mistakes fail in a second, not after the model has
    loaded; nothing is written before it has loaded.
    """
    # 1. Option checks that need no model.
    out_path = _output_path(output, skip_existing, overwrite, resume, retry_errors)
    if on_collision not in COLLISION_POLICIES:
        choices = " | ".join(COLLISION_POLICIES)
        raise CaptionerError(f"--on_collision must be one of {choices}, not {on_collision!r}")
    # 2. The work list: every input, minus what --resume / --skip_existing say is done.
    images = expand_inputs(inputs, stdin)
    if not images:
        raise CaptionerError("no images found in the given inputs")
    previous = read_previous(out_path) if resume and out_path is not None else PreviousRows()
    done = previous.done if retry_errors else previous.done | previous.errors
    targets, collided = _sidecar_targets(images, caption_extension, on_collision, sidecar)
    todo = _not_done(images, done, targets, collided, skip_existing, overwrite)
    clashes = [im for im in todo if im in collided]
    todo = [im for im in todo if im not in collided]
    summary = CaptionSummary(skipped=len(images) - len(todo) - len(clashes))
    if previous.torn_tail:
        summary.notes.append(f"{out_path}: dropped its torn last line (left by a crash)")
    # 3. The model, before any file is touched.
    captioner = None
    if todo:
        captioner = model if isinstance(model, Captioner) else None
        if captioner is None:
            captioner = Captioner.from_pretrained(
                model, device=device, trust_remote_code=trust_remote_code, dtype=dtype, int8=int8
            )
    writer = _open_writer(out_path, sidecar, resume, previous, todo, stdout)
    try:
        for image in clashes:
            _report(summary, writer, {"image": image, "error": collided[image]})
        if captioner is None:
            return summary
        # 4. Caption batch by batch; each row is written as soon as its batch is done.
        with progress_bar(len(todo), "captioning", enabled=progress) as advance:
            results = captioner.caption_iter(
                todo, decoding, batch_size=batch_size, progress=advance
            )
            for i, result in results:
                row = _row(todo[i], result, sidecar, targets.get(todo[i]))
                _report(summary, writer, row)
    finally:
        if writer:
            writer.close()
    return summary


def _report(summary: CaptionSummary, writer: _Writer | None, row: dict[str, Any]) -> None:
    if "error" in row:
        summary.failed.append((row["image"], row["error"]))
    else:
        summary.captioned += 1
    if writer:
        writer.write(row)


def _open_writer(
    out_path: Path | None,
    sidecar: bool,
    resume: bool,
    previous: PreviousRows,
    todo: list[str],
    stdout: IO[str] | None,
) -> _Writer | None:
    if out_path is None:
        return None if sidecar else _Writer.to_stdout(stdout or sys.stdout)
    if resume and os.path.lexists(out_path):
        return _Writer.append(out_path, previous, retry=previous.errors & set(todo))
    try:
        out_path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise CaptionerError(f"{out_path}: cannot write ({_why(err)})") from None
    return _Writer.create(out_path)


def _output_path(
    output: str | os.PathLike | None,
    skip_existing: bool,
    overwrite: bool,
    resume: bool,
    retry_errors: bool = False,
) -> Path | None:
    if skip_existing and overwrite:
        raise CaptionerError("--skip_existing and --overwrite contradict each other; pick one")
    if resume and overwrite:
        raise CaptionerError("--resume and --overwrite contradict each other; pick one")
    if resume and output is None:
        raise CaptionerError("--resume needs --output FILE (it skips images already in it)")
    if retry_errors and not resume:
        raise CaptionerError("--retry_errors goes with --resume (it retries the error rows)")
    out_path = Path(output) if output is not None else None
    if out_path is not None and out_path.suffix.lower() not in (".jsonl", ".csv"):
        raise CaptionerError(f"{out_path}: --output must end in .jsonl or .csv")
    if out_path is not None and os.path.lexists(out_path) and not (resume or overwrite):
        raise CaptionerError(
            f"{out_path} already exists: pass --resume to continue it or --overwrite to replace it"
        )
    if out_path is not None:
        _check_writable_folder(out_path)
    return out_path


def _check_writable_folder(out_path: Path) -> None:
    """Fail before the model loads when the output's folder cannot be made or written."""
    folder = out_path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
        raise CaptionerError(f"{out_path}: cannot write (no writable folder at {folder})")


def _sidecar_targets(
    images: list[str], extension: str, on_collision: str, sidecar: bool
) -> tuple[dict[str, Path], dict[str, str]]:
    """Each local image's sidecar path, and {image: reason} for images that share one."""
    if not sidecar:
        return {}, {}
    by_target: dict[str, list[str]] = {}
    for image in images:
        if not is_url(image):
            key = os.path.normcase(os.path.abspath(sidecar_path(image, extension)))
            by_target.setdefault(key, []).append(image)
    targets = {im: sidecar_path(im, extension) for im in images if not is_url(im)}
    collided: dict[str, str] = {}
    for group in by_target.values():
        if len(group) < 2:
            continue
        if on_collision == "full_name":
            for image in group:
                targets[image] = Path(image + extension)
            continue
        shared = targets[group[0]].name
        names = ", ".join(Path(im).name for im in group)
        for image in group:
            collided[image] = (
                f"{names} would share one caption file ({shared}): rename one, or pass "
                f"--on_collision full_name to write {Path(image).name}{extension}"
            )
    return targets, collided


def _not_done(
    images: list[str],
    done: set[str],
    targets: dict[str, Path],
    collided: dict[str, str],
    skip_existing: bool,
    overwrite: bool,
) -> list[str]:
    todo = [im for im in images if im not in done]
    existing = [im for im in todo if im in targets and im not in collided]
    existing = [im for im in existing if os.path.lexists(targets[im])]
    if existing and not (skip_existing or overwrite):
        raise CaptionerError(
            f"{len(existing)} caption file(s) already exist (e.g. {targets[existing[0]]}): "
            "pass --skip_existing to keep them or --overwrite to replace them"
        )
    if skip_existing:
        keep = set(existing)
        todo = [im for im in todo if im not in keep]
    return todo


def _row(image: str, result: Any, sidecar: bool, target: Path | None) -> dict[str, Any]:
    """The output row of one image; writes its sidecar file (at `target`) when asked."""
    row: dict[str, Any] = {"image": image}
    if isinstance(result, Exception):
        row["error"] = getattr(result, "reason", str(result))
        return row
    row["caption"] = result[0] if isinstance(result, list) else result
    if isinstance(result, list):
        row["captions"] = result
    if sidecar and target is None:
        row["error"] = "cannot write a sidecar caption file next to a URL"
    elif target is not None:
        try:
            write_text_atomic(target, row["caption"] + "\n")
        except OSError as err:  # read-only folder, full disk: this image failed
            row["error"] = f"cannot write caption file: {_why(err)}"
    return row


# ---- small file helpers ----


def _mkstemp_beside(path: Path) -> tuple[int, str]:
    """A new, private temp file in `path`'s folder (O_EXCL: never an existing file or link),
    given the permissions a plain new file would get."""
    fd, tmp = tempfile.mkstemp(dir=path.parent or ".", prefix=f".{path.name}.", suffix=".tmp")
    with contextlib.suppress(OSError):
        os.fchmod(fd, 0o666 & ~_umask())
    return fd, tmp


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _text(fd: int) -> IO[str]:
    return open(fd, "w", encoding="utf-8", errors="surrogateescape", newline="")  # noqa: SIM115


def _rewrite_without(output: Path, drop: set[str]) -> None:
    """Rewrite `output` without its torn last line and without the rows of `drop`'s images."""
    data = _read_regular(output)
    data = data[: data.rfind(b"\n") + 1]
    text = data.decode("utf-8", errors="surrogateescape")
    if _is_csv(output):
        lines = io.StringIO(text, newline="")
        rows = [r for r in csv.DictReader(lines) if r.get("image") not in drop]
        buf = io.StringIO(newline="")
        writer = csv.DictWriter(buf, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
        text = buf.getvalue()
    else:
        keep = [
            line
            for line in text.splitlines(keepends=True)
            if line.strip() and json.loads(line).get("image") not in drop
        ]
        text = "".join(keep)
    try:
        write_text_atomic(output, text)
    except OSError as err:
        raise CaptionerError(f"{output}: cannot rewrite ({_why(err)})") from None


def _discard(tmp: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(tmp)


def _is_csv(path: Path) -> bool:
    return path.suffix.lower() == ".csv"


def _is_regular(info: os.stat_result) -> bool:
    return stat.S_ISREG(info.st_mode)


def _why(err: OSError) -> str:
    return err.strerror or str(err)
