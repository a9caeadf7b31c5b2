"""`captioner caption`: the captioning job, whichever executor runs the model.

One job, two executors. This module owns everything but running the model: the options
(`CaptionOptions`, one field per `caption` flag, from which the CLI generates the flags), the
inputs (files, folders, globs, URLs, `-` for stdin, `@list.txt`, Parquet/JSONL manifests), what
is already done (`--resume`, `--skip_existing`), each result's row, sidecar file and place in
the summary, and where rows go (`jobs/caption_outputs.py`: a .jsonl/.csv file, stdout, or a
folder of JSONL shards). The executors (`jobs/executors/`: `local`, this process; `ray`, a pool
of Ray actors) only turn a list of images into results, so every flag means the same on both.

- Checks that need no model run first, so mistakes fail in a second, and nothing is written (no
  output truncated or replaced) before the executor has loaded the model and given its first
  result: a wrong model name leaves an `--overwrite` target as it was.
- A file output gets one row per image as soon as it is captioned (flushed), a shard folder one
  whole shard per batch, so a killed run loses at most the batch in flight; `--resume` goes on.
- Bad images become rows with an `error` field instead of stopping the run.
- Two images that would share one sidecar (`cat.jpg` + `cat.png` -> `cat.txt`) are error rows,
  unless `on_collision="full_name"` (`cat.jpg.txt`, `cat.png.txt`).
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from captioner.data.fetch import is_url
from captioner.data.images import IMAGE_EXTENSIONS
from captioner.decoding import DecodingOptions
from captioner.errors import CaptionerError
from captioner.jobs.caption_outputs import (
    PreviousRows,
    RowsFile,
    RowWriter,
    ShardFolder,
    check_writable,
    jsonl_line,
    output_for,
    read_previous,
    stream_writer,
    write_text_atomic,
)
from captioner.jobs.executors import Results, Work
from captioner.jobs.progress import progress_bar
from captioner.options import LoadOptions

__all__ = [
    "CaptionJob", "CaptionOptions", "CaptionSummary", "caption_files", "expand_inputs",
    "jsonl_line", "read_previous", "run_caption", "sidecar_path", "write_text_atomic",
]  # fmt: skip

COLLISION_POLICIES = ("error", "full_name")
ENGINES = ("local", "ray")
MANIFEST_SUFFIXES = (".parquet", ".jsonl")
DEFAULT_ROWS_PER_SHARD = 32


def _flag(default: Any, help: str, *names: str) -> Any:
    return field(default=default, metadata={"help": help, "flags": names})


@dataclass(frozen=True)
class CaptionOptions:
    """Every `captioner caption` flag but the decoding and load ones, with its default and its
    rule, once: the CLI makes one flag per field. The last three are Ray's, refused locally."""

    output: str | None = _flag(
        None,
        "Rows to a .jsonl or .csv file, or a folder of JSONL shards (default: JSONL on stdout).",
        "-o",
    )
    sidecar: bool = _flag(False, "Write image.txt next to each image.")
    caption_extension: str = _flag(".txt", "Sidecar suffix (.txt, .caption).")
    skip_existing: bool = _flag(False, "Keep existing sidecars.")
    overwrite: bool = _flag(False, "Replace sidecars / --output.")
    resume: bool = _flag(False, "Skip images already in --output.")
    retry_errors: bool = _flag(False, "With --resume: caption the error rows again.")
    on_collision: str = _flag(
        "error",
        "Two images, one sidecar name (cat.jpg + cat.png): error | full_name (cat.jpg.txt).",
    )
    batch_size: int | None = _flag(None, "Images per generate call (default: automatic; Ray 32).")
    seed: int | None = _flag(None, "Makes --do_sample repeatable.")
    progress: bool = _flag(True, "Progress bar (stderr).")
    feature_cache: str = _flag(
        "auto",
        "Cached vision-tower outputs of these images (captioner train fills them): auto (the "
        "model's own cache, if it has one) | off | a feature-cache folder.",
    )
    engine: str = _flag("local", "local | ray (the images on a pool of Ray actors).")
    ray_address: str | None = _flag(None, "Ray: join this cluster (default: a local instance).")
    num_workers: int | None = _flag(
        None, "Ray: actors, each holding one model (default: CPUs / 2)."
    )
    gpus_per_worker: float = _flag(0.0, "Ray: GPUs per actor (e.g. 1, or 0.5 for two per GPU).")

    def __post_init__(self) -> None:
        if self.skip_existing and self.overwrite:
            raise CaptionerError("--skip_existing and --overwrite contradict each other; pick one")
        if self.resume and self.overwrite:
            raise CaptionerError("--resume and --overwrite contradict each other; pick one")
        if self.resume and self.output is None:
            raise CaptionerError("--resume needs --output (it skips images already in it)")
        if self.retry_errors and not self.resume:
            raise CaptionerError("--retry_errors goes with --resume (it retries the error rows)")
        if self.on_collision not in COLLISION_POLICIES:
            choices = " | ".join(COLLISION_POLICIES)
            raise CaptionerError(
                f"--on_collision must be one of {choices}, not {self.on_collision!r}"
            )
        if self.engine not in ENGINES:
            raise CaptionerError(f"--engine must be local or ray, not {self.engine!r}")
        for name in RAY_ONLY:
            if self.engine != "ray" and getattr(self, name) not in (None, 0):
                raise CaptionerError(f"--{name} goes with --engine ray")
        for name in ("batch_size", "num_workers"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise CaptionerError(f"--{name} must be >= 1, got {getattr(self, name)}")
        if self.gpus_per_worker < 0:
            raise CaptionerError(f"--gpus_per_worker must be >= 0, got {self.gpus_per_worker}")


RAY_ONLY = ("ray_address", "num_workers", "gpus_per_worker")


@dataclass
class CaptionJob:
    """What `captioner caption` does: caption `inputs` with `model` (a folder or Hub id; a loaded
    `Captioner` on the local engine), loaded as `load` says, decoding as `decoding` says."""

    model: Any
    inputs: list[str]
    options: CaptionOptions = field(default_factory=CaptionOptions)
    decoding: DecodingOptions | None = None
    load: LoadOptions = field(default_factory=LoadOptions)


@dataclass
class CaptionSummary:
    """What a job did: counts, plus the failed `(image, reason)` pairs and notes (what was
    repaired in an earlier output) for the report."""

    captioned: int = 0
    skipped: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, row: dict[str, Any]) -> None:
        if "error" in row:
            self.failed.append((row["image"], row["error"]))
        else:
            self.captioned += 1


