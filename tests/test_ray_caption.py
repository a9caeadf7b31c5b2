"""`caption --engine ray`: the same job as the local engine on a pool of Ray actors.

One test per caption flag (generated from `CaptionOptions`: a flag without a scenario here fails
`test_every_caption_flag_has_a_ray_scenario`) runs the same job on both executors, each in its
own copy of the same files, and asks for the same rows, sidecars, summary and output files.
One Ray instance serves the whole module; a killed driver is resumed through the CLI."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

pytest.importorskip("ray")

from conftest import make_images  # noqa: E402

from captioner.decoding import DecodingOptions  # noqa: E402
from captioner.errors import CaptionerError  # noqa: E402
from captioner.jobs import caption as caption_job  # noqa: E402
from captioner.jobs.caption import RAY_ONLY, CaptionOptions, caption_files  # noqa: E402

CLI = [sys.executable, "-m", "captioner", "caption"]
SHORT = DecodingOptions(max_new_tokens=4)


def shard_rows(out: Path) -> list[dict]:
    return [json.loads(line) for shard in sorted(out.glob("part-*.jsonl"))
            for line in shard.read_text().splitlines() if line.strip()]  # fmt: skip


# ---- fast: no Ray instance starts ----


def test_local_refuses_rays_flags_and_ray_repairs_torn_shards_like_a_file(tmp_path, capsys,
                                                                         monkeypatch):  # fmt: skip
    from captioner import cli

    for flag in (["--num_workers", "2"], ["--ray_address", "auto"], ["--gpus_per_worker", "1"]):
        monkeypatch.setattr(sys, "argv", ["captioner", "caption", "MODEL", "x.png", *flag])
        with pytest.raises(SystemExit) as exit_info:
            cli.main()
        err = capsys.readouterr().err
        assert exit_info.value.code == 1 and "Traceback" not in err
        assert [line for line in err.splitlines() if line.startswith("error:")] == [
            f"error: {flag[0]} goes with --engine ray"
        ]

    images = make_images(tmp_path / "images", 2)
    out = tmp_path / "out"
    out.mkdir()
    shard = out / "part-0.jsonl"
    rows = [{"image": str(im), "caption": f"kept {i}"} for i, im in enumerate(images)]
    shard.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"image": "/half')  # a crash
    summary = caption_files("MODEL", [str(tmp_path / "images")], output=out, resume=True,
                            engine="ray")  # fmt: skip
    assert summary.skipped == 2 and summary.captioned == 0  # all done: Ray never started
    assert summary.notes == [f"{shard}: dropped its torn last line (left by a crash)"]
    assert shard_rows(out) == rows  # the torn line is gone, every whole row kept
    with pytest.raises(CaptionerError, match="already holds caption rows: pass --resume"):
        caption_files("MODEL", [str(images[0])], output=out, engine="ray")


# ---- the CLI on Ray: a killed driver resumes ----


@pytest.fixture
def env() -> dict:
    environ = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return {**environ, "HF_HUB_OFFLINE": "1", "OMP_WAIT_POLICY": "PASSIVE", "RAY_TMPDIR": "/tmp"}


@pytest.fixture
def stop_ray():
    yield
    ray = Path(sys.executable).with_name("ray")
    subprocess.run([str(ray), "stop", "--force"], capture_output=True, timeout=60)


@pytest.mark.slow
def test_killed_driver_resumes_without_duplicates_or_gaps(chatty_model_dir, tmp_path, env,
                                                          stop_ray):  # fmt: skip
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


# ---- one scenario per caption flag, on both executors ----


class Run:
    """Runs jobs in one folder (`root`, a copy of the same files for each engine) and reports
    what they did with every path made relative to it, so two engines' reports compare."""

    def __init__(self, root: Path, engine: str, model: Path) -> None:
        self.root, self.engine, self.model = root, engine, model

    def __call__(self, *inputs: str, decoding: DecodingOptions = SHORT, **options) -> dict:
        stdout = io.StringIO()
        paths = [str(self.root / i) if not i.startswith("@") else "@" + str(self.root / i[1:])
                 for i in inputs]  # fmt: skip
        if isinstance(options.get("output"), str):
            options["output"] = str(self.root / options["output"])
        summary = caption_files(self.model, paths, engine=self.engine, decoding=decoding,
                                stdout=stdout, **options)  # fmt: skip
        return self.relative({
            "captioned": summary.captioned, "skipped": summary.skipped,
            "failed": sorted(summary.failed), "notes": summary.notes,
            "stdout": sorted(stdout.getvalue().splitlines()),
        })  # fmt: skip

    def files(self, pattern: str = "**/*") -> dict:
        """Every file under the root but the images, with its text (shards: their rows)."""
        found = {}
        for path in sorted(self.root.glob(pattern)):
            image = path.suffix in (".png", ".jpg")
            if path.is_file() and not image and not path.name.startswith("part-"):
                found[str(path.relative_to(self.root))] = sorted(path.read_text().splitlines())
        for folder in {p.parent for p in self.root.glob("**/part-*.jsonl")}:
            shards = sorted(folder.glob("part-*.jsonl"))
            found[f"{folder.relative_to(self.root)}/shards"] = [len(shard_rows(folder)),
                                                                 len(shards)]  # fmt: skip
            found[f"{folder.relative_to(self.root)}/rows"] = sorted(
                json.dumps(r, sort_keys=True) for r in shard_rows(folder)
            )
        return self.relative(found)

    def relative(self, value):
        return json.loads(json.dumps(value).replace(str(self.root) + "/", ""))


