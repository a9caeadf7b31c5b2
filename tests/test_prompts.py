"""Caption control: a training prompt carries no loss and is reused when captioning; prompts
are kept or stripped; prefix/suffix/max_words shape the output; limits match the model."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from captioner.decoding import DecodingOptions
from captioner.engine import Captioner
from captioner.errors import CaptionerError
from captioner.models.build import load_model
from captioner.models.families import family_named
from captioner.training.arguments import parse_train_args
from captioner.training.collate import CaptionCollator
from captioner.training.trainer import train


def test_prompt_tokens_carry_no_loss(tiny_model_dir):
    _, processor = load_model(tiny_model_dir)
    rows = [
        {"image": Image.new("RGB", (64, 64)), "captions": ["a red circle on a black background"]}
    ]
    plain = CaptionCollator(processor, family_named("git"))(rows)
    prompted = CaptionCollator(processor, family_named("git"), prompt="a picture of")(rows)
    n = len(processor.tokenizer("a picture of", add_special_tokens=False).input_ids)
    assert prompted["input_ids"].shape[1] == plain["input_ids"].shape[1] + n
    assert (prompted["labels"][0, 1 : 1 + n] == -100).all()  # the prompt: no loss
    # the caption after the prompt is learned exactly as without one
    assert prompted["labels"][0, 1 + n :].tolist() == plain["labels"][0, 1:].tolist()


def test_finish_cuts_and_wraps():
    options = DecodingOptions(max_words=3, prefix="sks, ", suffix=".")
    assert options.finish("a red circle on blue") == "sks, a red circle."
    assert DecodingOptions().finish("a red circle") == "a red circle"
    with pytest.raises(CaptionerError, match="--max_words must be >= 1"):
        DecodingOptions(max_words=0)


def test_force_words_say_why_they_are_unavailable(chatty_model_dir, tmp_path):
    image = Image.new("RGB", (64, 64), (200, 30, 30))
    captioner = Captioner.from_pretrained(chatty_model_dir)
    with pytest.raises(CaptionerError, match="constrained beam search"):
        captioner.caption([image], force_words=["circle"], num_beams=2)


def test_max_new_tokens_is_clamped_to_the_models_positions(chatty_model_dir, caplog):
    captioner = Captioner.from_pretrained(chatty_model_dir)  # the tiny preset: 64 positions
    image = Image.new("RGB", (64, 64), (30, 30, 200))
    with caplog.at_level("WARNING"):
        caption = captioner.caption([image], max_new_tokens=100)[0]  # was an IndexError
    assert "text positions" in caplog.text and isinstance(caption, str)


def test_keep_prompt_and_min_new_tokens_reach_the_output(chatty_model_dir):
    captioner = Captioner.from_pretrained(chatty_model_dir)
    image = Image.new("RGB", (64, 64), (30, 200, 30))
    kept = captioner.caption([image], prompt="a red", max_new_tokens=6)[0]
    stripped = captioner.caption([image], prompt="a red", keep_prompt=False, max_new_tokens=6)[0]
    assert kept.startswith("a red") and stripped and len(stripped) < len(kept)
    longer = captioner.caption([image], min_new_tokens=5, max_new_tokens=8)[0]
    assert len(longer.split()) >= 1


@pytest.mark.slow
def test_trained_prompt_is_saved_and_reused(tmp_path):
    from captioner.data.scenes import generate_scenes

    scenes = generate_scenes(tmp_path / "scenes", n=24, seed=5)
    out = tmp_path / "run"
    args = parse_train_args(["--model", "tiny", "--data", str(scenes), "--output_dir", str(out),
                             "--max_steps", "2", "--eval_strategy", "no", "--prompt",
                             "a picture of", "--per_device_train_batch_size", "4",
                             "--dataloader_num_workers", "0"])  # fmt: skip
    model_args, data_args, decoding, training_args = args
    train(model_args, data_args, training_args, decoding)
    assert json.loads((out / "captioner_config.json").read_text())["prompt"] == "a picture of"
    captioner = Captioner.from_pretrained(out)
    assert captioner.default_prompt == "a picture of"
    caption = captioner.caption([scenes / "00000.png"], max_new_tokens=4)[0]
    assert caption.startswith("a picture of")  # the saved prompt, unasked
    bare = captioner.caption([scenes / "00000.png"], max_new_tokens=4, keep_prompt=False)[0]
    assert not bare.startswith("a picture of")


def test_blip_conditional_captioning_with_a_prompt(tmp_path):
    from test_compose import _blip_dir

    captioner = Captioner.from_pretrained(_blip_dir(tmp_path))
    image = Image.new("RGB", (32, 32), (200, 30, 30))
    caption = captioner.caption([image], prompt="a picture of", max_new_tokens=4)[0]
    assert caption.startswith("a picture of")
    bare = captioner.caption([image], prompt="a picture of", keep_prompt=False, max_new_tokens=4)
    assert not bare[0].startswith("a picture of")