@dataclass
class _Plan:
    """The work list and what the rows need, decided before the model loads."""

    output: RowsFile | ShardFolder | None
    previous: PreviousRows
    todo: list[str]
    clashes: dict[str, str]  # image -> why it has no sidecar of its own
    targets: dict[str, Path]  # image -> its sidecar file
    summary: CaptionSummary


def run_caption(
    job: CaptionJob, *, stdin: IO[str] | None = None, stdout: IO[str] | None = None
) -> CaptionSummary:
    """Caption every image of `job.inputs` not already done; rows go to `options.output` or
    `stdout` (JSONL), sidecars beside the images. Returns what was done."""
    options = job.options
    plan = _plan(job, stdin)
    work = Work(
        job.model, job.load, job.decoding, options.batch_size, options.seed, options.feature_cache
    )
    writer: RowWriter | None = None
    with progress_bar(len(plan.todo), "captioning", enabled=options.progress) as advance:
        results = _execute(options, plan.todo, work, advance) if plan.todo else iter(())
        try:
            first = next(results, None)  # the model has loaded: now the output may change
            writer = _open_writer(plan, options, stdout)
            for image, reason in plan.clashes.items():
                _report(plan.summary, writer, {"image": image, "error": reason})
            while first is not None:
                index, result = first
                image = plan.todo[index]
                row = result_row(image, result, options.sidecar, plan.targets.get(image))
                _report(plan.summary, writer, row)
                first = next(results, None)
        finally:
            if hasattr(results, "close"):
                results.close()  # stops the executor (and a Ray instance it started)
            if writer is not None:
                writer.close()
    return plan.summary


