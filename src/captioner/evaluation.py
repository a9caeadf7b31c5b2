"""Evaluate a captioning model on a dataset split by *generating* captions and scoring them.

`evaluate` runs `Captioner.caption_iter` over the split (images decoded a batch at a time in the
loader, never all at once), keeps only the caption strings, and scores them against every
reference with `metrics.score`. Memory is the model plus one batch plus N short strings: no
logits are kept, whatever the split size. The training callback and `captioner eval` share it.

`teacher_forced_wer` reproduces the guide's `compute_metrics` number for comparison only (see
TEACHER_FORCED_NOTE for why it says little about caption quality).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from captioner import metrics
from captioner.errors import BadImageError, CaptionerError

log = logging.getLogger(__name__)

TEACHER_FORCED_NOTE = (
    "Teacher-forced WER (the guide's metric) feeds the true caption in and scores argmax of each "
    "next-token guess, image positions and padding included: it never looks at a generated "
    "caption, so it does not measure caption quality."
)


@dataclass
class EvalResult:
    """What one model produced on one split: corpus metrics and one row per image."""

    model: str
    metrics: dict[str, Any]
    # rows: {"index", "prediction", "references", **per-image scores}, in dataset order
    samples: list[dict[str, Any]]
    options: dict[str, Any] = field(default_factory=dict)
    skipped: list[dict[str, Any]] = field(default_factory=list)  # {"index", "error"}

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class ImageColumn(Sequence):
    """`dataset[i]["image"]` on demand, undecoded ({"bytes", "path"}): the captioning loader
    decodes each image in its worker, so the split is never held in memory as pixels."""

    def __init__(self, dataset) -> None:
        from datasets import Image

        self.dataset = dataset.cast_column("image", Image(decode=False))

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return self.dataset[i]["image"]


def subset(dataset, max_samples: int | None):
    """The first `max_samples` rows (a fixed subset, the same at every evaluation)."""
    if max_samples is not None and max_samples < len(dataset):
        return dataset.select(range(max_samples))
    return dataset


def evaluate(
    captioner,
    dataset,
    *,
    model_name: str = "model",
    num_beams: int = 1,
    max_new_tokens: int = 30,
    batch_size: int | None = None,
    max_samples: int | None = None,
    progress: bool = False,
    **generate_kwargs,
) -> EvalResult:
    """Generate a caption for every image of `dataset` (columns `image`, `captions`) and score it.

    Images that cannot be read are skipped (listed in `result.skipped`), not fatal.
    """
    _check_columns(dataset)
    dataset = subset(dataset, max_samples)
    if len(dataset) == 0:
        raise CaptionerError("the evaluation split is empty: nothing to evaluate")
    references = [list(c) for c in dataset["captions"]]
    options = dict(
        num_beams=num_beams,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        max_samples=max_samples,
        **generate_kwargs,
    )
    preds: dict[int, str] = {}
    skipped = []
    for i, caption in captioner.caption_iter(
        ImageColumn(dataset),
        num_beams=num_beams,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        progress=progress,
        **generate_kwargs,
    ):
        if isinstance(caption, BadImageError):
            log.warning("skipping image %d: %s", i, caption)
            skipped.append({"index": i, "error": str(caption)})
        else:
            preds[i] = caption
    if not preds:
        raise CaptionerError("no image of the evaluation split could be read")
    order = sorted(preds)
    scores = metrics.score([preds[i] for i in order], [references[i] for i in order])
    rows = [
        {"index": i, "prediction": preds[i], "references": references[i], **s}
        for i, s in zip(order, scores.samples, strict=True)
    ]
    corpus = dict(scores.corpus, num_skipped=len(skipped))
    return EvalResult(model_name, corpus, rows, options, skipped)


def teacher_forced_wer(
    model, processor, dataset, *, batch_size: int = 8, max_samples: int | None = None
) -> float:
    """The guide's `compute_metrics`, reproduced: WER of argmax(teacher-forced logits).

    Same preprocessing as the guide's `transforms` (first caption as `text`,
    `padding="max_length"`, labels = input_ids), same forward pass, `logits.argmax(-1)` over
    every position (image tokens and padding included), `batch_decode(skip_special_tokens=True)`
    of labels and predictions, and corpus WER (`evaluate`'s "wer" is jiwer's corpus WER: total
    edits over total reference words). Unlike the guide's Trainer, logits are reduced to argmax
    batch by batch instead of being gathered for the whole split.
    """
    import jiwer
    import torch

    from captioner.images import load_image

    if model.config.model_type not in ("git", "blip"):
        raise CaptionerError(
            "teacher_forced_wer reproduces the guide's GIT recipe (input_ids as labels); "
            f"it does not apply to model type '{model.config.model_type}'"
        )
    _check_columns(dataset)
    dataset = subset(dataset, max_samples)
    images = ImageColumn(dataset)
    captions = dataset["captions"]
    device = next(model.parameters()).device
    labels_text: list[str] = []
    preds_text: list[str] = []
    model.eval()
    for start in range(0, len(dataset), batch_size):
        idx = range(start, min(start + batch_size, len(dataset)))
        inputs = processor(
            images=[load_image(images[i]) for i in idx],
            text=[captions[i][0] for i in idx],
            padding="max_length",
            return_tensors="pt",
        )
        inputs["labels"] = inputs["input_ids"]
        with torch.inference_mode():
            logits = model(**inputs.to(device)).logits
        predicted = logits.argmax(-1)
        labels_text += processor.batch_decode(inputs["labels"], skip_special_tokens=True)
        preds_text += processor.batch_decode(predicted, skip_special_tokens=True)
    return float(jiwer.wer(labels_text, preds_text))


def split_options(model: str, given: dict) -> dict:
    """`load_captions` options for evaluating `model`: the user's, else the test_size / seed /
    columns the model was trained with (its `captioner_config.json`), so a model trained with
    `--test_size 0.2 --seed 1` is scored on its own held-out split, not on training images."""
    import json
    from pathlib import Path

    saved_path = Path(model) / "captioner_config.json"
    saved = json.loads(saved_path.read_text()) if saved_path.is_file() else {}
    keys = ("test_size", "seed", "image_column", "caption_column", "on_bad_image")
    options = {k: saved[k] for k in keys if saved.get(k) is not None}
    options.update({k: v for k, v in given.items() if v is not None})
    return options


def run_eval(
    model: str,
    data: str,
    *,
    split: str = "test",
    compare: str | None = None,
    teacher_forced: bool = False,
    output_dir: str | None = None,
    trust_remote_code: bool = False,
    data_options: dict | None = None,
    **options,
) -> tuple[list[EvalResult], dict[str, float] | None]:
    """`captioner eval`: evaluate `model` (and `compare`) on `data`'s `split`, write the report.

    `options` go to `evaluate` (num_beams, max_new_tokens, batch_size, max_samples). With
    `output_dir`: metrics.json (the first model's metrics at top level, the other's under
    "compare"), samples.jsonl per model, and the self-contained report.html.
    """
    import json
    from pathlib import Path

    from captioner.data import load_captions
    from captioner.generate import Captioner
    from captioner.report import write_eval_report

    splits = load_captions(data, **split_options(model, data_options or {}))
    if split not in splits:
        raise CaptionerError(f"{data} has no split {split!r} (splits: {', '.join(splits)})")
    dataset = splits[split]
    results, tf = [], {} if teacher_forced else None
    for name in [model] + ([compare] if compare else []):
        captioner = Captioner.from_pretrained(name, trust_remote_code=trust_remote_code)
        results.append(evaluate(captioner, dataset, model_name=name, progress=True, **options))
        if tf is not None:
            tf[name] = teacher_forced_wer(
                captioner.model,
                captioner.processor,
                dataset,
                batch_size=options.get("batch_size") or 8,
                max_samples=options.get("max_samples"),
            )
            results[-1].metrics["teacher_forced_wer"] = tf[name]
        del captioner
    if output_dir:
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        options_set = {k: v for k, v in results[0].options.items() if v is not None}
        info = {"data": data, "split": split, **options_set}
        summary = {**results[0].metrics, "model": model, **info}
        if compare:
            summary["compare"] = {**results[1].metrics, "model": compare}
        (out / "metrics.json").write_text(json.dumps(summary, indent=2) + "\n")
        for r, fname in zip(results, ["samples.jsonl", "samples_compare.jsonl"], strict=False):
            with open(out / fname, "w", encoding="utf-8") as f:
                f.writelines(json.dumps(row) + "\n" for row in r.samples)
        write_eval_report(
            out / "report.html",
            results,
            ImageColumn(subset(dataset, options.get("max_samples"))),
            title=f"Caption evaluation: {data} [{split}]",
            info={"models": " vs ".join(r.model for r in results), **info},
            teacher_forced=tf,
        )
    return results, tf


def _check_columns(dataset) -> None:
    missing = {"image", "captions"} - set(dataset.column_names)
    if missing:
        raise CaptionerError(
            f"the evaluation data needs columns 'image' and 'captions'; missing {sorted(missing)} "
            f"(has {dataset.column_names})"
        )
