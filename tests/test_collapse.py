"""The collapse guard: caption diversity, the guard's state machine, and a forced collapse
through the real training path."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import pytest
from transformers import TrainerControl, TrainerState, TrainingArguments

from captioner.training.collapse import CollapseGuard, diversity

# --- diversity --------------------------------------------------------------------------------


def test_diversity_of_varied_and_collapsed_captions():
    varied = ["a red circle", "a blue square", "a green star on gray"]
    d = diversity(varied)
    assert d["unique_ratio"] == 1.0
    # unigrams: a x3, red, circle, blue, square, green, star, on, gray -> 9 distinct of 11
    assert d["distinct_1"] == pytest.approx(9 / 11)
    assert d["distinct_2"] == pytest.approx(8 / 8)

    collapsed = diversity(["a red circle"] * 19 + ["A red circle."])  # case, punctuation: same
    assert collapsed["unique_ratio"] == pytest.approx(1 / 20)
    assert collapsed["distinct_1"] == pytest.approx(3 / 60)
    assert collapsed["distinct_2"] == pytest.approx(2 / 40)


def test_diversity_edge_cases():
    assert diversity([]) == {"unique_ratio": 0.0, "distinct_1": 0.0, "distinct_2": 0.0}
    empty = diversity(["", "", " "])
    assert empty == {"unique_ratio": pytest.approx(1 / 3), "distinct_1": 0.0, "distinct_2": 0.0}
    one_word = diversity(["cat", "dog"])
    assert one_word["distinct_2"] == 0.0 and one_word["distinct_1"] == 1.0


# --- the guard's state machine ------------------------------------------------------------------


def _evaluate(guard: CollapseGuard, ratio: float | None, images: int = 40, step: int = 0):
    args = TrainingArguments(output_dir="unused", learning_rate=3e-2, report_to=[])
    state, control = TrainerState(), TrainerControl()
    state.global_step = step
    metrics = {"eval_loss": 1.0}
    if ratio is not None:
        metrics |= {"eval_unique_ratio": ratio, "eval_num_samples": float(images)}
    guard.on_evaluate(args, state, control, metrics=metrics)
    return control


def test_guard_warns_after_two_low_evaluations_in_a_row(caplog):
    guard = CollapseGuard()
    with caplog.at_level(logging.WARNING, logger="captioner.training.collapse"):
        assert not _evaluate(guard, 0.05, step=10).should_training_stop
        assert not caplog.records and guard.streak == 1 and not guard.collapsed
        _evaluate(guard, 0.5, step=20)  # recovered: the streak starts over
        assert guard.streak == 0
        _evaluate(guard, 0.05, step=30)
        assert not caplog.records
        control = _evaluate(guard, 0.025, step=40)
    assert guard.collapsed and not control.should_training_stop  # warn only, by default
    (record,) = caplog.records
    message = record.getMessage()
    assert "steps 30, 40" in message and "0.025" in message and "of 40 eval images" in message
    assert "learning rate too high" in message and "too few steps" in message
    assert "learning rate 0.03" in message
    assert "prompt" in message and "--stop_on_collapse" in message

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="captioner.training.collapse"):
        _evaluate(guard, 0.05, step=50)  # still collapsed: no second warning for one streak
    assert not caplog.records and guard.streak == 3


def test_guard_with_stop_ends_training():
    guard = CollapseGuard(stop=True)
    assert not _evaluate(guard, 0.0).should_training_stop
    assert _evaluate(guard, 0.0).should_training_stop
    assert _evaluate(guard, 0.0).should_training_stop  # and keeps asking while collapsed


def test_guard_ignores_small_or_missing_evaluations():
    guard = CollapseGuard(stop=True)
    for _ in range(3):
        assert not _evaluate(guard, 0.05, images=19).should_training_stop  # under min_images
        assert not _evaluate(guard, None).should_training_stop  # no generation metrics
    assert guard.streak == 0
    # a small evaluation between two low ones neither counts nor breaks the streak
    _evaluate(guard, 0.05)
    _evaluate(guard, 0.5, images=5)
    assert _evaluate(guard, 0.05).should_training_stop


def test_guard_threshold_and_patience_are_options():
    guard = CollapseGuard(threshold=0.5, patience=3, min_images=4, stop=True)
    assert not _evaluate(guard, 0.4, images=4).should_training_stop
    assert not _evaluate(guard, 0.4, images=4).should_training_stop
    assert _evaluate(guard, 0.4, images=4).should_training_stop
    assert not _evaluate(CollapseGuard(threshold=0.5), 0.5).should_training_stop  # not below
    with pytest.raises(ValueError):
        CollapseGuard(patience=0)


# --- a forced collapse through the real training path ------------------------------------------

# A learning rate of 10 makes the tiny GIT diverge at once: every eval image gets the same caption.
COLLAPSE_FLAGS = [
    "--learning_rate",
    "10",
    "--max_steps",
    "12",
    "--eval_strategy",
    "steps",
    "--eval_steps",
    "2",
    "--save_total_limit",
    "1",
    "--per_device_train_batch_size",
    "8",
    "--per_device_eval_batch_size",
    "20",
    "--test_size",
    "0.5",
    "--max_eval_samples",
    "20",
    "--max_new_tokens",
    "6",
    "--logging_steps",
    "1",
    "--dataloader_num_workers",
    "0",
]


@pytest.fixture(scope="module")
def scenes40(tmp_path_factory) -> Path:
    from captioner.data.scenes import generate_scenes

    return generate_scenes(tmp_path_factory.mktemp("collapse") / "data", n=44, seed=1)


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CAPTIONER_CACHE", str(tmp_path / "cache"))


def _train(out: Path, data: Path, *flags: str, callbacks=None):
    from captioner.training.arguments import parse_train_args
    from captioner.training.trainer import train

    model, data_args, decoding, args = parse_train_args(
        ["--model", "tiny", "--data", str(data), "--output_dir", str(out), *COLLAPSE_FLAGS, *flags]
    )
    train(model, data_args, args, decoding, callbacks=callbacks)
    return json.loads((out / "trainer_state.json").read_text())


def _assert_stopped_with_best_kept(state: dict, out: Path) -> None:
    evals = [e for e in state["log_history"] if "eval_unique_ratio" in e]
    assert all(e["eval_unique_ratio"] < 0.1 for e in evals)  # collapsed: one caption for all
    assert state["global_step"] == 4 < 12  # stopped at the second low evaluation
    best = state["best_model_checkpoint"]
    assert best is not None and Path(best).is_dir()  # kept, and loaded at the end
    final = json.loads((out / "eval_results.json").read_text())
    best_eval = next(e for e in evals if e["step"] == int(Path(best).name.split("-")[1]))
    assert final["eval_cider"] == pytest.approx(best_eval["eval_cider"])


@pytest.mark.slow
def test_forced_collapse_warns_and_stops(tmp_path, scenes40, caplog):
    out = tmp_path / "run"
    guard = CollapseGuard(stop=True)
    with caplog.at_level(logging.WARNING, logger="captioner.training.collapse"):
        state = _train(out, scenes40, callbacks=[guard])
    assert guard.collapsed
    assert "caption collapse" in caplog.text and "learning rate 10" in caplog.text
    _assert_stopped_with_best_kept(state, out)


def _wired() -> bool:
    from captioner.training.arguments import CaptionTrainingArguments

    return "stop_on_collapse" in {f.name for f in dataclasses.fields(CaptionTrainingArguments)}


@pytest.mark.slow
@pytest.mark.skipif(not _wired(), reason="training has no --stop_on_collapse yet")
def test_stop_on_collapse_flag(tmp_path, scenes40, caplog):
    """Training wires the guard itself: it warns without --stop_on_collapse and stops with it;
    every evaluation logs the diversity of its captions."""
    out = tmp_path / "warn"
    with caplog.at_level(logging.WARNING, logger="captioner.training.collapse"):
        state = _train(out, scenes40, "--max_steps", "6")
    assert "caption collapse" in caplog.text and "--stop_on_collapse" in caplog.text
    assert state["global_step"] == 6  # warned, went on
    evals = [e for e in state["log_history"] if "eval_cider" in e]
    assert all({"eval_unique_ratio", "eval_distinct_1", "eval_distinct_2"} <= set(e) for e in evals)

    out = tmp_path / "stop"
    _assert_stopped_with_best_kept(_train(out, scenes40, "--stop_on_collapse"), out)