def caption_files(
    model: Any,
    inputs: Iterable[str],
    *,
    decoding: DecodingOptions | None = None,
    load: LoadOptions | None = None,
    stdin: IO[str] | None = None,
    stdout: IO[str] | None = None,
    **options: Any,
) -> CaptionSummary:
    """`run_caption` with keywords: any `CaptionOptions` field (`output=`, `sidecar=`,
    `resume=`, `engine="ray"`, ...) or `LoadOptions` field (`device=`, `dtype=`, ...). No
    progress bar unless `progress=True`."""
    load_names = {f.name for f in dataclasses.fields(LoadOptions)}
    load = (load or LoadOptions()).replace(**{k: v for k, v in options.items() if k in load_names})
    given = {k: v for k, v in options.items() if k not in load_names}
    if "output" in given and given["output"] is not None:
        given["output"] = os.fspath(given["output"])
    job = CaptionJob(model, list(inputs), CaptionOptions(**{"progress": False, **given}),
                     decoding, load)  # fmt: skip
    return run_caption(job, stdin=stdin, stdout=stdout)


# ---- 1. the plan: inputs, outputs, what is done ----


def expand_inputs(inputs: Iterable[str], stdin: IO[str] | None = None) -> list[str]:
    """Files, folders (recursive), globs, http(s) URLs, `-` (one input per stdin line),
    `@list.txt` (one input per line) and Parquet/JSONL manifests with an `image` column.

    Folders and globs are sorted so runs are repeatable; duplicates are dropped. A path that does
    not exist is kept: it becomes an error row ("file not found"), like any other bad input.
    """
    out: list[str] = []
    for item in inputs:
        if item == "-":
            out.extend(expand_inputs(_listed(_stream_lines(stdin or sys.stdin))))
        elif item.startswith("@") and len(item) > 1 and not os.path.exists(item):
            out.extend(expand_inputs(_listed(_file_lines(item[1:]))))
        elif is_url(item):
            out.append(item)
        elif os.path.isdir(item):
            found = (Path(r) / f for r, _, files in os.walk(item) for f in files)
            out.extend(sorted(str(p) for p in found if p.suffix.lower() in IMAGE_EXTENSIONS))
        elif Path(item).suffix.lower() in MANIFEST_SUFFIXES and os.path.isfile(item):
            out.extend(_manifest_images(Path(item)))
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


def _plan(job: CaptionJob, stdin: IO[str] | None) -> _Plan:
    options = job.options
    output = _output(options)
    images = expand_inputs(job.inputs, stdin)
    if not images:
        raise CaptionerError("no images found in the given inputs")
    previous = output.read() if options.resume and output is not None else PreviousRows()
    done = previous.done if options.retry_errors else previous.done | previous.errors
    targets, collided = _sidecar_targets(images, options)
    todo = _not_done(images, done, targets, collided, options)
    clashes = {im: collided[im] for im in todo if im in collided}
    todo = [im for im in todo if im not in collided]
    summary = CaptionSummary(skipped=len(images) - len(todo) - len(clashes))
    summary.notes += [f"{p}: dropped its torn last line (left by a crash)" for p in previous.torn]
    return _Plan(output, previous, todo, clashes, targets, summary)


def _output(options: CaptionOptions) -> RowsFile | ShardFolder | None:
    if options.output is None:
        return None
    output = output_for(options.output, options.batch_size or DEFAULT_ROWS_PER_SHARD)
    if output.exists() and not (options.resume or options.overwrite):
        raise CaptionerError(
            f"{output.path} already holds caption rows: pass --resume to continue it or "
            "--overwrite to replace it"
        )
    check_writable(output.path)
    return output


