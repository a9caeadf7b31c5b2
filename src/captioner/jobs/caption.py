"""`captioner caption`: caption files, folders, globs, URLs and stdin lists into JSONL/CSV/sidecars.

The job around the engine (`generate.Captioner`): find the images, skip what is already done
(`--resume`, `--skip_existing`), write one row per image as soon as its batch is captioned
(flushed, so a killed run loses at most the batch in flight), and report bad images as rows with
an `error` field instead of stopping.
"""

from __future__ import annotations

import csv
import glob
import io
import json
import os
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from captioner.decoding import DecodingOptions
from captioner.engine import Captioner
from captioner.errors import CaptionerError
from captioner.fetch import is_url
from captioner.images import IMAGE_EXTENSIONS
from captioner.jobs.progress import progress_bar

COLUMNS = ("image", "caption", "error")


@dataclass
class CaptionSummary:
    """What a job did: counts, plus the failed `(image, reason)` pairs for the report."""

    captioned: int = 0
    skipped: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)


def expand_inputs(inputs: Iterable[str], stdin: IO[str] | None = None) -> list[str]:
    """Files, folders (recursive), globs, http(s) URLs and `-` (one input per stdin line).

    Folders and globs are sorted so runs are repeatable; duplicates are dropped. A path that does
    not exist is kept: it becomes an error row ("file not found"), like any other bad input.
    """
    out: list[str] = []
    for item in inputs:
        if item == "-":
            lines = (stdin or sys.stdin).read().splitlines()
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


def sidecar_path(image: str, extension: str = ".txt") -> Path:
    """`photo.jpg` -> `photo.txt` (kohya / taggui convention)."""
    return Path(image).with_suffix(extension)


def done_in_output(output: Path) -> set[str]:
    """Images already present in a JSONL/CSV output, for `--resume`.

    A run killed mid-write may leave half a last line: it is cut off here, so the image is simply
    captioned again and appears once.
    """
    if not output.exists():
        return set()
    data = output.read_bytes()
    if data and not data.endswith(b"\n"):
        data = data[: data.rfind(b"\n") + 1]
        with open(output, "r+b") as f:
            f.truncate(len(data))
    text = data.decode("utf-8")
    if output.suffix.lower() == ".csv":
        return {row["image"] for row in csv.DictReader(io.StringIO(text)) if row.get("image")}
    done = set()
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            done.add(json.loads(line)["image"])
        except (ValueError, KeyError, TypeError):
            raise CaptionerError(
                f"{output}:{n}: not a caption row; cannot resume from it"
            ) from None
    return done


class _Writer:
    """One row per image to JSONL (file or stdout) or CSV, flushed row by row."""

    def __init__(self, output: Path | None, append: bool, stdout: IO[str]) -> None:
        if output is None:
            self.file = stdout
        else:
            try:
                output.parent.mkdir(parents=True, exist_ok=True)
                self.file = open(output, "a" if append else "w", newline="")  # noqa: SIM115
            except OSError as err:
                raise CaptionerError(f"{output}: cannot write ({err.strerror or err})") from None
        self.own = output is not None
        self.csv = None
        if output is not None and output.suffix.lower() == ".csv":
            self.csv = csv.DictWriter(self.file, fieldnames=COLUMNS, extrasaction="ignore")
            if not append or self.file.tell() == 0:
                self.csv.writeheader()

    def write(self, row: dict[str, Any]) -> None:
        if self.csv is not None:
            caps = row.get("captions")
            self.csv.writerow(dict(row, caption=json.dumps(caps) if caps else row.get("caption")))
        else:
            self.file.write(json.dumps(row, ensure_ascii=False) + "\n")
        self.file.flush()

    def close(self) -> None:
        if self.own:
            self.file.close()