def setup_files(root: Path) -> None:
    make_images(root / "images", 3, size=16)
    (root / "images" / "broken.png").write_bytes(b"not a png")


def _output(run: Run) -> dict:
    return {"jsonl": run("images", output="rows.jsonl"), "csv": run("images", output="rows.csv"),
            "folder": run("images", output="shards"), "files": run.files()}  # fmt: skip


def _sidecar(run: Run) -> dict:
    return {"run": run("images", sidecar=True), "files": run.files()}


def _caption_extension(run: Run) -> dict:
    return {"run": run("images", sidecar=True, caption_extension=".caption"), "files": run.files()}


def _skip_existing(run: Run) -> dict:
    (run.root / "images" / "img_000.txt").write_text("kept\n")
    return {"run": run("images", sidecar=True, skip_existing=True), "files": run.files()}


def _overwrite(run: Run) -> dict:
    (run.root / "images" / "img_000.txt").write_text("old\n")
    (run.root / "rows.jsonl").write_text('{"image": "old", "caption": "old"}\n')
    result = run("images", sidecar=True, overwrite=True, output="rows.jsonl")
    files = run.files()
    return {"run": result, "files": files, "old gone": "old" not in json.dumps(files)}


def _resume(run: Run) -> dict:
    first = {"image": str(run.root / "images" / "img_000.png"), "caption": "from before"}
    (run.root / "rows.jsonl").write_text(json.dumps(first) + '\n{"image": "/to')  # torn
    return {"run": run("images", output="rows.jsonl", resume=True), "files": run.files()}


