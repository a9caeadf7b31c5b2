"""The demo end to end (shortened), and its constant-caption baseline."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from captioner.evaluation.metrics import closest_reference
from captioner.jobs.demo import DemoConfig, best_constant_caption


def test_closest_reference_wer_takes_the_best_reference():
    refs = ["a red circle on a blue background", "a red circle on blue"]
    assert closest_reference("a red circle on blue", refs) == (0.0, refs[1])
    assert closest_reference("a red square on blue", refs) == (pytest.approx(1 / 5), refs[1])


def test_best_constant_caption_picks_the_majority_phrasing():
    train = ["a red circle on blue"] * 3 + ["a green star on white"]
    test_refs = [["a red circle on blue"], ["a red circle on blue"], ["a green star on white"]]
    caption, wer = best_constant_caption(train, test_refs)
    assert caption == "a red circle on blue"
    assert wer == pytest.approx((0 + 0 + 3 / 5) / 3)  # 3 substitutions in 5 words


@pytest.mark.slow
def test_short_demo_writes_everything_and_beats_a_constant_caption(tmp_path):
    """A 2-minute version of `captioner demo`: every output exists, the model loads with plain
    transformers, and a trained model scores visibly better than the best constant caption."""
    from captioner.jobs.demo import run_demo

    config = DemoConfig(output_dir=str(tmp_path / "demo"), num_scenes=700, max_eval_samples=16)
    config.training_args.update(num_train_epochs=4, logging_steps=5)
    summary = run_demo(config)
    out = tmp_path / "demo"
    for name in ("metrics.json", "report.html", "samples.png", "model/config.json"):
        assert (out / name).is_file(), name
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["wer"] == summary["wer"]
    assert len(saved["samples"]) == 8
    # learned something about the image: far above a caption that ignores it
    assert summary["cider"] > 2 * summary["constant_caption_cider"]
    assert summary["wer"] < summary["constant_caption_wer"]
    # a pretrained encoder: most held-out shapes and backgrounds right after a few epochs
    assert summary["exact_match"] > summary["constant_caption_exact_match"]
    assert summary["shape_accuracy"] > 0.5 and summary["background_accuracy"] > 0.5

    # the model directory is plain transformers: load and caption without captioner
    code = (
        "import sys\n"
        "from PIL import Image\n"
        "from transformers import AutoProcessor, VisionEncoderDecoderModel\n"
        f"m = VisionEncoderDecoderModel.from_pretrained({str(out / 'model')!r})\n"
        f"p = AutoProcessor.from_pretrained({str(out / 'model')!r})\n"
        "assert 'captioner' not in sys.modules\n"
        f"img = Image.open({str(out / 'scenes' / '00000.png')!r}).convert('RGB')\n"
        "ids = m.generate(pixel_values=p(images=img, return_tensors='pt').pixel_values,"
        " max_new_tokens=30)\n"
        "print(' '.join(p.tokenizer.batch_decode(ids, skip_special_tokens=True)[0].split()))\n"
    )
    plain = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert plain.returncode == 0, plain.stderr[-2000:]
    from captioner.engine import Captioner

    ours = Captioner.from_pretrained(out / "model").caption([out / "scenes" / "00000.png"])[0]
    assert plain.stdout.strip().splitlines()[-1] == ours


def test_demo_train_flags_parse_to_the_demos_training(tmp_path):
    """The benchmarks rerun the demo's training from these flags: they must say what it does."""
    from captioner.jobs.demo import DEMO_TRAINING_ARGS, DemoConfig, demo_train_flags
    from captioner.training.arguments import parse_train_args

    flags = demo_train_flags(num_train_epochs=3, model="tiny")
    model_args, data_args, _, training_args = parse_train_args(
        [*flags, "--data", str(tmp_path), "--output_dir", str(tmp_path / "out")]
    )
    assert model_args.model == "tiny" and training_args.num_train_epochs == 3
    assert data_args.test_size == DemoConfig.test_size and training_args.seed == DemoConfig.seed
    for name, value in DEMO_TRAINING_ARGS.items():
        if name != "num_train_epochs":
            assert getattr(training_args, name) == value, name
    assert "--model" not in demo_train_flags(model=None)