def _write_sidecar(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text + "\n", encoding="utf-8")
    os.replace(tmp, path)  # atomic: a killed run never leaves half a caption file


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
    decoding: DecodingOptions | None = None,
    batch_size: int | None = None,
    device: str | None = None,
    trust_remote_code: bool = False,
    progress: bool = False,
    stdin: IO[str] | None = None,
    stdout: IO[str] | None = None,
) -> CaptionSummary:
    """Caption every image in `inputs`; rows go to `output` (.jsonl/.csv) or stdout as JSONL.

    With `sidecar`, each image also gets `image<caption_extension>` next to it (then nothing is
    printed to stdout unless `output` is given). Checks that need no model run first, so mistakes
    fail in a second, not after the model has loaded.
    """
    # 1. Option checks that need no model.
    out_path = _output_path(output, skip_existing, overwrite, resume)
    # 2. The work list: every input, minus what --resume / --skip_existing say is done.
    images = expand_inputs(inputs, stdin)
    if not images:
        raise CaptionerError("no images found in the given inputs")
    todo = _not_done(images, out_path, resume, sidecar, caption_extension, skip_existing, overwrite)
    summary = CaptionSummary(skipped=len(images) - len(todo))
    want_rows = out_path is not None or not sidecar
    writer = _Writer(out_path, append=resume, stdout=stdout or sys.stdout) if want_rows else None
    try:
        if not todo:
            return summary
        # 3. The model.
        captioner = model if isinstance(model, Captioner) else None
        if captioner is None:
            captioner = Captioner.from_pretrained(
                model, device=device, trust_remote_code=trust_remote_code
            )
        # 4. Caption batch by batch; each row is written as soon as its batch is done.
        with progress_bar(len(todo), "captioning", enabled=progress) as advance:
            results = captioner.caption_iter(
                todo, decoding, batch_size=batch_size, progress=advance
            )
            for i, result in results:
                row = _row(todo[i], result, sidecar, caption_extension)
                if "error" in row:
                    summary.failed.append((row["image"], row["error"]))
                else:
                    summary.captioned += 1
                if writer:
                    writer.write(row)
    finally:
        if writer:
            writer.close()
    return summary


def _output_path(
    output: str | os.PathLike | None, skip_existing: bool, overwrite: bool, resume: bool
) -> Path | None:
    if skip_existing and overwrite:
        raise CaptionerError("--skip_existing and --overwrite contradict each other; pick one")
    if resume and overwrite:
        raise CaptionerError("--resume and --overwrite contradict each other; pick one")
    if resume and output is None:
        raise CaptionerError("--resume needs --output FILE (it skips images already in it)")
    out_path = Path(output) if output is not None else None
    if out_path is not None and out_path.suffix.lower() not in (".jsonl", ".csv"):
        raise CaptionerError(f"{out_path}: --output must end in .jsonl or .csv")
    if out_path is not None and out_path.exists() and not (resume or overwrite):
        raise CaptionerError(
            f"{out_path} already exists: pass --resume to continue it or --overwrite to replace it"
        )
    return out_path


def _not_done(
    images: list[str],
    out_path: Path | None,
    resume: bool,
    sidecar: bool,
    caption_extension: str,
    skip_existing: bool,
    overwrite: bool,
) -> list[str]:
    todo = images
    if resume:
        done = done_in_output(out_path)
        todo = [im for im in todo if im not in done]
    if sidecar:
        existing = [
            im for im in todo if not is_url(im) and sidecar_path(im, caption_extension).exists()
        ]
        if existing and not (skip_existing or overwrite):
            raise CaptionerError(
                f"{len(existing)} caption file(s) already exist (e.g. "
                f"{sidecar_path(existing[0], caption_extension)}): "
                "pass --skip_existing to keep them or --overwrite to replace them"
            )
        if skip_existing:
            keep = set(existing)
            todo = [im for im in todo if im not in keep]
    return todo


def _row(image: str, result: Any, sidecar: bool, caption_extension: str) -> dict[str, Any]:
    """The output row of one image; writes its sidecar file when asked."""
    row: dict[str, Any] = {"image": image}
    if isinstance(result, Exception):
        row["error"] = getattr(result, "reason", str(result))
        return row
    row["caption"] = result[0] if isinstance(result, list) else result
    if isinstance(result, list):
        row["captions"] = result
    if sidecar:
        if is_url(image):
            row["error"] = "cannot write a sidecar caption file next to a URL"
        else:
            try:
                _write_sidecar(sidecar_path(image, caption_extension), row["caption"])
            except OSError as err:  # read-only folder, full disk: this image failed
                row["error"] = f"cannot write caption file: {err.strerror or err}"
    return row