def _sidecar_targets(
    images: list[str], options: CaptionOptions
) -> tuple[dict[str, Path], dict[str, str]]:
    """Each local image's sidecar path, and {image: reason} for images that share one."""
    if not options.sidecar:
        return {}, {}
    extension = options.caption_extension
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
        if options.on_collision == "full_name":
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
    options: CaptionOptions,
) -> list[str]:
    todo = [im for im in images if im not in done]
    existing = [im for im in todo if im in targets and im not in collided]
    existing = [im for im in existing if os.path.lexists(targets[im])]
    if existing and not (options.skip_existing or options.overwrite):
        raise CaptionerError(
            f"{len(existing)} caption file(s) already exist (e.g. {targets[existing[0]]}): "
            "pass --skip_existing to keep them or --overwrite to replace them"
        )
    if options.skip_existing:
        keep = set(existing)
        todo = [im for im in todo if im not in keep]
    return todo


# ---- 2. the executor ----


def _execute(options: CaptionOptions, todo: list[str], work: Work, advance: Any) -> Results:
    if options.engine == "local":
        from captioner.jobs.executors.local import caption_here

        return caption_here(todo, work, advance)
    try:
        from captioner.jobs.executors.ray import caption_on_ray
    except ImportError as err:
        raise CaptionerError(
            f"--engine ray needs the ray extra ({err.name} is missing): "
            "pip install 'captioner[ray]'"
        ) from None
    return caption_on_ray(
        todo,
        work,
        advance,
        address=options.ray_address,
        num_workers=options.num_workers,
        gpus_per_worker=options.gpus_per_worker,
    )


# ---- 3. rows, sidecars, the summary ----


def result_row(image: str, result: Any, sidecar: bool, target: Path | None) -> dict[str, Any]:
    """The output row of one image's result; writes its sidecar file (at `target`) when asked."""
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
            row["error"] = f"cannot write caption file: {err.strerror or err}"
    return row


def _report(summary: CaptionSummary, writer: RowWriter | None, row: dict[str, Any]) -> None:
    summary.add(row)
    if writer is not None:
        writer.write(row)


def _open_writer(plan: _Plan, options: CaptionOptions, stdout: IO[str] | None) -> RowWriter | None:
    if plan.output is None:
        return None if options.sidecar else stream_writer(stdout or sys.stdout)
    retry = plan.previous.errors & set(plan.todo)
    return plan.output.open(options.resume, plan.previous, retry)


# ---- input lists ----


def _listed(lines: list[str]) -> list[str]:
    return [s.strip() for s in lines if s.strip() and not s.lstrip().startswith("#")]


def _stream_lines(stream: IO[str]) -> list[str]:
    """Lines of a list of paths; bytes that are not UTF-8 become the same surrogate escapes the
    OS's own listings use, so such a name still opens."""
    raw = getattr(stream, "buffer", None)
    if raw is not None:
        return [os.fsdecode(line) for line in raw.read().splitlines()]
    return stream.read().splitlines()


def _file_lines(path: str) -> list[str]:
    try:
        with open(path, "rb") as f:
            return [os.fsdecode(line) for line in f.read().splitlines()]
    except OSError as err:
        raise CaptionerError(f"@{path}: cannot read the list ({err.strerror or err})") from None


def _manifest_images(path: Path) -> list[str]:
    """The `image` column of a Parquet/JSONL manifest; relative names are beside the manifest."""
    try:
        if path.suffix.lower() == ".parquet":
            import pyarrow.parquet as pq

            images = [str(v) for v in pq.read_table(path, columns=["image"])["image"].to_pylist()]
        else:
            lines = path.read_text(encoding="utf-8").splitlines()
            images = [str(json.loads(line)["image"]) for line in lines if line.strip()]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CaptionerError(
            f"{path}: not a manifest with an image column ({type(err).__name__}: {err})"
        ) from None
    return [im if is_url(im) or Path(im).is_absolute() else str(path.parent / im) for im in images]
