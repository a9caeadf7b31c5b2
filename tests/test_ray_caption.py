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

from captioner.errors import CaptionerError  # noqa: E402

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


def test_ray_refuses_the_local_engines_flags_and_repairs_torn_shards(tmp_path, capsys, monkeypatch):
    """Fast: no Ray instance starts (every image is already in the shards)."""
    from captioner import cli
    from captioner.jobs.ray_caption import RayJob, caption_with_ray

    def error_line(*argv: str) -> str:
        monkeypatch.setattr(sys, "argv", ["captioner", "caption", *argv])
        with pytest.raises(SystemExit) as exit_info:
            cli.main()
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.startswith("error:")]
        assert exit_info.value.code == 1 and len(lines) == 1 and "Traceback" not in err, err
        return lines[0]

    ray = ["MODEL", "x.png", "--engine", "ray", "--output", str(tmp_path / "o")]
    for flag in (["--sidecar"], ["--overwrite"], ["--skip_existing"],
                 ["--on_collision", "full_name"], ["--caption_extension", ".caption"]):  # fmt: skip
        assert f"{flag[0]} is for the local engine" in error_line(*ray, *flag)
    assert "--num_workers goes with --engine ray" in error_line(
        "MODEL", "x.png", "--num_workers", "2"
    )
    assert not (tmp_path / "o").exists()

    images = make_images(tmp_path / "images", 2)
    out = tmp_path / "out"
    out.mkdir()
    shard = out / "part-0.jsonl"
    rows = [
        {"image": str(images[0]), "caption": "kept"},
        {"image": str(images[1]), "caption": "too"},
    ]
    shard.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"image": "/half')  # a crash
    job = RayJob("MODEL", [str(tmp_path / "images")], str(out), resume=True)
    summary = caption_with_ray(job)
    assert summary.skipped == 2 and summary.captioned == 0
    assert summary.notes == [f"{shard}: dropped its torn last line (left by a crash)"]
    assert shard_rows(out) == rows  # the torn line is gone, every whole row kept
    with pytest.raises(CaptionerError, match="--retry_errors goes with --resume"):
        caption_with_ray(RayJob("MODEL", [str(images[0])], str(out), retry_errors=True))


@pytest.mark.slow
def test_ray_resume_retries_error_rows_after_a_torn_shard(chatty_model_dir, tmp_path, env):
    folder = tmp_path / "images"
    images = make_images(folder, 3, size=32)
    late = folder / "late.png"
    late.write_bytes(images[0].read_bytes())  # fixed since the earlier run failed on it
    out = tmp_path / "out"
    out.mkdir()
    earlier = [{"image": str(images[0]), "caption": "from the earlier run"},
               {"image": str(late), "error": "cannot identify image file"}]  # fmt: skip
    torn = out / "part-earlier.jsonl"
    torn.write_text("".join(json.dumps(r) + "\n" for r in earlier) + '{"image": "' + str(images[1]))
    cmd = [*CLI, str(chatty_model_dir), str(folder), "--engine", "ray", "--output", str(out),
           "--num_workers", "1", "--max_new_tokens", "4", "--no_progress", "--resume",
           "--retry_errors"]  # fmt: skip
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert f"{torn}: dropped its torn last line" in " ".join(run.stderr.split())
    assert "captioned 3, skipped 1, failed 0" in run.stderr  # img_001, img_002 and late.png
    rows = shard_rows(out)
    by_image = {r["image"]: r for r in rows}
    assert len(rows) == len(by_image) == 4  # each image once: the error row was replaced
    assert by_image[str(images[0])]["caption"] == "from the earlier run"
    assert "caption" in by_image[str(late)] and "error" not in by_image[str(late)]
