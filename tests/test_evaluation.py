"""Generation-based evaluation, the guide's teacher-forced WER, and `captioner eval`."""

from __future__ import annotations

import json

import datasets
import jiwer
import pytest
import torch
from conftest import TINY_CAPTIONS, make_images

from captioner.decoding import DecodingOptions
from captioner.engine import Captioner
from captioner.errors import CaptionerError
from captioner.evaluation import evaluate as evaluation
from captioner.evaluation import metrics
from captioner.models.build import load_model


@pytest.fixture(scope="module")
def wordy(tiny_model_dir):
    """The tiny random GIT with special tokens banned from its output, so it writes words."""
    model, processor = load_model(tiny_model_dir)
    with torch.no_grad():
        model.output.bias[processor.tokenizer.all_special_ids] = -1e4
    return Captioner(model, processor, device="cpu")


@pytest.fixture(scope="module")
def split(tmp_path_factory) -> datasets.Dataset:
    paths = make_images(tmp_path_factory.mktemp("eval_images"), 6)
    refs = [[TINY_CAPTIONS[i], TINY_CAPTIONS[i + 6]] for i in range(6)]
    ds = datasets.Dataset.from_dict({"image": [str(p) for p in paths], "captions": refs})
    return ds.cast_column("image", datasets.Image())


def test_evaluate_scores_what_the_engine_generates(wordy, split):
    result = evaluation.evaluate(wordy, split, max_new_tokens=6, batch_size=4, model_name="tiny")
    direct = wordy.caption(list(split["image"]), max_new_tokens=6, batch_size=4)
    assert [row["prediction"] for row in result.samples] == direct
    assert all(p.strip() for p in direct)  # words, not empty strings: the check is not vacuous
    assert [row["index"] for row in result.samples] == list(range(6))
    assert result.samples[2]["references"] == split[2]["captions"]
    expected = metrics.score(direct, split["captions"])
    for key in metrics.CORPUS_KEYS:
        assert result.metrics[key] == pytest.approx(expected.corpus[key])
    assert result.samples[3]["cider"] == pytest.approx(expected.samples[3]["cider"])
    assert result.metrics["num_skipped"] == 0
    assert result.options["max_new_tokens"] == 6


def test_max_samples_is_the_first_rows(wordy, split):
    result = evaluation.evaluate(wordy, split, max_new_tokens=4, max_samples=3)
    assert [row["index"] for row in result.samples] == [0, 1, 2]
    assert result.metrics["num_samples"] == 3


