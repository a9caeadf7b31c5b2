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
    assert {"red", "circle", "green", "star"} <= set(vocab)
    assert len(vocab) < 200  # caption-sized, not BERT's 30,522
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
