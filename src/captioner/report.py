"""Reports for people: sample grids, training curves and the HTML evaluation report.

Plots use matplotlib; the HTML report is one self-contained file (images inlined as base64) that
opens offline.
"""

from __future__ import annotations

# --- sample grid (issue 2) ---


def plot_samples(images: list, captions: list[str], path, *, wrap: int = 22, columns: int = 5):
    """The guide's `plot_images`: images in a grid, each titled with its caption wrapped at
    `wrap` characters, written to `path` with matplotlib's Agg backend. Returns the path."""
    from pathlib import Path
    from textwrap import wrap as wrap_text

    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    from captioner.images import load_image

    n = len(images)
    cols = max(1, min(columns, n))
    rows = max(1, -(-n // cols))
    lines = [wrap_text(c, wrap) or [""] for c in captions]
    tallest = max((len(x) for x in lines), default=1)
    fig, axes = plt.subplots(
        rows, cols, figsize=(3 * cols, rows * (3 + 0.25 * tallest)), squeeze=False
    )
    for ax in axes.flat:
        ax.axis("off")
    for ax, img, text in zip(axes.flat, images, lines, strict=False):
        ax.imshow(load_image(img))
        ax.set_title("\n".join(text), fontsize=11)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight", pad_inches=0.2)  # keeps long titles whole
    plt.close(fig)
    return path


# --- training curves (issue 3) ---

CURVE_METRICS = ("cider", "wer", "exact_match", "bleu_4")


def plot_curves(log_history: list[dict], path, metrics: tuple[str, ...] = CURVE_METRICS):
    """Loss (train and eval) and generation metrics against the step, from a Trainer's
    `state.log_history`, as one PNG. Returns the path."""
    from pathlib import Path

    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    # Stop at the end-of-training summary: a final evaluate() of the best model comes after it.
    end = next((i for i, e in enumerate(log_history) if "train_runtime" in e), len(log_history))
    log_history = log_history[:end]

    def series(key: str) -> tuple[list[int], list[float]]:
        points = [(e["step"], e[key]) for e in log_history if key in e and "step" in e]
        return [s for s, _ in points], [v for _, v in points]

    shown = [m for m in metrics if series(f"eval_{m}")[0]]
    fig, axes = plt.subplots(1, 2 if shown else 1, figsize=(11 if shown else 6, 4), squeeze=False)
    loss_ax = axes[0][0]
    for key, label in (("loss", "train loss"), ("eval_loss", "eval loss")):
        steps, values = series(key)
        if steps:
            loss_ax.plot(steps, values, marker="." if key == "eval_loss" else None, label=label)
    loss_ax.set(xlabel="step", ylabel="loss", title="loss")
    loss_ax.legend(loc="upper right")
    if shown:
        ax = axes[0][1]
        for m in shown:
            ax.plot(*series(f"eval_{m}"), marker="o", label=m)
        ax.set(xlabel="step", title="generated captions on the eval subset")
        ax.legend(loc="best")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# --- HTML evaluation report (issue 4) ---

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
    ("mean_length", "mean caption length (tokens)"),
    ("vocab_size", "vocabulary size"),
    ("unique_ratio", "distinct captions / images"),
    ("num_samples", "images scored"),
    ("num_skipped", "images skipped (unreadable)"),
]

_CSS = """
body{font-family:system-ui,sans-serif;margin:24px;color:#222}
table{border-collapse:collapse;margin:12px 0}
td,th{border:1px solid #ccc;padding:4px 8px;vertical-align:top;text-align:left}
th{background:#f2f2f2} td.num{text-align:right;font-variant-numeric:tabular-nums}
img{display:block;max-width:128px;max-height:128px}
ul{margin:0;padding-left:18px} .pred{font-weight:600} .note{color:#666;font-size:90%}
.bad{background:#fde8e8} .ok{background:#e8f6ea}
"""


def thumbnail_data_uri(src, size: int = 128) -> str:
    """An image source (path, bytes, datasets dict, PIL) as a small inline base64 JPEG."""
    import base64
    import io

    from captioner.images import load_image

    img = load_image(src)
    img.thumbnail((size, size))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def write_eval_report(
    path,
    results: list,
    images,
    *,
    title: str = "Caption evaluation",
    info: dict | None = None,
    teacher_forced: dict | None = None,
    thumb_size: int = 128,
):
    """Write one self-contained HTML file: corpus table on top, then every image, worst first.

    `results` are `evaluation.EvalResult`s on the same split (two of them: side by side);
    `images[i]` is the image source of sample index i. Rows are ordered by the first model's
    CIDEr-D (then WER), and written one at a time, so memory does not grow with the split.
    `teacher_forced` maps model name -> the guide's teacher-forced WER, shown with its caveat.
    """
    from html import escape
    from pathlib import Path

    from captioner.errors import BadImageError
    from captioner.evaluation import TEACHER_FORCED_NOTE
    from captioner.metrics import SPICE_NOTE

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    names = [escape(r.model) for r in results]
    by_index = [{row["index"]: row for row in r.samples} for r in results]
    shared = set(by_index[0]).intersection(*by_index[1:])
    order = sorted(shared, key=lambda i: (by_index[0][i]["cider"], -by_index[0][i]["wer"], i))

    def fmt(v) -> str:
        if v is None:
            return "n/a"
        return f"{v:.4f}" if isinstance(v, float) else str(v)

    with open(path, "w", encoding="utf-8") as f:
        f.write(f"<!doctype html><html><head><meta charset='utf-8'><title>{escape(title)}</title>")
        f.write(f"<style>{_CSS}</style></head><body><h1>{escape(title)}</h1>")
        if info:
            f.write("<p class='note'>")
            f.write(" · ".join(f"{escape(str(k))}: {escape(str(v))}" for k, v in info.items()))
            f.write("</p>")
        f.write("<h2>Corpus scores</h2><table><tr><th>metric</th>")
        f.write("".join(f"<th>{n}</th>" for n in names) + "</tr>")
        for key, label in REPORT_METRICS:
            if all(key not in r.metrics for r in results):
                continue
            cells = "".join(f"<td class='num'>{fmt(r.metrics.get(key))}</td>" for r in results)
            f.write(f"<tr><td>{label}</td>{cells}</tr>")
        f.write("</table>")
        f.write(
            "<p class='note'>COCO scores (pycocoevalcap, PTB-tokenized, all references) on a "
            "0–1 scale; CIDEr-D as pycocoevalcap returns it (0–10). WER: jiwer, against the "
            f"closest reference. {escape(SPICE_NOTE)}</p>"
        )
        if teacher_forced:
            f.write("<h2>The guide's teacher-forced WER</h2><table><tr>")
            f.write("".join(f"<th>{escape(k)}</th>" for k in teacher_forced) + "</tr><tr>")
            f.write("".join(f"<td class='num'>{fmt(v)}</td>" for v in teacher_forced.values()))
            f.write(f"</tr></table><p class='note'>{escape(TEACHER_FORCED_NOTE)}</p>")
        f.write(f"<h2>Every image, worst first ({len(order)})</h2><table><tr>")
        f.write("<th>#</th><th>image</th><th>references</th>")
        f.write("".join(f"<th>{n}</th>" for n in names) + "</tr>")
        for i in order:
            rows = [b[i] for b in by_index]
            try:
                img = f"<img src='{thumbnail_data_uri(images[i], thumb_size)}' alt='image {i}'>"
            except BadImageError as err:
                img = f"<span class='note'>{escape(str(err))}</span>"
            refs = "".join(f"<li>{escape(c)}</li>" for c in rows[0]["references"])
            f.write(f"<tr><td class='num'>{i}</td><td>{img}</td><td><ul>{refs}</ul></td>")
            for row in rows:
                css = "ok" if row["exact_match"] else ("bad" if row["cider"] == 0 else "")
                pred = escape(row["prediction"]) or "<span class='note'>(empty)</span>"
                f.write(
                    f"<td class='{css}'><div class='pred'>{pred}</div><div class='note'>"
                    f"CIDEr-D {row['cider']:.3f} · WER {row['wer']:.2f}</div></td>"
                )
            f.write("</tr>")
        f.write("</table></body></html>\n")
    return path
