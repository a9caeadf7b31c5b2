"""LoRA through peft: only adapters (and the random parts of a composition) train, the adapter
folder is a model folder everywhere, and merging changes no caption."""

from __future__ import annotations

import json
import pickle
import shutil
import sys
from pathlib import Path

import pytest
import torch

from captioner.engine import Captioner
from captioner.errors import CaptionerError
from captioner.models.build import load_model, merge_adapter
from captioner.models.lora import add_lora, is_adapter_dir
from captioner.training.arguments import parse_train_args
from captioner.training.trainer import train

FAST = [
    "--per_device_train_batch_size", "8", "--max_new_tokens", "8", "--logging_steps", "1",
    "--test_size", "0.125", "--dataloader_num_workers", "0", "--eval_strategy", "no",
]  # fmt: skip


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> Path:
    from captioner.data.scenes import generate_scenes

    return generate_scenes(tmp_path_factory.mktemp("scenes") / "data", n=24, seed=3)


def test_lora_targets_the_text_attention_and_freezes_the_rest(chatty_model_dir):
    model, _ = load_model(chatty_model_dir)
    peft_model = add_lora(model, r=4)
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert not any("image_encoder" in n for n in trainable)  # the vision tower is left alone
    assert any(".query." in n for n in trainable) and any(".value." in n for n in trainable)
    with pytest.raises(CaptionerError, match="lora_target_modules"):
        add_lora(torch.nn.Sequential(torch.nn.ReLU()), r=4)


@pytest.mark.slow
def test_lora_training_changes_only_adapters_and_merging_keeps_captions(
    chatty_model_dir, scenes, tmp_path
):
    out = tmp_path / "run"
    args = parse_train_args(["--model", str(chatty_model_dir), "--data", str(scenes),
                             "--output_dir", str(out), "--max_steps", "3", "--lora_r", "4",
                             "--learning_rate", "1e-2", *FAST])  # fmt: skip
    model_args, data_args, decoding, training_args = args
    train(model_args, data_args, training_args, decoding)
    assert is_adapter_dir(out) and not (out / "model.safetensors").exists()

    base, _ = load_model(chatty_model_dir)
    adapted, _ = load_model(out, merge=False)
    base_state = base.state_dict()
    changed = []
    for name, value in adapted.named_parameters():
        if "lora_" in name:
            changed.append(name)
            continue
        original = name.replace("base_model.model.", "").replace(".base_layer", "")
        assert torch.equal(value, base_state[original]), f"{name} changed"
    lora_b = [p for n, p in adapted.named_parameters() if "lora_B" in n]
    assert changed and any(p.abs().sum() > 0 for p in lora_b)  # B starts at 0: it trained

    images = sorted(scenes.glob("*.png"))[:4]
    unmerged = Captioner.from_pretrained(out).caption(images, max_new_tokens=8)
    merged_dir = merge_adapter(out, tmp_path / "merged")
    assert not is_adapter_dir(merged_dir) and (merged_dir / "model.safetensors").is_file()
    merged = Captioner.from_pretrained(merged_dir).caption(images, max_new_tokens=8)
    kept = Captioner(adapted, load_model(out)[1]).caption(images, max_new_tokens=8)
    assert merged == unmerged == kept
    with pytest.raises(CaptionerError, match="not a LoRA adapter folder"):
        merge_adapter(chatty_model_dir, tmp_path / "nope")


# ---- odd adapter folders and merge targets (issue 19) ----


@pytest.fixture(scope="module")
def adapter(tiny_model_dir, tmp_path_factory) -> Path:
    """An untrained LoRA adapter on the tiny GIT, saved as training saves one."""
    model, processor = load_model(tiny_model_dir)
    out = tmp_path_factory.mktemp("adapter")
    add_lora(model, r=2).save_pretrained(out)
    processor.save_pretrained(out)
    return out


class _Planted:
    """Unpickling this touches a file: the proof that a pickle was loaded."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_adapters_that_cannot_load_are_one_line_errors_naming_the_file(adapter, tmp_path):
    selfish = tmp_path / "selfish"
    shutil.copytree(adapter, selfish)
    config = json.loads((selfish / "adapter_config.json").read_text())
    (selfish / "adapter_config.json").write_text(
        json.dumps({**config, "base_model_name_or_path": str(selfish)})
    )
    with pytest.raises(CaptionerError, match="adapter_config.json.*cannot be its own base"):
        load_model(selfish)  # was a RecursionError
    pickled = tmp_path / "pickled"
    shutil.copytree(adapter, pickled)
    (pickled / "adapter_model.safetensors").unlink()
    marker = tmp_path / "unpickled"
    (pickled / "adapter_model.bin").write_bytes(pickle.dumps(_Planted(marker)))
    with pytest.raises(CaptionerError, match=r"adapter_model\.bin: a pickle file.*safetensors"):
        load_model(pickled)
    assert not marker.exists()
    (selfish / "adapter_config.json").write_text("[]")
    with pytest.raises(CaptionerError, match="adapter_config.json: does not say which model"):
        load_model(selfish)


def test_merge_writes_a_new_folder_whole_and_never_into_its_inputs(
    adapter, tmp_path, monkeypatch, capsys
):
    from captioner import cli

    out = tmp_path / "merged"
    out.mkdir()
    (out / "notes.txt").write_text("precious")
    with pytest.raises(CaptionerError, match="not empty .*--overwrite"):
        merge_adapter(adapter, out)
    for inside in (adapter, adapter.parent):  # the adapter's own folder, or one holding it
        with pytest.raises(CaptionerError, match="which it is made from"):
            merge_adapter(adapter, inside, overwrite=True)
    (tmp_path / "file").write_text("x")
    with pytest.raises(CaptionerError, match="not a folder"):
        merge_adapter(adapter, tmp_path / "file")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    with pytest.raises(CaptionerError, match="symlink"):
        merge_adapter(adapter, tmp_path / "dangling")
    assert not (tmp_path / "nowhere").exists() and is_adapter_dir(adapter)
    assert (out / "notes.txt").read_text() == "precious"

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as patch:  # a merge that fails half way changes nothing
        patch.setattr(type(load_model(adapter)[1]), "save_pretrained", full_disk)
        with pytest.raises(OSError):
            merge_adapter(adapter, out, overwrite=True)
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    assert merge_adapter(adapter, out, overwrite=True) == out
    assert (out / "model.safetensors").is_file() and not (out / "notes.txt").exists()
    assert not is_adapter_dir(out) and load_model(out)[0] is not None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dangling", "file", "merged"]

    monkeypatch.setattr(sys, "argv", ["captioner", "merge", str(adapter), str(adapter)])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    err = capsys.readouterr().err
    assert exit_info.value.code == 1 and "error:" in err and "made from" in err, err
