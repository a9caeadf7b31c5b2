"""Corpus captioning on Ray Data (a local instance): every image exactly once, the same captions
as the single-process engine, and a killed driver resumed with no duplicate and no gap."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("ray")

from conftest import make_images  # noqa: E402

CLI = [sys.executable, "-m", "captioner", "caption"]


@pytest.fixture
def env(tmp_path) -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_WAIT_POLICY": "PASSIVE",
            "RAY_TMPDIR": "/tmp"}  # fmt: skip


def shard_rows(out: Path) -> list[dict]:
    return [json.loads(line) for shard in sorted(out.glob("part-*.jsonl"))
            for line in shard.read_text().splitlines() if line.strip()]  # fmt: skip


@pytest.fixture(autouse=True)
def _stop_ray():
    yield
    ray = Path(sys.executable).with_name("ray")
    subprocess.run([str(ray), "stop", "--force"], capture_output=True, timeout=60)


@pytest.mark.slow
def test_ray_captions_every_image_once_like_the_local_engine(chatty_model_dir, tmp_path, env):
    folder = tmp_path / "images"
    make_images(folder, 200, size=32)
    (folder / "broken.png").write_bytes(b"not a png")
    out = tmp_path / "out"
    flags = ["--max_new_tokens", "6", "--no_progress", "--batch_size", "25"]
    ray_run = subprocess.run([*CLI, str(chatty_model_dir), str(folder), "--engine", "ray",
                              "--output", str(out), "--num_workers", "2", *flags],
                             env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert ray_run.returncode == 1, ray_run.stderr[-3000:]  # the broken image failed
    rows = shard_rows(out)
    assert len(rows) == 201 and len({r["image"] for r in rows}) == 201
    broken = [r for r in rows if r["image"].endswith("broken.png")]
    assert "error" in broken[0] and "caption" not in broken[0]

    local = subprocess.run([*CLI, str(chatty_model_dir), str(folder), *flags], env=env,
                           capture_output=True, text=True, timeout=300)  # fmt: skip
    expected = {r["image"]: r.get("caption") for r in map(json.loads, local.stdout.splitlines())}
    assert {r["image"]: r.get("caption") for r in rows} == expected


@pytest.mark.slow
def test_killed_driver_resumes_without_duplicates_or_gaps(chatty_model_dir, tmp_path, env):
    folder = tmp_path / "images"
    images = make_images(folder, 200, size=32)
    out = tmp_path / "out"
    cmd = [*CLI, str(chatty_model_dir), str(folder), "--engine", "ray", "--output", str(out),
           "--num_workers", "1", "--batch_size", "10", "--max_new_tokens", "6",
           "--no_progress"]  # fmt: skip
    first = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 240
        while len(list(out.glob("part-*.jsonl"))) < 2 and first.poll() is None:
            assert time.monotonic() < deadline, "no shard written in time"
            time.sleep(0.1)
        os.killpg(first.pid, signal.SIGKILL)
    finally:
        first.wait(timeout=30)
    partial = shard_rows(out)
    assert 0 < len(partial) < 200  # killed midway
    second = subprocess.run([*cmd, "--resume"], env=env, capture_output=True, text=True,
                            timeout=300)  # fmt: skip
    assert second.returncode == 0, second.stderr[-3000:]
    rows = shard_rows(out)
    names = [r["image"] for r in rows]
    assert len(names) == len(set(names)) == 200  # no duplicate, nothing missing
    assert set(names) == {str(p) for p in images}
    assert f"skipped {len(partial)}" in second.stderr
