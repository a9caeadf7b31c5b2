"""`captioner eval`: score a model (and optionally a second one) on a split, write the report.

`split="all"` scores every row of every split (a folder meant as a test set needs no split
flags); an empty split is an error naming the flag that gives rows. With `output_dir`:
`metrics.json` (the first model's metrics at top level, the other's under
"compare"), `samples.jsonl` per model, and the self-contained `report.html`.

`num_skipped` counts every example left out of the scores: those the source's cleaning pass
dropped as it was read (`num_skipped_reading`: the "skipped N of M examples" the log reports,
whichever split they would have fallen in) and the split's images that failed to caption.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from captioner.data.sources import DataArguments, ImageColumn, first_rows
from captioner.decoding import DecodingOptions
from captioner.engine import Captioner
from captioner.errors import CaptionerError
from captioner.evaluation.evaluate import EvalResult, evaluate, teacher_forced_wer
from captioner.evaluation.report import write_eval_report
from captioner.jobs.executors.features import reuse_features
from captioner.jobs.progress import progress_bar
from captioner.models.build import training_options
from captioner.options import LoadOptions

# `--split all`: every row of the source, whatever its splits (a folder meant as a test set).
ALL_SPLITS = "all"
SPLIT_KEYS = ("test_size", "seed", "image_column", "caption_column", "on_bad_image")


@dataclass
class EvalJob:
    """What `captioner eval` does; `data` holds only the options the user gave (None: unset)."""

    model: str
    data: str
    data_options: dict[str, Any] = field(default_factory=dict)
    split: str = "test"  # or train, or ALL_SPLITS
    compare: str | None = None
    teacher_forced: bool = False
    output_dir: str | None = None
    decoding: DecodingOptions = field(default_factory=DecodingOptions)
    batch_size: int | None = None
    load: LoadOptions = field(default_factory=LoadOptions)  # device, dtype, int8, remote code
    # Cached vision-tower outputs of the split's images: auto | off | a folder
    # (jobs/executors/features.py).
    feature_cache: str = "auto"


def split_options(model: str, given: dict[str, Any]) -> tuple[DataArguments, int]:
    """The data options and split seed for evaluating `model`: the user's, else those the model
    was trained with (its `captioner_config.json`), so a model trained with `--test_size 0.2
    --seed 1` is scored on its own held-out split, not on training images."""
    saved = training_options(model)
    options = {k: saved[k] for k in SPLIT_KEYS if saved.get(k) is not None}
    options.update({k: v for k, v in given.items() if v is not None})
    seed = options.pop("seed", 0)
    known = {f.name for f in dataclasses.fields(DataArguments)}
    return DataArguments(**{k: v for k, v in options.items() if k in known}), seed


def choose_split(job: EvalJob, data_args: DataArguments, seed: int):
    """The rows to score: one split as training cut it, or every row (`ALL_SPLITS`). An empty
    choice is an error that names the flag that gives rows."""
    if job.split == ALL_SPLITS:
        dataset = data_args.load_all()
        if len(dataset) == 0:
            raise CaptionerError(f"{job.data}: no usable rows to evaluate")
        return dataset
    splits = data_args.load(seed)
    if job.split not in splits:
        raise CaptionerError(
            f"{job.data} has no split {job.split!r} (splits: {', '.join(splits)}; "
            f"--split {ALL_SPLITS} scores every row)"
        )
    dataset = splits[job.split]
    if len(dataset) == 0:
        rows = sum(len(d) for d in splits.values())
        why, hint = "", f"pass --split {ALL_SPLITS} to score all {rows} rows"
        if job.split == "test":
            why = f" (no test split in the source, and --test_size is {data_args.test_size:g})"
            hint += ", or --test_size 0.1 (a fraction or a row count) to hold some out"
        raise CaptionerError(f"the {job.split!r} split of {job.data} is empty{why}: {hint}")
    return dataset


@contextlib.contextmanager
def _skipped_reading() -> Iterator[list[int]]:
    """The examples the source's cleaning pass skips while the block runs (data/sources.py
    reports them in one warning, "skipped N of M examples in SOURCE")."""
    counts: list[int] = []

    class Count(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if str(record.msg).startswith("skipped %d of %d examples") and record.args:
                counts.append(int(record.args[0]))  # type: ignore[index]

    logger = logging.getLogger("captioner.data.sources")
    handler = Count(logging.WARNING)
    logger.addHandler(handler)
    try:
        yield counts
    finally:
        logger.removeHandler(handler)


def run_eval(job: EvalJob) -> tuple[list[EvalResult], dict[str, float] | None]:
    """Evaluate `job.model` (and `job.compare`) on the split; write the files when asked."""
    # 1. The split the model was trained with, unless the user says otherwise (or every row).
    data_args, seed = split_options(job.model, {**job.data_options, "data": job.data})
    with _skipped_reading() as skipped:
        dataset = choose_split(job, data_args, seed)
    max_samples = data_args.max_eval_samples
    # 2. Caption and score with each model in turn (one in memory at a time).
    results, teacher_forced = [], {} if job.teacher_forced else None
    for name in [job.model] + ([job.compare] if job.compare else []):
        captioner = Captioner.from_pretrained(name, job.load)
        reuse_features(captioner, name, job.feature_cache)  # a frozen tower's cached outputs
        total = len(first_rows(dataset, max_samples))
        with progress_bar(total, f"evaluating {name}") as advance:
            result = evaluate(
                captioner,
                dataset,
                job.decoding,
                model_name=name,
                batch_size=job.batch_size,
                max_samples=max_samples,
                progress=advance,
            )
        if teacher_forced is not None:
            teacher_forced[name] = teacher_forced_wer(
                captioner.model,
                captioner.processor,
                dataset,
                batch_size=job.batch_size or 8,
                max_samples=max_samples,
            )
            result.metrics["teacher_forced_wer"] = teacher_forced[name]
        result.metrics["num_skipped_reading"] = sum(skipped)
        result.metrics["num_skipped"] = result.metrics.get("num_skipped", 0) + sum(skipped)
        results.append(result)
        del captioner
    # 3. The files.
    if job.output_dir:
        _write_outputs(job, results, first_rows(dataset, max_samples), teacher_forced)
    return results, teacher_forced


def _write_outputs(job: EvalJob, results: list[EvalResult], dataset, teacher_forced) -> None:
    out = Path(job.output_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise CaptionerError(f"{out}: cannot write ({err.strerror or err})") from None
    options_set = {k: v for k, v in results[0].options.items() if v not in (None, [])}
    info = {"data": job.data, "split": job.split, **options_set}
    summary = {**results[0].metrics, "model": job.model, **info}
    if job.compare:
        summary["compare"] = {**results[1].metrics, "model": job.compare}
    (out / "metrics.json").write_text(json.dumps(summary, indent=2) + "\n")
    for result, name in zip(results, ["samples.jsonl", "samples_compare.jsonl"], strict=False):
        with open(out / name, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(row) + "\n" for row in result.samples)
    write_eval_report(
        out / "report.html",
        results,
        ImageColumn(dataset),
        title=f"Caption evaluation: {job.data} [{job.split}]",
        info={"models": " vs ".join(r.model for r in results), **info},
        teacher_forced=teacher_forced,
    )