def _retry_errors(run: Run) -> dict:
    rows = [{"image": str(run.root / "images" / "img_001.png"), "error": "was uploading"}]
    (run.root / "shards").mkdir()
    (run.root / "shards" / "part-0.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    again = run("images", output="shards", resume=True, retry_errors=True)
    return {"run": again, "files": run.files()}


def _on_collision(run: Run) -> dict:
    shutil.copy(run.root / "images" / "img_000.png", run.root / "images" / "img_000.jpg")
    shared = run("images", sidecar=True, output="clash.jsonl")  # error rows for the pair
    named = run("images", sidecar=True, skip_existing=True, on_collision="full_name")
    return {"error": shared, "full_name": named, "files": run.files()}


def _batch_size(run: Run) -> dict:
    return {"run": run("images", output="shards", batch_size=2), "files": run.files()}


def _seed(run: Run) -> dict:
    sampling = DecodingOptions(max_new_tokens=6, do_sample=True, temperature=1.5)
    first, second = (run("images", decoding=sampling, seed=7) for _ in range(2))
    other = run("images", decoding=sampling, seed=8)
    return {"repeatable": first == second, "seed matters": other != first}


def _progress(run: Run, monkeypatch: pytest.MonkeyPatch) -> dict:
    bars: list[list[int]] = []
    real = caption_job.progress_bar

    def recording(total, label, *, enabled=True):
        bars.append([total])
        inner = real(total, label, enabled=enabled)

        class Bar:
            def __enter__(self):
                advance = inner.__enter__()
                return lambda n: (bars[-1].append(n), advance and advance(n))

            def __exit__(self, *exc):
                return inner.__exit__(*exc)

        return Bar()

    monkeypatch.setattr(caption_job, "progress_bar", recording)
    run("images", progress=True)
    return {"total and done": [(b[0], sum(b[1:])) for b in bars]}


def _inputs(run: Run) -> dict:
    """Not a flag: the inputs every engine expands the same (`@list.txt`, manifests, stdin)."""
    listed = [run.root / "images" / "img_000.png", "# a comment", run.root / "images/img_002.png"]
    (run.root / "list.txt").write_text("".join(f"{line}\n" for line in listed))  # as in a shell
    (run.root / "manifest.jsonl").write_text('{"image": "images/img_001.png"}\n')
    return {"run": run("@list.txt", "manifest.jsonl")}


def _feature_cache(run: Run) -> dict:
    """Accepted the same by both (the reuse itself, with a tower that has a cache, is tested in
    test_feature_reuse.py): an empty cache folder and `off` give the same rows."""
    (run.root / "cache").mkdir()
    return {
        "folder": run("images", output="a.jsonl", feature_cache=str(run.root / "cache")),
        "off": run("images", output="b.jsonl", feature_cache="off"),
        "files": run.files(),
    }


SCENARIOS: dict[str, Callable] = {
    "output": _output, "sidecar": _sidecar, "caption_extension": _caption_extension,
    "skip_existing": _skip_existing, "overwrite": _overwrite, "resume": _resume,
    "retry_errors": _retry_errors, "on_collision": _on_collision, "batch_size": _batch_size,
    "seed": _seed, "progress": _progress, "inputs": _inputs, "feature_cache": _feature_cache,
}  # fmt: skip


# What each scenario's report holds when its flag worked (so equal reports are not both empty).
EVIDENCE = {
    "output": "rows.csv", "sidecar": "images/img_000.txt", "caption_extension": "img_000.caption",
    "skip_existing": "kept", "overwrite": '"old gone": true', "resume": "from before",
    "retry_errors": '"captioned": 3', "on_collision": "img_000.jpg.txt",
    "batch_size": '"shards/shards": [4, 2]', "seed": '"repeatable": true', "progress": "[4, 4]",
    "inputs": '"captioned": 3', "feature_cache": "b.jsonl",
}  # fmt: skip


def test_every_caption_flag_has_a_ray_scenario():
    flags = {f.name for f in dataclasses.fields(CaptionOptions)}
    assert flags - {"engine", *RAY_ONLY} <= set(SCENARIOS), "a caption flag has no Ray scenario"


@pytest.fixture(scope="module")
def ray_instance():
    """One local Ray instance for the module's jobs (the executor uses it, never stops it)."""
    import ray

    os.environ.setdefault("RAY_TMPDIR", "/tmp")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.mark.slow
@pytest.mark.parametrize("flag", SCENARIOS)
def test_each_caption_flag_is_the_same_on_ray(flag, ray_instance, chatty_model_dir, tmp_path,
                                              monkeypatch):  # fmt: skip
    scenario = SCENARIOS[flag]
    reports = {}
    for engine in ("local", "ray"):
        root = tmp_path / engine
        setup_files(root)
        run = Run(root, engine, chatty_model_dir)
        args = (run, monkeypatch) if flag == "progress" else (run,)
        reports[engine] = scenario(*args)
    assert reports["ray"] == reports["local"]
    assert EVIDENCE[flag] in json.dumps(reports["local"]), "the flag did nothing to compare"
    if flag == "seed":
        assert reports["ray"] == {"repeatable": True, "seed matters": True}
    if flag == "progress":
        assert reports["ray"] == {"total and done": [(4, 4)]}


@pytest.mark.slow
def test_ray_actors_are_as_many_as_asked(ray_instance, chatty_model_dir, tmp_path):
    setup_files(tmp_path)
    summary = caption_files(chatty_model_dir, [str(tmp_path / "images")], engine="ray",
                            num_workers=1, batch_size=1, stdout=io.StringIO())  # fmt: skip
    assert summary.captioned == 3 and len(summary.failed) == 1
