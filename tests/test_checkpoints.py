"""checkpoints.py: resume only from a checkpoint whose state parses and whose weights open."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from captioner.training.checkpoints import checkpoint_problem, checkpoints, last_complete_checkpoint


def make_checkpoint(root: Path, step: int) -> Path:
    folder = root / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    save_file({"w": np.arange(4096, dtype=np.float32)}, str(folder / "model.safetensors"))
    return folder


def test_newest_complete_checkpoint_wins_and_order_is_numeric(tmp_path):
    for step in (5, 10, 100):
        make_checkpoint(tmp_path, step)
    (tmp_path / "checkpoint-x").mkdir()  # not Trainer's
    assert [p.name for p in checkpoints(tmp_path)] == [
        "checkpoint-100",
        "checkpoint-10",
        "checkpoint-5",
    ]
    assert last_complete_checkpoint(tmp_path) == str(tmp_path / "checkpoint-100")


def test_torn_state_or_truncated_weights_fall_back_with_a_warning(tmp_path, caplog):
    make_checkpoint(tmp_path, 10)
    torn = make_checkpoint(tmp_path, 20)
    (torn / "trainer_state.json").write_text('{"global_step": 2')  # killed mid-write
    cut = make_checkpoint(tmp_path, 30)
    weights = cut / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with caplog.at_level(logging.WARNING, logger="captioner.training.checkpoints"):
        assert last_complete_checkpoint(tmp_path) == str(tmp_path / "checkpoint-10")
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert "checkpoint-30" in warned and "model.safetensors does not open" in warned
    assert "checkpoint-20" in warned and "trainer_state.json is unreadable" in warned


def test_other_incomplete_shapes(tmp_path):
    empty = tmp_path / "checkpoint-1"
    empty.mkdir()
    assert checkpoint_problem(empty) == "no trainer_state.json"
    listed = make_checkpoint(tmp_path, 2)
    (listed / "trainer_state.json").write_text("[]")
    assert checkpoint_problem(listed) == "trainer_state.json is not a JSON object"
    bare = make_checkpoint(tmp_path, 3)
    (bare / "model.safetensors").unlink()
    assert checkpoint_problem(bare) == "no weights file"
    sharded = make_checkpoint(tmp_path, 4)
    (sharded / "model-00002-of-00002.safetensors").write_bytes(b"")  # the second shard is empty
    assert "model-00002-of-00002.safetensors does not open" in checkpoint_problem(sharded)
    assert last_complete_checkpoint(tmp_path) is None
    assert last_complete_checkpoint(tmp_path / "missing") is None
