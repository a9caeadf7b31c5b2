"""Reports for people: sample grids, training curves and the HTML evaluation report.

Plots are drawn with matplotlib's object-oriented API (`Figure`, no pyplot), so they set no
backend and leave no global state behind. The HTML report renders the package template
`templates/eval_report.html.j2` with autoescaping on: one self-contained file (images inlined as
base64) that opens offline.
"""

from __future__ import annotations

import base64
import functools
import io
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from textwrap import wrap as wrap_text
from typing import Any, NamedTuple

from jinja2 import Environment, PackageLoader, StrictUndefined, Template, select_autoescape
from matplotlib.figure import Figure

from captioner.data.images import load_image
from captioner.errors import BadImageError
from captioner.evaluation.evaluate import TEACHER_FORCED_NOTE, EvalResult
from captioner.evaluation.metrics import SPICE_NOTE

CURVE_METRICS = ("cider", "wer", "exact_match", "bleu_4")

REPORT_METRICS = [
    ("bleu_1", "BLEU-1"),
    ("bleu_2", "BLEU-2"),
    ("bleu_3", "BLEU-3"),
    ("bleu_4", "BLEU-4"),
    ("meteor", "METEOR"),
    ("rouge_l", "ROUGE-L"),
    ("cider", "CIDEr-D"),
    ("spice", "SPICE"),
    ("wer", "WER (closest reference, mean per image)"),
    ("wer_corpus", "WER (closest reference, corpus)"),
    ("exact_match", "exact match"),
    ("shape_accuracy", "shape right (scenes)"),
    ("colour_accuracy", "colour right (scenes)"),
    ("size_accuracy", "size right (scenes)"),
    ("background_accuracy", "background right (scenes)"),
    ("objects_accuracy", "every object right (scenes)"),
    ("mean_length", "mean caption length (tokens)"),
    ("vocab_size", "vocabulary size"),
    ("unique_ratio", "distinct captions / images"),
    ("num_samples", "images scored"),
    ("num_skipped", "images skipped (unreadable)"),
]

REPORT_TEMPLATE = "eval_report.html.j2"

PathLike = str | os.PathLike[str]


