"""`captioner caption`: inputs, JSONL/CSV/sidecar outputs, resume after SIGKILL, bad images."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import make_images
from PIL import Image
from typer.testing import CliRunner

from captioner.cli import app
from captioner.errors import CaptionerError
from captioner.jobs.caption import caption_files, expand_inputs

FAST = ["--max_new_tokens", "8", "--no_progress"]


def run_cli(*args: str, input: str | None = None):
    return CliRunner().invoke(app, ["caption", *map(str, args)], input=input)


def rows_of(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def test_expand_inputs_folders_globs_stdin_and_missing_files(tmp_path):
    make_images(tmp_path / "a", 2)
    make_images(tmp_path / "a" / "sub", 1, ext="jpg")
    (tmp_path / "a" / "notes.txt").write_text("not an image")
    found = expand_inputs([str(tmp_path / "a")])
    assert [Path(p).name for p in found] == ["img_000.png", "img_001.png", "img_000.jpg"]
    assert expand_inputs([str(tmp_path / "a" / "*.png"), str(tmp_path / "a")]) == (
        found[:2] + found[2:]  # duplicates dropped, first occurrence kept
    )
    stdin = io.StringIO(f"{found[0]}\n\n# a comment\nhttps://example.com/x.jpg\n")
    assert expand_inputs(["-"], stdin) == [found[0], "https://example.com/x.jpg"]
    assert expand_inputs([str(tmp_path / "missing.png")]) == [str(tmp_path / "missing.png")]
    with pytest.raises(CaptionerError, match="no files match"):
        expand_inputs([str(tmp_path / "nothing" / "*.png")])


def test_sigkill_then_resume_gives_each_image_once_with_the_same_captions(
    chatty_model_dir,
    tmp_path,
):
    images = tmp_path / "images"
    make_images(images, 200)
    # long captions in batches of 2: ~100 generate calls, so the kill lands partway even when
    # this process is starved of CPU while polling
    slow = ["--max_new_tokens", "30", "--no_progress"]
    full = run_cli(chatty_model_dir, images, *slow)  # automatic batch size
    assert full.exit_code == 0, full.output
    expected = {r["image"]: r["caption"] for r in rows_of(full.stdout)}
    assert len(expected) == 200

    out = tmp_path / "out.jsonl"
    cmd = [sys.executable, "-m", "captioner.cli", "caption", str(chatty_model_dir), str(images)]
    cmd += ["--output", str(out), "--batch_size", "2", *slow]
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while not (out.exists() and out.read_bytes().count(b"\n") >= 4):
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() < deadline, "no rows written"
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)  # no chance to clean up: only flushed rows survive
    proc.wait()
    partial = out.read_text().count("\n")
    assert 4 <= partial < 200, "the kill must land partway for this test to mean anything"

    resumed = run_cli(
        chatty_model_dir, images, "--output", out, "--resume", "--batch_size", "2", *slow
    )
    assert resumed.exit_code == 0, resumed.output
    rows = rows_of(out.read_text())
    assert sorted(r["image"] for r in rows) == sorted(expected)  # each image exactly once
    assert {r["image"]: r["caption"] for r in rows} == expected
    assert f"skipped {partial}" in resumed.output


def test_resume_cuts_a_half_written_last_line(chatty_model_dir, tmp_path):
    paths = [str(p) for p in make_images(tmp_path / "images", 4)]
    out = tmp_path / "out.jsonl"
    out.write_text(json.dumps({"image": paths[0], "caption": "done"}) + '\n{"image": "' + paths[1])
    result = run_cli(chatty_model_dir, *paths, "-o", out, "--resume", *FAST)
    assert result.exit_code == 0, result.output
    rows = rows_of(out.read_text())
    assert [r["image"] for r in rows] == paths and rows[0]["caption"] == "done"


def test_output_file_is_not_clobbered_and_csv_works(chatty_model_dir, tmp_path):
    paths = [str(p) for p in make_images(tmp_path / "images", 3)]
    out = tmp_path / "out.csv"
    assert run_cli(chatty_model_dir, *paths, "-o", out, *FAST).exit_code == 0
    text = out.read_text()
    assert text.splitlines()[0] == "image,caption,error" and len(text.splitlines()) == 4
    again = run_cli(chatty_model_dir, *paths, "-o", out, *FAST)
    assert again.exit_code != 0 and "--resume" in str(again.exception or again.output)
    assert out.read_text() == text
    resumed = run_cli(chatty_model_dir, *paths, "-o", out, "--resume", *FAST)
    assert resumed.exit_code == 0 and out.read_text() == text  # nothing left to do


def test_sidecar_writes_one_txt_per_image_and_skip_existing_writes_none(
    chatty_model_dir,
    tmp_path,
):
    images = make_images(tmp_path / "images", 50)
    first = run_cli(chatty_model_dir, tmp_path / "images", "--sidecar", *FAST)
    assert first.exit_code == 0, first.output
    txts = sorted((tmp_path / "images").glob("*.txt"))
    assert [t.stem for t in txts] == [p.stem for p in images]
    assert all(t.read_text().strip() for t in txts)
    assert rows_of(first.stdout) == []  # sidecar mode prints no rows unless --output is given
    for t in txts:
        t.write_text("kept\n")
    second = run_cli(chatty_model_dir, tmp_path / "images", "--sidecar", "--skip_existing", *FAST)
    assert second.exit_code == 0, second.output
    assert "captioned 0, skipped 50" in second.output
    assert all(t.read_text() == "kept\n" for t in txts)
    with pytest.raises(CaptionerError, match="--skip_existing"):  # neither flag: refuse
        caption_files(chatty_model_dir, [str(tmp_path / "images")], sidecar=True)


def test_mixed_folder_captions_good_images_and_reports_bad_ones(
    chatty_model_dir,
    tmp_path,
):
    folder = tmp_path / "mixed"
    good = make_images(folder, 3)
    jpeg = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 20, 20)).save(jpeg, "JPEG")
    (folder / "truncated.jpg").write_bytes(jpeg.getvalue()[:300])
    (folder / "text.png").write_text("this is not a png")
    Image.new("RGB", (1, 1)).save(folder / "one_pixel.png")
    result = run_cli(chatty_model_dir, folder, *FAST)
    assert result.exit_code == 1
    rows = {Path(r["image"]).name: r for r in rows_of(result.stdout)}
    assert len(rows) == 6
    for p in good:
        assert rows[p.name]["caption"] and "error" not in rows[p.name]
    for name in ("truncated.jpg", "text.png", "one_pixel.png"):
        assert rows[name]["error"] and "caption" not in rows[name]
        assert f"{name}:" in result.output  # reported on stderr too
    assert "captioned 3, skipped 0, failed 3" in result.output


def test_stdin_list_and_unfetchable_urls_become_rows(chatty_model_dir, tmp_path):
    path = make_images(tmp_path / "images", 1)[0]
    loopback = "http://127.0.0.1:9/cat.jpg"  # nothing listens there: fails like a missing network
    nowhere = "http://nowhere.invalid/cat.jpg"  # a name that never resolves
    result = run_cli(chatty_model_dir, "-", *FAST, input=f"{path}\n{loopback}\n{nowhere}\n")
    assert result.exit_code == 1
    rows = rows_of(result.stdout)
    assert rows[0]["image"] == str(path) and rows[0]["caption"]
    assert rows[1]["image"] == loopback and "download failed" in rows[1]["error"]
    assert rows[2]["image"] == nowhere and "did not resolve" in rows[2]["error"]


def test_decoding_flags_reach_the_engine(chatty_model_dir, tmp_path, monkeypatch):
    from captioner.engine import Captioner

    seen = {}
    caption_iter = Captioner.caption_iter

    def spy(self, images, decoding=None, **kwargs):
        seen.update(decoding.to_dict())
        return caption_iter(self, images, decoding, **kwargs)

    monkeypatch.setattr(Captioner, "caption_iter", spy)
    path = make_images(tmp_path / "images", 1)[0]
    flags = ["--prompt", "a red", "--num_beams", "3", "--num_return_sequences", "2"]
    flags += ["--bad_words", "white, blue", "--bad_words", "circle", "--repetition_penalty", "1.3"]
    result = run_cli(chatty_model_dir, path, *flags, *FAST)
    assert result.exit_code == 0, result.output
    assert seen["bad_words"] == ["white", "blue", "circle"] and seen["num_beams"] == 3
    assert seen["repetition_penalty"] == 1.3 and seen["max_new_tokens"] == 8
    [row] = rows_of(result.stdout)
    assert len(row["captions"]) == 2 and row["caption"] == row["captions"][0]
    assert all(c.startswith("a red") for c in row["captions"])


def test_unwritable_outputs_are_one_line_errors_or_error_rows(chatty_model_dir, tmp_path):
    paths = make_images(tmp_path / "images", 2)
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    result = run_cli(chatty_model_dir, *map(str, paths), "-o", str(blocker / "out.jsonl"), *FAST)
    assert isinstance(result.exception, CaptionerError)  # main() prints it as one line
    assert "cannot write" in str(result.exception)
    # a sidecar that cannot be written is that image's error, and the run goes on
    (tmp_path / "images" / "img_000.txt").mkdir()  # a folder where the caption file should go
    out = tmp_path / "rows.jsonl"
    result = run_cli(
        chatty_model_dir,
        str(tmp_path / "images"),
        "--sidecar",
        "--overwrite",
        "-o",
        str(out),
        *FAST,
    )
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert result.exit_code == 1
    assert [("error" in r) for r in sorted(rows, key=lambda r: r["image"])] == [True, False]
    assert (tmp_path / "images" / "img_001.txt").is_file()
