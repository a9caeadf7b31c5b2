"""`captioner caption ... --engine ray`: caption a corpus on Ray Data.

The inputs (files, folders, globs, URLs, list files, or a Parquet/JSONL manifest with an `image`
column) become a Ray Dataset of image references. `map_batches` runs them through a pool of
actors, each holding one `Captioner` (the same engine as the single-process path, loaded once per
actor), and the driver writes each finished batch as its own JSONL shard `{image, caption,
error}` in the output folder: written to a temporary name and renamed, so a killed driver or
worker leaves only whole shards. `--resume` reads the shards already there and captions only the
images they do not hold: no duplicates, nothing missing. As with the local engine, a shard whose
last line was torn (a crash mid-write) has that line dropped and is named in the summary's notes,
and `--retry_errors` captions the images whose rows are errors again, their old rows dropped.
The options that only make sense for one process writing beside the images (sidecars,
`--overwrite` of one output file) are refused by the CLI; the rest (dtype, int8, seed,
progress) are honoured.

Without `ray_address` a local Ray instance sized to the machine is started (and stopped at the
end); with it, the job joins that cluster (`ray start --head` on one machine, `ray start
--address=...` on the others). Ray is an optional extra: `pip install captioner[ray]`.
"""

from __future__ import annotations

import json
import os
import uuid
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray

from captioner.decoding import DecodingOptions
from captioner.errors import CaptionerError
from captioner.jobs.caption import CaptionSummary, expand_inputs, jsonl_line, write_text_atomic
from captioner.jobs.progress import progress_bar

SHARD_GLOB = "part-*.jsonl"


@dataclass
class RayJob:
    """What `captioner caption --engine ray` does."""

    model: str
    inputs: list[str]
    output_dir: str
    ray_address: str | None = None
    num_workers: int | None = None  # actors; default: one per 2 CPUs of the cluster (>= 1)
    gpus_per_worker: float = 0.0  # > 0 on a GPU cluster: Ray hides GPUs from actors otherwise
    batch_size: int = 32
    decoding: DecodingOptions | None = None
    resume: bool = False
    retry_errors: bool = False  # with resume: caption the images whose rows are errors again
    device: str | None = None
    trust_remote_code: bool = False
    dtype: str = "float32"
    int8: bool = False
    seed: int | None = None  # each batch samples from seed + its images: repeatable
    progress: bool = False


@dataclass
class PreviousShards:
    """What the shards in an output folder hold, for `--resume` (read only)."""

    done: set[str] = field(default_factory=set)  # images with a caption row
    errors: set[str] = field(default_factory=set)  # images with error rows only
    torn: list[Path] = field(default_factory=list)  # shards whose last line was cut off


class _CaptionActor:
    """One per Ray actor: loads the model once, captions batch after batch."""

    def __init__(self, job: RayJob, threads: int) -> None:
        import torch

        from captioner.engine import Captioner

        torch.set_num_threads(threads)
        self.captioner = Captioner.from_pretrained(
            job.model,
            device=job.device,
            trust_remote_code=job.trust_remote_code,
            dtype=job.dtype,
            int8=job.int8,
        )
        self.decoding = job.decoding
        self.seed = job.seed

    def __call__(self, batch: dict[str, Any]) -> dict[str, list]:
        images = [str(x) for x in batch["image"]]
        if self.seed is not None:  # whichever actor gets the batch, it samples the same
            import torch

            names = "\n".join(images).encode("utf-8", "surrogateescape")
            torch.manual_seed((self.seed + zlib.crc32(names)) % 2**63)
        # strings only: Ray's numpy batches would turn None into NaN ("" = no error)
        captions = [""] * len(images)
        errors = [""] * len(images)
        results = self.captioner.caption_iter(
            images, self.decoding, batch_size=len(images), num_workers=0
        )
        for i, result in results:
            if isinstance(result, Exception):
                errors[i] = getattr(result, "reason", str(result))
            else:
                captions[i] = result[0] if isinstance(result, list) else result
        return {"image": images, "caption": captions, "error": errors}