def plot_samples(
    images: Sequence[Any],
    captions: Sequence[str],
    path: PathLike,
    *,
    wrap: int = 22,
    columns: int = 5,
) -> Path:
    """The guide's `plot_images`: images in a grid, each titled with its caption wrapped at
    `wrap` characters, written to `path` as a PNG. Returns the path."""
    n = len(images)
    cols = max(1, min(columns, n))
    rows = max(1, -(-n // cols))
    lines = [wrap_text(c, wrap) or [""] for c in captions]
    tallest = max((len(x) for x in lines), default=1)
    fig = Figure(figsize=(3 * cols, rows * (3 + 0.25 * tallest)))
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, img, text in zip(axes.flat, images, lines, strict=False):
        ax.imshow(load_image(img))
        ax.set_title("\n".join(text), fontsize=11)
    fig.tight_layout()
    path = _prepare(path)
    fig.savefig(path, dpi=100, bbox_inches="tight", pad_inches=0.2)  # keeps long titles whole
    return path


def plot_curves(
    log_history: list[dict[str, Any]],
    path: PathLike,
    metrics: tuple[str, ...] = CURVE_METRICS,
) -> Path:
    """Loss (train and eval) and generation metrics against the step, from a Trainer's
    `state.log_history`, as one PNG. Returns the path."""
    # Stop at the end-of-training summary: a final evaluate() of the best model comes after it.
    end = next((i for i, e in enumerate(log_history) if "train_runtime" in e), len(log_history))
    log_history = log_history[:end]
    shown = [m for m in metrics if _series(log_history, f"eval_{m}")[0]]
    fig = Figure(figsize=(11 if shown else 6, 4))
    axes = fig.subplots(1, 2 if shown else 1, squeeze=False)
    loss_ax = axes[0][0]
    for key, label in (("loss", "train loss"), ("eval_loss", "eval loss")):
        steps, values = _series(log_history, key)
        if steps:
            loss_ax.plot(steps, values, marker="." if key == "eval_loss" else None, label=label)
    loss_ax.set(xlabel="step", ylabel="loss", title="loss")
    if loss_ax.get_legend_handles_labels()[0]:  # a run too short to log a loss has none
        loss_ax.legend(loc="upper right")
    if shown:
        ax = axes[0][1]
        for m in shown:
            ax.plot(*_series(log_history, f"eval_{m}"), marker="o", label=m)
        ax.set(xlabel="step", title="generated captions on the eval subset")
        ax.legend(loc="best")
    fig.tight_layout()
    path = _prepare(path)
    fig.savefig(path, dpi=100)
    return path


def _series(log_history: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """The (steps, values) of one logged key, in log order."""
    points = [(e["step"], e[key]) for e in log_history if key in e and "step" in e]
    return [s for s, _ in points], [v for _, v in points]


def _prepare(path: PathLike) -> Path:
    """`path` as a Path whose parent folder exists."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def thumbnail_data_uri(src: Any, size: int = 128) -> str:
    """An image source (path, bytes, datasets dict, PIL) as a small inline base64 JPEG."""
    img = load_image(src)
    img.thumbnail((size, size))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


class _Cell(NamedTuple):
    """One model's caption of one image, as the report shows it."""

    css: str  # "ok" (exact match), "bad" (CIDEr-D 0) or ""
    prediction: str
    cider: float
    wer: float


class _ImageRow(NamedTuple):
    """One image of the report: its thumbnail (or why there is none), references, captions."""

    index: int
    thumbnail: str | None
    error: str | None
    references: list[str]
    cells: list[_Cell]


def write_eval_report(
    path: PathLike,
    results: list[EvalResult],
    images: Sequence[Any],
    *,
    title: str = "Caption evaluation",
    info: dict | None = None,
    teacher_forced: dict | None = None,
    thumb_size: int = 128,
) -> Path:
    """Write one self-contained HTML file: corpus table on top, then every image, worst first.

    `results` are `evaluation.EvalResult`s on the same split (two of them: side by side);
    `images[i]` is the image source of sample index i. Rows are ordered by the first model's
    CIDEr-D (then WER), and thumbnailed and written one at a time, so memory does not grow with
    the split. `teacher_forced` maps model name -> the guide's teacher-forced WER, shown with its
    caveat.
    """
    path = _prepare(path)
    by_index = [{row["index"]: row for row in r.samples} for r in results]
    order = _worst_first(by_index)
    corpus = [
        (label, [r.metrics.get(key) for r in results])
        for key, label in REPORT_METRICS
        if any(key in r.metrics for r in results)
    ]
    stream = _template().stream(
        title=title,
        info=info,
        models=[r.model for r in results],
        corpus=corpus,
        spice_note=SPICE_NOTE,
        teacher_forced=teacher_forced,
        teacher_forced_note=TEACHER_FORCED_NOTE,
        count=len(order),
        rows=_image_rows(order, by_index, images, thumb_size),
    )
    with open(path, "w", encoding="utf-8") as f:
        stream.dump(f)
    return path


def _worst_first(by_index: list[dict[int, dict[str, Any]]]) -> list[int]:
    """Sample indices every model scored, by the first model's CIDEr-D, then WER (worse first)."""
    first = by_index[0]
    shared = set(first).intersection(*by_index[1:])
    return sorted(shared, key=lambda i: (first[i]["cider"], -first[i]["wer"], i))


def _image_rows(
    order: list[int],
    by_index: list[dict[int, dict[str, Any]]],
    images: Sequence[Any],
    thumb_size: int,
) -> Iterator[_ImageRow]:
    """The report's image rows, one at a time: only one thumbnail is ever in memory."""
    for i in order:
        rows = [b[i] for b in by_index]
        thumbnail = error = None
        try:
            thumbnail = thumbnail_data_uri(images[i], thumb_size)
        except BadImageError as err:
            error = str(err)
        cells = [
            _Cell(
                "ok" if row["exact_match"] else ("bad" if row["cider"] == 0 else ""),
                row["prediction"],
                row["cider"],
                row["wer"],
            )
            for row in rows
        ]
        yield _ImageRow(i, thumbnail, error, rows[0]["references"], cells)


def _format_number(value: Any) -> str:
    """A metric for the tables: floats to 4 places, None as n/a."""
    if value is None:
        return "n/a"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


@functools.cache
def _template() -> Template:
    """The report template, from the package, with autoescaping on."""
    env = Environment(
        loader=PackageLoader("captioner.evaluation", "templates"),
        autoescape=select_autoescape(("html", "html.j2"), default=True),
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    env.filters["num"] = _format_number
    return env.get_template(REPORT_TEMPLATE)
