"""Where caption rows go, and what an earlier run left there: one `.jsonl`/`.csv` file, or a
folder of JSONL shards. The caption job (`jobs/caption.py`) uses these on every executor.

Files are written so that nothing outside the target is touched and nothing is lost:
- new or replaced outputs and shards are written to a `tempfile.mkstemp` file in the target's
  folder and moved into place with `os.replace`, which never follows a symlink at the target's
  name; an output is only appended to when it is a regular file;
- a file output is flushed row by row and a shard is written whole, so a killed run loses at
  most the rows in flight and leaves at most a torn last line, which `--resume` drops;
- names that are not valid UTF-8 are kept surrogate-escaped (JSONL writes `\\udcXX` escapes that
  read back to the same name, CSV the original bytes), so `--resume` finds them again.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import re
import stat
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Protocol

from captioner.errors import CaptionerError

COLUMNS = ("image", "caption", "error")
SHARD_GLOB = "part-*.jsonl"
FILE_SUFFIXES = (".jsonl", ".csv")
_SURROGATE = re.compile("[\ud800-\udfff]")


@dataclass
class PreviousRows:
    """What an existing output holds, for `--resume` (read only: nothing is changed)."""

    done: set[str] = field(default_factory=set)  # images with a caption row
    errors: set[str] = field(default_factory=set)  # images with error rows only
    torn: list[Path] = field(default_factory=list)  # files whose last line a crash cut off


class RowWriter(Protocol):
    def write(self, row: dict[str, Any]) -> None: ...
    def close(self) -> None: ...


class RowsFile:
    """One `.jsonl` or `.csv` file, one row per image, flushed row by row."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def exists(self) -> bool:
        return os.path.lexists(self.path)

    def read(self) -> PreviousRows:
        """Its rows, by image. Half a last line (a killed run) is ignored here, and cut off only
        once the model has loaded (`open`)."""
        previous = PreviousRows()
        if not self.exists():
            return previous
        data = _read_regular(self.path)
        if data and not data.endswith(b"\n"):
            previous.torn.append(self.path)
        _add_rows(previous, self.path, _whole_lines(data))
        return previous

    def open(self, resume: bool, previous: PreviousRows, retry: set[str]) -> RowWriter:
        """A new (or replaced) output, or with `resume` the old one without its torn last line
        and the error rows about to be retried, appended to."""
        if not (resume and self.exists()):
            _make_parent(self.path)
            return _FileWriter.create(self.path)
        if previous.torn or retry:
            self._rewrite_without(retry)
        return _FileWriter.append(self.path)

    def _rewrite_without(self, drop: set[str]) -> None:
        text = _whole_lines(_read_regular(self.path))
        if _is_csv(self.path):
            rows = [r for r in csv.DictReader(io.StringIO(text, newline="")) if r.get("image")]
            buf = io.StringIO(newline="")
            writer = csv.DictWriter(buf, fieldnames=COLUMNS, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(r for r in rows if r["image"] not in drop)
            text = buf.getvalue()
        else:
            text = "".join(_jsonl_lines_without(text, drop))
        try:
            write_text_atomic(self.path, text)
        except OSError as err:
            raise CaptionerError(f"{self.path}: cannot rewrite ({_why(err)})") from None


class ShardFolder:
    """A folder of JSONL shards `part-*.jsonl`, each written whole (temp file + rename) once it
    holds `rows_per_shard` rows or the run ends: many writers' worth of rows, no torn shard."""

    def __init__(self, path: Path, rows_per_shard: int = 32) -> None:
        self.path, self.rows_per_shard = path, rows_per_shard

    def shards(self) -> list[Path]:
        return sorted(self.path.glob(SHARD_GLOB)) if self.path.is_dir() else []

    def exists(self) -> bool:
        return bool(self.shards())

    def read(self) -> PreviousRows:
        """The rows of every shard, by image; a shard's torn last line is not read."""
        previous = PreviousRows()
        for shard in self.shards():
            data = shard.read_bytes()
            if data and not data.endswith(b"\n"):
                previous.torn.append(shard)
            _add_rows(previous, shard, _whole_lines(data))
        return previous

    def open(self, resume: bool, previous: PreviousRows, retry: set[str]) -> RowWriter:
        """Shards to add to; without `resume` the old ones go (`--overwrite`), with it each
        shard with a torn last line or rows of `retry`'s images is rewritten without them."""
        _make_parent(self.path / "x")
        for shard in self.shards():
            if not resume:
                shard.unlink()
            elif shard in previous.torn or retry:
                lines = _jsonl_lines_without(_whole_lines(shard.read_bytes()), retry)
                if lines:
                    write_text_atomic(shard, "".join(lines))
                else:
                    shard.unlink()
        return _ShardWriter(self.path, self.rows_per_shard)


def output_for(output: str | os.PathLike, rows_per_shard: int) -> RowsFile | ShardFolder:
    """`out.jsonl`/`out.csv`: one file; a folder (existing, or a name with no suffix): shards."""
    path = Path(output)
    if path.suffix.lower() in FILE_SUFFIXES:
        return RowsFile(path)
    if path.is_dir() or not path.suffix:
        return ShardFolder(path, rows_per_shard)
    raise CaptionerError(
        f"{path}: --output must end in .jsonl or .csv, or name a folder (for JSONL shards)"
    )


def check_writable(path: Path) -> None:
    """Fail before the model loads when `path`'s folder cannot be made or written."""
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
        raise CaptionerError(f"{path}: cannot write (no writable folder at {folder})")


def read_previous(output: Path) -> PreviousRows:
    """The rows of an existing output (file or shard folder), by image."""
    return output_for(output, 1).read()


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


# ---- writers ----


class _FileWriter:
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
    def to_stream(cls, stream: IO[str]) -> _FileWriter:
        return cls(stream, own=False, is_csv=False, header=False)

    @classmethod
    def create(cls, output: Path) -> _FileWriter:
        """A temp file beside `output` that replaces whatever is at its name at once, so rows
        land in place as they are written."""
        fd, tmp = _mkstemp_beside(output)
        try:
            file = _text(fd)
            os.replace(tmp, output)
        except OSError as err:
            _discard(tmp)
            raise CaptionerError(f"{output}: cannot write ({_why(err)})") from None
        return cls(file, own=True, is_csv=_is_csv(output), header=True)

    @classmethod
    def append(cls, output: Path) -> _FileWriter:
        flags = os.O_WRONLY | os.O_APPEND | getattr(os, "O_NOFOLLOW", 0)
        try:
            fd = os.open(output, flags)
            if not _is_regular(os.fstat(fd)):
                os.close(fd)
                raise CaptionerError(f"{output}: not a regular file; cannot append to it")
        except OSError as err:
            raise CaptionerError(f"{output}: cannot append ({_why(err)})") from None
        header = _is_csv(output) and os.fstat(fd).st_size == 0
        return cls(_text(fd), own=True, is_csv=_is_csv(output), header=header)

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


def stream_writer(stream: IO[str]) -> RowWriter:
    """JSONL rows to an open text stream (stdout), flushed row by row."""
    return _FileWriter.to_stream(stream)


class _ShardWriter:
    def __init__(self, folder: Path, rows_per_shard: int) -> None:
        self.folder, self.rows_per_shard = folder, max(1, rows_per_shard)
        self.rows: list[str] = []

    def write(self, row: dict[str, Any]) -> None:
        self.rows.append(jsonl_line(row))
        if len(self.rows) >= self.rows_per_shard:
            self._flush()

    def close(self) -> None:
        self._flush()

    def _flush(self) -> None:
        if not self.rows:
            return
        shard = self.folder / f"part-{uuid.uuid4().hex}.jsonl"
        try:
            write_text_atomic(shard, "".join(self.rows))
        except OSError as err:
            raise CaptionerError(f"{shard}: cannot write ({_why(err)})") from None
        self.rows = []


# ---- reading ----


def _whole_lines(data: bytes) -> str:
    """The text of `data` up to its last newline (a torn last line left out)."""
    return data[: data.rfind(b"\n") + 1].decode("utf-8", errors="surrogateescape")


def _add_rows(previous: PreviousRows, output: Path, text: str) -> None:
    for image, error in _parse_rows(output, text):
        (previous.errors if error else previous.done).add(image)
    previous.errors -= previous.done


def _parse_rows(output: Path, text: str) -> list[tuple[str, bool]]:
    """(image, is an error row) for each row of an output's text."""
    if _is_csv(output):
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


def _jsonl_lines_without(text: str, drop: set[str]) -> list[str]:
    lines = text.splitlines(keepends=True)
    return [line for line in lines if line.strip() and json.loads(line).get("image") not in drop]


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


# ---- small file helpers ----


def _make_parent(path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise CaptionerError(f"{path}: cannot write ({_why(err)})") from None


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


def _discard(tmp: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(tmp)


def _is_csv(path: Path) -> bool:
    return path.suffix.lower() == ".csv"


def _is_regular(info: os.stat_result) -> bool:
    return stat.S_ISREG(info.st_mode)


def _why(err: OSError) -> str:
    return err.strerror or str(err)
