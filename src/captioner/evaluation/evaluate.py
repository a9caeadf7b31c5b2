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
from dataclasses import dataclass, field
from typing import Any

import jiwer
import torch

from captioner.data.images import load_image
from captioner.data.sources import ImageColumn, first_rows
from captioner.decoding import DecodingOptions
from captioner.engine import Captioner, ProgressFn
from captioner.errors import BadImageError, CaptionerError
from captioner.evaluation import metrics
from captioner.models.families import family_of

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


def evaluate(
    captioner: Captioner,
    dataset,
    decoding: DecodingOptions | None = None,
    *,
    model_name: str = "model",
    batch_size: int | None = None,
    max_samples: int | None = None,
    progress: ProgressFn | None = None,
    **options: Any,
) -> EvalResult:
    """Generate a caption for every image of `dataset` (columns `image`, `captions`) and score it.

    Decoding options come as `decoding` and/or keywords (`max_new_tokens=8`), as for
    `Captioner.caption`. Images that cannot be read are skipped (listed in `result.skipped`).
    """
    _check_columns(dataset)
    decoding = (decoding or DecodingOptions()).replace(**options)
    dataset = first_rows(dataset, max_samples)
    if len(dataset) == 0:
        raise CaptionerError("the evaluation split is empty: nothing to evaluate")
    references = [list(c) for c in dataset["captions"]]
    settings = {**decoding.to_dict(), "batch_size": batch_size, "max_samples": max_samples}
    preds: dict[int, str] = {}
    skipped = []
    results = captioner.caption_iter(
        ImageColumn(dataset), decoding, batch_size=batch_size, progress=progress
    )
    for i, caption in results:
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
    return EvalResult(model_name, corpus, rows, settings, skipped)


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
    family = family_of(model)
    if not family.teacher_forced:
        raise CaptionerError(
            "teacher_forced_wer reproduces the guide's GIT recipe (input_ids as labels); "
            f"it does not apply to {family.name} models"
        )
    _check_columns(dataset)
    dataset = first_rows(dataset, max_samples)
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


def _check_columns(dataset) -> None:
    missing = {"image", "captions"} - set(dataset.column_names)
    if missing:
        raise CaptionerError(
            f"the evaluation data needs columns 'image' and 'captions'; missing {sorted(missing)} "
            f"(has {dataset.column_names})"
        )