def caption_with_ray(job: RayJob) -> CaptionSummary:
    """Caption every input not already in `job.output_dir`; return what was done."""
    if job.retry_errors and not job.resume:
        raise CaptionerError("--retry_errors goes with --resume (it retries the error rows)")
    out = Path(job.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    # 1. The work list, minus what earlier runs wrote.
    images = read_inputs(job.inputs)
    if not job.resume and any(out.glob(SHARD_GLOB)):
        raise CaptionerError(f"{out} already holds caption shards: pass --resume to continue")
    summary = CaptionSummary()
    done: set[str] = set()
    if job.resume:
        previous = read_shards(out)
        retry = previous.errors & set(images) if job.retry_errors else set()
        done = previous.done | (previous.errors - retry)
        for shard in previous.torn:
            summary.notes.append(f"{shard}: dropped its torn last line (left by a crash)")
        if retry or previous.torn:
            _repair_shards(out, drop=retry)
    todo = [im for im in images if im not in done]
    summary.skipped = len(images) - len(todo)
    if not todo:
        return summary
    # 2. Ray: join the cluster, or start a local instance sized to this machine.
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(
            address=job.ray_address,
            num_cpus=None if job.ray_address else len(os.sched_getaffinity(0)),
            include_dashboard=False,
            log_to_driver=False,
        )
    try:
        # 3. Caption on a pool of actors; write each finished batch as a whole shard.
        cpus = int(ray.cluster_resources().get("CPU", 1))
        workers = job.num_workers or max(1, cpus // 2)
        threads = max(1, cpus // workers)
        dataset = ray.data.from_items([{"image": im} for im in todo])
        captioned = dataset.map_batches(
            _CaptionActor,
            fn_constructor_args=(job, threads),
            batch_size=job.batch_size,
            compute=ray.data.ActorPoolStrategy(size=workers),
            num_cpus=threads,
            num_gpus=job.gpus_per_worker or None,
            batch_format="numpy",
        )
        with progress_bar(len(todo), "captioning", enabled=job.progress) as advance:
            for batch in captioned.iter_batches(batch_size=None, batch_format="numpy"):
                rows = _rows(batch)
                _write_shard(out, rows)
                for row in rows:
                    if "error" in row:
                        summary.failed.append((row["image"], row["error"]))
                    else:
                        summary.captioned += 1
                if advance is not None:
                    advance(len(rows))
    finally:
        if started_here:
            ray.shutdown()
    return summary


def read_inputs(inputs: Iterable[str]) -> list[str]:
    """Image references from files, folders, globs, URLs, list files (`@list.txt`), or a
    Parquet/JSONL manifest with an `image` column."""
    out: list[str] = []
    for item in inputs:
        path = Path(item)
        if item.startswith("@"):
            lines = Path(item[1:]).read_text(encoding="utf-8").splitlines()
            out.extend(line.strip() for line in lines if line.strip())
        elif path.is_file() and path.suffix.lower() in (".parquet", ".jsonl"):
            out.extend(_manifest_images(path))
        else:
            out.extend(expand_inputs([item]))
    return list(dict.fromkeys(out))


def done_in_shards(out: Path) -> set[str]:
    """Images already captioned (or failed) in the folder's shards."""
    previous = read_shards(out)
    return previous.done | previous.errors


def read_shards(out: Path) -> PreviousShards:
    """The rows of the folder's shards, by image. A shard's torn last line (no newline: a crash
    mid-write) is not read; a line that is not a caption row is an error naming the shard."""
    previous = PreviousShards()
    for shard, lines, torn in _shard_lines(out):
        if torn:
            previous.torn.append(shard)
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                image = row["image"]
                failed = "error" in row
            except (ValueError, KeyError, TypeError):
                raise CaptionerError(
                    f"{shard}:{n}: not a caption row; cannot resume from it"
                ) from None
            (previous.errors if failed else previous.done).add(image)
    previous.errors -= previous.done
    return previous


def _shard_lines(out: Path) -> list[tuple[Path, list[str], bool]]:
    """(shard, its whole lines, whether a torn last line was left out) for each shard."""
    found = []
    for shard in sorted(out.glob(SHARD_GLOB)):
        data = shard.read_bytes()
        torn = bool(data) and not data.endswith(b"\n")
        data = data[: data.rfind(b"\n") + 1]
        text = data.decode("utf-8", errors="surrogateescape")
        found.append((shard, text.splitlines(keepends=True), torn))
    return found


def _repair_shards(out: Path, drop: set[str]) -> None:
    """Rewrite (atomically) each shard with a torn last line or rows of `drop`'s images
    without them; a shard left with no row is removed."""
    for shard, lines, torn in _shard_lines(out):
        keep = [line for line in lines if line.strip() and json.loads(line)["image"] not in drop]
        if not torn and len(keep) == len([line for line in lines if line.strip()]):
            continue
        if keep:
            write_text_atomic(shard, "".join(keep))
        else:
            shard.unlink()


def _manifest_images(path: Path) -> list[str]:
    if path.suffix.lower() == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path, columns=["image"])
        images = [str(v) for v in table.column("image").to_pylist()]
    else:
        lines = path.read_text(encoding="utf-8").splitlines()
        images = [str(json.loads(line)["image"]) for line in lines if line.strip()]
    root = path.parent
    return [im if "://" in im or Path(im).is_absolute() else str(root / im) for im in images]


def _rows(batch: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for image, caption, error in zip(batch["image"], batch["caption"], batch["error"], strict=True):
        row: dict[str, Any] = {"image": str(image)}
        if str(error):
            row["error"] = str(error)
        else:
            row["caption"] = str(caption)
        rows.append(row)
    return rows


def _write_shard(out: Path, rows: list[dict[str, Any]]) -> None:
    write_text_atomic(out / f"part-{uuid.uuid4().hex}.jsonl", "".join(map(jsonl_line, rows)))
