"""ONNX export: a tiny GIT exported, captioning a folder on ONNX Runtime with the same greedy
captions as the torch model; int8 export; what cannot be exported says so in one line."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

pytest.importorskip("onnxruntime")
from conftest import make_images  # noqa: E402

from captioner.engine import Captioner  # noqa: E402
from captioner.errors import CaptionerError  # noqa: E402
from captioner.models import export  # noqa: E402
from captioner.models.export import export_onnx, is_onnx_dir, load_onnx  # noqa: E402


@pytest.fixture(scope="module")
def onnx_dir(chatty_model_dir, tmp_path_factory):
    return export_onnx(chatty_model_dir, tmp_path_factory.mktemp("onnx") / "fp32")


def test_export_writes_a_marked_folder_with_the_processor(onnx_dir, chatty_model_dir):
    assert is_onnx_dir(onnx_dir) and not is_onnx_dir(chatty_model_dir)
    assert not is_onnx_dir("microsoft/git-base") and not is_onnx_dir(None)
    meta = json.loads((onnx_dir / export.FORMAT_FILE).read_text())
    assert meta["family"] == "git" and meta["int8"] is False
    names = {p.name for p in onnx_dir.iterdir()}
    assert {export.ENCODER_FILE, export.DECODER_FILE, "config.json", "tokenizer.json"} <= names
    assert "preprocessor_config.json" in names or "processor_config.json" in names
    assert not any(n.endswith(".safetensors") for n in names)  # no torch weights needed


def test_onnx_captions_a_folder_like_the_torch_model(onnx_dir, chatty_model_dir, tmp_path):
    folder = tmp_path / "images"
    make_images(folder, 12)
    (folder / "broken.png").write_bytes(b"not a png")
    paths = sorted(folder.glob("*.png"))
    torch_captioner = Captioner.from_pretrained(chatty_model_dir, device="cpu")
    onnx_captioner = Captioner(*load_onnx(onnx_dir), device="cpu")
    expected = dict(torch_captioner.caption_iter(paths, max_new_tokens=20, batch_size=5))
    got = dict(onnx_captioner.caption_iter(paths, max_new_tokens=20, batch_size=5))
    bad = [i for i, p in enumerate(paths) if p.name == "broken.png"]
    assert isinstance(got.pop(bad[0]), CaptionerError)  # a bad image is its own error, as ever
    expected.pop(bad[0])
    assert got == expected
    assert len(set(got.values())) > 6  # the captions differ per image: not trivially equal
    # a prompt, a repetition penalty and banned words reach the ONNX decoder the same way
    good = [p for p in paths if p.name != "broken.png"][:4]
    options = {"prompt": "a red", "repetition_penalty": 1.3, "bad_words": ["ac"]}
    assert onnx_captioner.caption(good, **options) == torch_captioner.caption(good, **options)


def test_onnx_sampling_and_what_it_does_not_do(onnx_dir, chatty_model_dir, tmp_path):
    captioner = Captioner(*load_onnx(onnx_dir), device="cpu")
    paths = make_images(tmp_path, 2)
    sampled = captioner.caption(paths, do_sample=True, num_return_sequences=3, temperature=0.8)
    assert [len(group) for group in sampled] == [3, 3]
    with pytest.raises(CaptionerError, match="num_beams"):
        captioner.caption(paths, num_beams=2)
    with pytest.raises(CaptionerError, match="not an ONNX export"):
        load_onnx(chatty_model_dir)


def test_int8_export_is_smaller_and_captions(chatty_model_dir, onnx_dir, tmp_path):
    out = export_onnx(chatty_model_dir, tmp_path / "int8", int8=True)
    assert json.loads((out / export.FORMAT_FILE).read_text())["int8"] is True
    size = sum(p.stat().st_size for p in out.glob("*.onnx"))
    assert size < 0.5 * sum(p.stat().st_size for p in onnx_dir.glob("*.onnx"))
    captions = Captioner(*load_onnx(out), device="cpu").caption(
        make_images(tmp_path / "im", 3), max_new_tokens=10
    )
    assert len(captions) == 3 and all(isinstance(c, str) for c in captions)


def test_refusals_are_one_line(chatty_model_dir, onnx_dir, tmp_path, monkeypatch):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x.txt").write_text("x")
    with pytest.raises(CaptionerError, match="not empty"):
        export_onnx(chatty_model_dir, tmp_path / "full")
    with pytest.raises(CaptionerError, match="already an ONNX export"):
        export_onnx(onnx_dir, tmp_path / "again")
    for family in ("blip", "paligemma"):  # the other families: test_export_families.py
        fake = SimpleNamespace(config=SimpleNamespace(model_type=family))
        monkeypatch.setattr(export, "load_model", lambda *a, **k: (fake, None))  # noqa: B023
        with pytest.raises(CaptionerError) as info:
            export_onnx("some-model", tmp_path / family)
        message = str(info.value)
        assert message.startswith(f"cannot export a {family} model to ONNX: ")
        assert "\n" not in message
