"""Reports: the sample grid (`plot_samples`, `captioner show`), training curves and the HTML
evaluation report."""

import subprocess
import sys
import textwrap

from PIL import Image
from typer.testing import CliRunner

from captioner.cli import app
from captioner.evaluation.report import plot_samples, write_eval_report


def test_plot_samples_writes_a_grid_png(tmp_path):
    colours = [(220, 30, 30), (30, 60, 220), (30, 180, 60), (240, 200, 20), (0, 0, 0)]
    images = [Image.new("RGB", (32, 32), c) for c in colours]
    captions = ["a caption long enough to need wrapping onto several lines"] * 5
    path = plot_samples(images, captions, tmp_path / "grid" / "samples.png")
    grid = Image.open(path).convert("RGB")
    assert grid.width > 2 * grid.height  # one row of five
    pixels = set(grid.getdata())
    assert all(c in pixels for c in colours)  # every image drawn
    more = plot_samples(images * 2, captions * 2, tmp_path / "ten.png")
    assert Image.open(more).height > 1.5 * grid.height  # two rows


def test_scenes_show_check_run_clean(tmp_path):
    """The issue's acceptance line: scenes -> show -> check, all exit 0."""
    runner = CliRunner()
    out, png = tmp_path / "s", tmp_path / "g.png"
    result = runner.invoke(app, ["data", "scenes", str(out), "--num_scenes", "200"])
    assert result.exit_code == 0, result.output
    assert len(list(out.glob("*.png"))) == 200
    result = runner.invoke(app, ["show", str(out), "-o", str(png)])
    assert result.exit_code == 0, result.output
    assert "wrote 5 samples" in result.output and Image.open(png).width > 500
    result = runner.invoke(app, ["data", "check", str(out)])
    assert result.exit_code == 0, result.output
    assert "200 examples: 200 ok" in result.output and "0 bad" in result.output


def _eval_result(name: str, preds: list[str], ciders: list[float]):
    from captioner.evaluation.evaluate import EvalResult

    refs = [["a red square", "red box"], ["a <script>alert(1)</script> tag"], ["a blue circle"]]
    rows = [
        {
            "index": i,
            "prediction": p,
            "references": refs[i],
            "cider": c,
            "wer": 1 - c / 10,
            "exact_match": float(c == 10),
        }
        for i, (p, c) in enumerate(zip(preds, ciders, strict=True))
    ]
    corpus = {"bleu_4": 0.25, "cider": sum(ciders) / 3, "spice": None, "wer": 0.5}
    return EvalResult(name, corpus, rows)


def test_eval_report_is_self_contained_worst_first_and_escaped(tmp_path):
    import re

    from conftest import make_images

    images = [str(p) for p in make_images(tmp_path / "img", 3)]
    a = _eval_result("model-a", ["a red square", "", "a green circle"], [10.0, 0.0, 2.5])
    b = _eval_result("model-b", ["red box", "a tag", "a blue circle"], [4.0, 1.0, 10.0])
    path = write_eval_report(
        tmp_path / "out" / "report.html", [a, b], images, teacher_forced={"model-a": 2.1}
    )
    html = path.read_text()
    # every image inlined, nothing fetched from elsewhere
    assert html.count("data:image/jpeg;base64,") == 3
    assert not re.search(r"(src|href)=['\"]?(https?:|file:|/)", html)
    # captions are text, not markup
    assert "<script>" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    # worst first by the first model's CIDEr-D: image 1 (0.0), then 2 (2.5), then 0 (10.0)
    rows = re.findall(r"<tr><td class='num'>(\d+)</td><td><img", html)
    assert rows == ["1", "2", "0"]
    # both models side by side, corpus table on top, SPICE reported as unavailable
    assert html.index("Corpus scores") < html.index("worst first")
    assert "model-a" in html and "model-b" in html and "a blue circle" in html
    assert "<td>SPICE</td><td class='num'>n/a</td>" in html
    assert "<td>CIDEr-D</td><td class='num'>4.1667</td><td class='num'>5.0000</td>" in html
    assert "2.1000" in html and "does not measure caption quality" in html
    assert "(empty)" in html  # an empty prediction is shown as such, not as a blank cell


def test_eval_report_survives_an_unreadable_image(tmp_path):
    from conftest import make_images

    from captioner.evaluation.evaluate import TEACHER_FORCED_NOTE

    images = [str(p) for p in make_images(tmp_path / "img", 2)] + [str(tmp_path / "gone.png")]
    a = _eval_result("m", ["x", "y", "z"], [1.0, 2.0, 0.5])
    html = write_eval_report(tmp_path / "r.html", [a], images).read_text()
    assert html.count("data:image/jpeg;base64,") == 2
    assert "gone.png" in html and "file not found" in html
    assert TEACHER_FORCED_NOTE not in html  # only shown when the guide's number was asked for


def test_eval_report_escapes_markup_in_captions_names_and_title(tmp_path):
    from conftest import make_images

    images = [str(p) for p in make_images(tmp_path / "img", 3)]
    script = "<script>alert('x')</script>"
    a = _eval_result("<b>model</b>", [script, "ok", "fine"], [1.0, 2.0, 3.0])
    path = write_eval_report(
        tmp_path / "r.html", [a], images, title="<i>t</i>", info={"<k>": "<v>"}
    )
    html = path.read_text()
    assert "<script>" not in html and "&lt;script&gt;alert(" in html and "&lt;/script&gt;" in html
    assert "<b>model</b>" not in html and "&lt;b&gt;model&lt;/b&gt;" in html
    assert "<i>t</i>" not in html and "&lt;k&gt;: &lt;v&gt;" in html


def test_plots_leave_matplotlib_global_state_alone(tmp_path):
    """No pyplot import and no backend switch: a library must not change its caller's matplotlib.
    Run in a fresh interpreter, where nothing else has imported pyplot yet."""
    code = textwrap.dedent(
        f"""
        import sys

        import matplotlib
        from PIL import Image

        from captioner.evaluation.report import plot_curves, plot_samples

        # the rcParams entry as set, read without resolving it (resolving imports pyplot)
        before = dict.__getitem__(matplotlib.rcParams, "backend")
        plot_samples([Image.new("RGB", (8, 8))] * 2, ["a", "b"], {str(tmp_path / "s.png")!r})
        history = [{{"loss": 1.0, "step": 1}}, {{"eval_loss": 0.5, "eval_cider": 0.1, "step": 1}}]
        plot_curves(history, {str(tmp_path / "c.png")!r})
        assert "matplotlib.pyplot" not in sys.modules, "pyplot was imported"
        assert dict.__getitem__(matplotlib.rcParams, "backend") == before, "backend was set"
        """
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "s.png").stat().st_size > 0 and (tmp_path / "c.png").stat().st_size > 0
