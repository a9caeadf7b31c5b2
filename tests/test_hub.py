"""hub.py: Hub reachability and pushing a finished model folder (an allow-list, never reports)."""

from __future__ import annotations

import shutil

import pytest
from huggingface_hub.utils import filter_repo_objects

from captioner import hub
from captioner.errors import CaptionerError
from captioner.hub import push_files, push_to_hub


def test_push_fails_with_one_line_offline_or_without_a_model(tiny_model_dir, tmp_path):
    with pytest.raises(CaptionerError, match="not a model directory"):
        push_to_hub(tmp_path, "someone/model")
    with pytest.raises(CaptionerError, match="Hub is unreachable"):
        push_to_hub(tiny_model_dir, "someone/model")  # HF_HUB_OFFLINE=1 in conftest


@pytest.fixture
def trained_folder(tiny_model_dir, tmp_path):
    """A model folder as `train` + README's `eval --output_dir runs/tiny/eval` leave it."""
    folder = tmp_path / "run"
    shutil.copytree(tiny_model_dir, folder)
    for name in ("captioner_config.json", "all_results.json", "train_results.json"):
        (folder / name).write_text("{}")
    (folder / "curves.png").write_bytes(b"\x89PNG")
    (folder / "README.md").write_text("# card")
    (folder / "training_args.bin").write_bytes(b"pickle")
    (folder / "report.html").write_text("<img src='data:image/png;base64,...'>")
    (folder / "eval").mkdir()
    (folder / "eval" / "report.html").write_text("<img src='data:image/png;base64,...'>")
    (folder / "eval" / "metrics.json").write_text("{}")
    (folder / "checkpoint-5").mkdir()
    (folder / "checkpoint-5" / "model.safetensors").write_bytes(b"old")
    (folder / "notes[1].txt").write_text("private")
    (folder / ".model.safetensors.abc.tmp").write_bytes(b"half")
    return folder


def test_push_uploads_the_model_card_and_curves_only(trained_folder, monkeypatch):
    calls = {}

    class FakeApi:
        def create_repo(self, repo_id, **kwargs):
            calls["repo"] = repo_id

        def upload_folder(self, **kwargs):
            calls.update(kwargs)
            return type("Info", (), {"commit_url": "https://hub/commit"})()

    monkeypatch.setattr(hub, "HfApi", FakeApi)
    monkeypatch.setattr(hub, "is_offline", lambda: False)
    monkeypatch.setattr(hub, "hub_reachable", lambda timeout=3.0: True)
    assert push_to_hub(trained_folder, "me/model") == "https://hub/commit"
    # what huggingface_hub would upload with these arguments, from every file in the folder
    every = [str(p.relative_to(trained_folder)) for p in trained_folder.rglob("*") if p.is_file()]
    uploaded = set(
        filter_repo_objects(
            every,
            allow_patterns=calls.get("allow_patterns"),
            ignore_patterns=calls.get("ignore_patterns"),
        )
    )
    assert uploaded == set(push_files(trained_folder))
    assert {"config.json", "model.safetensors", "curves.png", "README.md"} <= uploaded
    assert {"tokenizer.json", "processor_config.json", "captioner_config.json"} <= uploaded
    assert not any(name.startswith(("eval", "checkpoint-")) for name in uploaded), uploaded
    assert not {"report.html", "training_args.bin", "notes[1].txt"} & uploaded
    assert not any(name.endswith(".tmp") for name in uploaded)


def test_pushed_files_are_a_complete_model(trained_folder, tmp_path):
    from captioner.models.build import load_model

    copy = tmp_path / "pushed"
    copy.mkdir()
    for name in push_files(trained_folder):
        shutil.copy(trained_folder / name, copy / name)
    model, processor = load_model(copy)
    assert model.config.model_type == "git" and processor is not None
