"""load_model / build_preset: presets load like Hub ids; bad names fail with one clear line."""

from __future__ import annotations

import json

import pytest

from captioner.errors import CaptionerError
from captioner.models.build import build_preset, load_model


def test_preset_tokenizer_follows_the_captions(tmp_path):
    out = build_preset("tiny", ["a red circle on blue", "a green star on white"] * 3, tmp_path)
    model, processor = load_model(out)
    vocab = processor.tokenizer.get_vocab()
    for word in ("red", "circle", "green", "star"):  # each caption word is one token
        assert len(processor.tokenizer(word, add_special_tokens=False).input_ids) == 1, word
    assert len(vocab) < 256 + 200  # the 256 bytes + caption-sized merges, not BERT's 30,522
    assert model.config.vocab_size == len(processor.tokenizer)
    assert model.config.bos_token_id == processor.tokenizer.cls_token_id
    assert model.config.pad_token_id == processor.tokenizer.pad_token_id
    saved = json.loads((out / "config.json").read_text())
    assert saved["model_type"] == "git"
    assert (out / "model.safetensors").is_file()


def test_not_a_model_directory(tmp_path):
    with pytest.raises(CaptionerError, match="not a model directory"):
        load_model(tmp_path)


def test_hub_id_fails_fast_when_the_hub_is_unreachable(monkeypatch):
    import captioner.models.build as models_mod

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(models_mod, "hub_reachable", lambda timeout=3.0: False)
    with pytest.raises(CaptionerError, match="Hub did not provide it"):
        load_model("microsoft/git-base")


def test_hub_id_offline_is_one_clear_error():
    with pytest.raises(CaptionerError, match="microsoft/git-base"):
        load_model("microsoft/git-base")  # HF_HUB_OFFLINE=1 in conftest


def test_unknown_preset():
    with pytest.raises(CaptionerError, match="unknown preset"):
        build_preset("huge", ["a caption"], "/tmp/never")


def test_odd_captioner_configs_are_one_line_errors_naming_the_file(tiny_model_dir, tmp_path):
    import shutil

    from captioner.engine import Captioner
    from captioner.jobs.evaluate import split_options
    from captioner.models.build import training_options

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    config = model / "captioner_config.json"
    cases = [
        ("[]", "must hold a JSON object of options, not a list"),
        ('{"prompt": 5}', "prompt must be a string, not a number"),
        ('{"seed": "one"}', "seed must be a number, not a string"),
        (json.dumps({"prompt": "x" * 300}), "the saved prompt has 300 characters, at most 200"),
        ("{not json", "not valid JSON"),
        (b"\xff\xfe", "not valid JSON"),
    ]
    for content, message in cases:
        if isinstance(content, bytes):
            config.write_bytes(content)
        else:
            config.write_text(content)
        for read in (training_options, lambda m: split_options(m, {})):
            with pytest.raises(CaptionerError, match=message) as err:
                read(str(model))
            assert str(config) in str(err.value) and "--prompt" not in str(err.value)
    config.write_text(json.dumps({"prompt": "x" * 300}))
    with pytest.raises(CaptionerError, match="saved prompt"):
        Captioner.from_pretrained(model)  # was blamed on a --prompt nobody gave
    config.write_text(json.dumps({"prompt": "a photo of", "seed": 3, "image_column": None}))
    assert training_options(model)["prompt"] == "a photo of"
    assert Captioner.from_pretrained(model).default_prompt == "a photo of"