def test_unreadable_image_is_skipped_and_listed(wordy, split, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    paths = [
        split.cast_column("image", datasets.Image(decode=False))[i]["image"]["path"]
        for i in range(3)
    ]
    ds = datasets.Dataset.from_dict(
        {"image": [paths[0], str(broken), paths[2]], "captions": split["captions"][:3]}
    ).cast_column("image", datasets.Image())
    result = evaluation.evaluate(wordy, ds, max_new_tokens=4)
    assert [row["index"] for row in result.samples] == [0, 2]
    assert result.skipped[0]["index"] == 1 and "broken.png" in result.skipped[0]["error"]
    assert result.metrics["num_skipped"] == 1


def test_missing_columns_are_a_clear_error(wordy, split):
    with pytest.raises(CaptionerError, match="captions"):
        evaluation.evaluate(wordy, split.rename_column("captions", "text"))


def _guide_compute_metrics(model, processor, ds) -> float:
    """The guide's transforms + Trainer forward + compute_metrics, in one batch, as written.

    `evaluate.load("wer")` is not reachable offline; its computation is spelled out: per pair,
    errors (S + D + I) and reference words (S + D + H), summed over the set.
    """
    inputs = processor(
        images=list(ds["image"]), text=[c[0] for c in ds["captions"]], padding="max_length"
    )
    inputs.update({"labels": inputs["input_ids"]})
    batch = {
        k: torch.tensor(v) if k != "pixel_values" else torch.stack([torch.as_tensor(x) for x in v])
        for k, v in inputs.items()
    }
    with torch.no_grad():
        logits = model(**batch).logits.numpy()
    labels = batch["labels"].numpy()
    predicted = logits.argmax(-1)
    decoded_labels = processor.batch_decode(labels, skip_special_tokens=True)
    decoded_predictions = processor.batch_decode(predicted, skip_special_tokens=True)
    incorrect = total = 0
    for prediction, reference in zip(decoded_predictions, decoded_labels, strict=True):
        m = jiwer.process_words(reference, prediction)
        incorrect += m.substitutions + m.deletions + m.insertions
        total += m.substitutions + m.deletions + m.hits
    return incorrect / total


def test_teacher_forced_wer_is_the_guides_number(tiny_model_dir, split):
    model, processor = load_model(tiny_model_dir)
    guide = _guide_compute_metrics(model, processor, split)
    ours = evaluation.teacher_forced_wer(model, processor, split, batch_size=4)
    assert ours == pytest.approx(guide)
    assert ours > 0


def test_eval_command_writes_metrics_and_report(tiny_model_dir, tmp_path):
    from typer.testing import CliRunner

    from captioner.cli import app
    from captioner.data.scenes import generate_scenes

    data = generate_scenes(tmp_path / "scenes", n=30)
    out = tmp_path / "eval"
    args = [
        "eval",
        str(tiny_model_dir),
        str(data),
        "--max_new_tokens",
        "5",
        "--max_eval_samples",
        "2",
    ]
    args += ["--output_dir", str(out), "--compare", str(tiny_model_dir)]
    result = CliRunner().invoke(app, [*args, "--metric", "teacher_forced_wer"])
    assert result.exit_code == 0, result.output
    assert "CIDEr-D" in result.output
    summary = json.loads((out / "metrics.json").read_text())
    assert set(metrics.CORPUS_KEYS) <= set(summary)
    assert summary["split"] == "test" and summary["num_samples"] == 2
    assert summary["compare"]["cider"] == summary["cider"]  # the same model twice
    assert summary["teacher_forced_wer"] > 0
    html = (out / "report.html").read_text()
    assert html.count("data:image/jpeg;base64,") == 2
    assert "it never looks at a generated caption" in html  # the teacher-forced caveat
    assert len((out / "samples.jsonl").read_text().splitlines()) == 2


def test_eval_command_rejects_unknown_metric_and_split(tiny_model_dir, tmp_path):
    from typer.testing import CliRunner

    from captioner.cli import app

    result = CliRunner().invoke(app, ["eval", str(tiny_model_dir), "x", "--metric", "bleu"])
    assert isinstance(result.exception, CaptionerError)
    assert "teacher_forced_wer" in str(result.exception)

    from captioner.data.scenes import generate_scenes

    scenes = generate_scenes(tmp_path / "scenes", n=6)
    args = ["eval", str(tiny_model_dir), str(scenes), "--split", "validation"]
    result = CliRunner().invoke(app, args)
    assert isinstance(result.exception, CaptionerError)
    assert "no split 'validation'" in str(result.exception) and "train" in str(result.exception)


def test_eval_split_follows_the_models_training_config(tmp_path):
    """A model trained with --test_size 0.2 --seed 1 is scored on its own held-out split."""
    import json

    from captioner.jobs.evaluate import split_options

    (tmp_path / "captioner_config.json").write_text(
        json.dumps({"test_size": 0.2, "seed": 1, "image_column": None, "learning_rate": 1e-3})
    )
    args, seed = split_options(str(tmp_path), {})
    assert (args.test_size, seed, args.image_column) == (0.2, 1, None)
    args, seed = split_options(str(tmp_path), {"seed": 7, "test_size": None})
    assert (args.test_size, seed) == (0.2, 7)
    args, seed = split_options("some/hub-id", {"on_bad_image": "fail"})
    assert (args.on_bad_image, args.test_size, seed) == ("fail", 0.1, 0)


def test_eval_split_all_scores_every_row(tiny_model_dir, tmp_path):
    """A folder meant as a test set: `--split all` scores every image in it, in stored order."""
    from captioner.data.scenes import generate_scenes
    from captioner.jobs.evaluate import EvalJob, run_eval

    data = generate_scenes(tmp_path / "scenes", n=12)
    decoding = DecodingOptions(max_new_tokens=3)
    job = EvalJob(model=str(tiny_model_dir), data=str(data), split="all", decoding=decoding)
    (result,), _ = run_eval(job)
    assert result.metrics["num_samples"] == 12 and len(result.samples) == 12
    expected = [json.loads(line)["captions"] for line in open(data / "metadata.jsonl")]
    assert [row["references"] for row in result.samples] == expected
    # the default split is the held-out tenth only
    job = EvalJob(model=str(tiny_model_dir), data=str(data), decoding=decoding)
    assert run_eval(job)[0][0].metrics["num_samples"] == 2


def test_eval_split_all_takes_every_split_of_the_source(tiny_model_dir, tmp_path):
    from captioner.jobs.evaluate import EvalJob, run_eval

    for split, n in (("train", 3), ("validation", 2), ("test", 2)):
        paths = make_images(tmp_path / "data" / split, n)
        with open(tmp_path / "data" / split / "metadata.jsonl", "w") as meta:
            for p in paths:
                meta.write(json.dumps({"file_name": p.name, "text": f"{split} {p.stem}"}) + "\n")
    job = EvalJob(
        model=str(tiny_model_dir),
        data=str(tmp_path / "data"),
        split="all",
        decoding=DecodingOptions(max_new_tokens=3),
    )
    (result,), _ = run_eval(job)
    assert result.metrics["num_samples"] == 7


def test_eval_empty_split_names_the_flag(tiny_model_dir, tmp_path):
    from captioner.data.scenes import generate_scenes
    from captioner.jobs.evaluate import EvalJob, run_eval

    data = generate_scenes(tmp_path / "scenes", n=5)
    job = EvalJob(model=str(tiny_model_dir), data=str(data), data_options={"test_size": 0})
    with pytest.raises(CaptionerError, match=r"'test' split .* is empty") as err:
        run_eval(job)
    assert "--split all" in str(err.value) and "all 5 rows" in str(err.value)
    assert "--test_size" in str(err.value)
    job.split = "nope"
    with pytest.raises(CaptionerError, match="no split 'nope'.*--split all"):
        run_eval(job)


def test_metrics_json_counts_the_examples_skipped_while_reading(tiny_model_dir, tmp_path):
    from captioner.data.scenes import generate_scenes
    from captioner.jobs.evaluate import EvalJob, run_eval

    data = generate_scenes(tmp_path / "scenes", n=4)
    (data / "broken.png").write_bytes(b"not a png")
    with open(data / "metadata.jsonl", "a") as meta:
        meta.write(json.dumps({"file_name": "broken.png", "captions": ["a broken image"]}) + "\n")
    out = tmp_path / "eval"
    job = EvalJob(model=str(tiny_model_dir), data=str(data), split="all", output_dir=str(out),
                  decoding=DecodingOptions(max_new_tokens=3))  # fmt: skip
    (result,), _ = run_eval(job)  # the log says: skipped 1 of 5 examples
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["num_samples"] == 4
    assert summary["num_skipped"] == 1 and summary["num_skipped_reading"] == 1
    assert result.metrics["num_skipped"] == 1
