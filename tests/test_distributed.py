"""Multi-process training on the CPU (gloo) through `accelerate launch`: one process writes, the
evaluation is sharded and gathered, the loss follows a one-process run with the same global
batch, and a killed 2-process run resumes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from captioner.training.checkpoints import last_complete_checkpoint

ROOT = Path(__file__).resolve().parents[1]
# accelerate's own --cpu starts a single process on a machine without GPUs; the DDP config file
# starts two, and captioner switches the Trainer to gloo on CPUs by itself.
ACCELERATE = [str(Path(sys.executable).with_name("accelerate")), "launch", "--config_file",
              str(ROOT / "examples" / "accelerate" / "ddp.yaml"), "--num_processes", "2",
              "--mixed_precision", "no", "-m", "captioner"]  # fmt: skip
ONE = [sys.executable, "-m", "captioner"]
COMMON = ["--max_new_tokens", "8", "--logging_steps", "1", "--test_size", "0.125",
          "--dataloader_num_workers", "0", "--max_eval_samples", "6"]  # fmt: skip


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> Path:
    from captioner.data.scenes import generate_scenes

    return generate_scenes(tmp_path_factory.mktemp("scenes") / "data", n=48, seed=4)


@pytest.fixture
def env(tmp_path) -> dict:
    return {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "OMP_WAIT_POLICY": "PASSIVE",
        "CAPTIONER_CACHE": str(tmp_path / "cache"),
        "TOKENIZERS_PARALLELISM": "false",
    }


def run(cmd: list[str], env: dict, timeout: int = 300) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def losses(out: Path) -> list[float]:
    state = json.loads((out / "trainer_state.json").read_text())
    return [e["loss"] for e in state["log_history"] if "loss" in e]


@pytest.mark.slow
def test_two_processes_write_once_and_match_one_process(scenes, tmp_path, env):
    flags = ["train", "--model", "tiny", "--data", str(scenes), "--max_steps", "6",
             "--eval_strategy", "steps", "--eval_steps", "3", *COMMON]  # fmt: skip
    two, one = tmp_path / "two", tmp_path / "one"
    two_run = run([*ACCELERATE, *flags, "--output_dir", str(two),
                   "--per_device_train_batch_size", "4"], env)  # fmt: skip
    run([*ONE, *flags, "--output_dir", str(one), "--per_device_train_batch_size", "8"], env)

    assert two_run.stderr.count("built GIT") == 1  # one process built the preset
    epochs = [json.loads((o / "trainer_state.json").read_text())["epoch"] for o in (two, one)]
    assert epochs[0] == pytest.approx(epochs[1])  # 2 x 4 really was a global batch of 8
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())
    # the same global batch of 8: the loss curves agree (dropout masks differ per process)
    a, b = losses(two), losses(one)
    assert len(a) == len(b) == 6
    assert all(abs(x - y) / y < 0.1 for x, y in zip(a, b, strict=True)), (a, b)

    # the model loads with plain transformers, in a process that never imports captioner
    plain = ("import sys; from transformers import AutoModelForCausalLM, AutoProcessor; "
             "AutoModelForCausalLM.from_pretrained(sys.argv[1]); "
             "AutoProcessor.from_pretrained(sys.argv[1]); "
             "assert not any(m.startswith('captioner') for m in sys.modules)")  # fmt: skip
    run([sys.executable, "-c", plain, str(two)], env)

    # the gathered eval equals `captioner eval` of the saved model on the same images
    trained = json.loads((two / "eval_results.json").read_text())
    report = tmp_path / "report"
    run([*ONE, "eval", str(two), str(scenes), "--max_eval_samples", "6", "--max_new_tokens", "8",
         "--output_dir", str(report)], env)  # fmt: skip
    evaluated = json.loads((report / "metrics.json").read_text())
    assert evaluated["num_samples"] == trained["eval_num_samples"] == 6
    for key in ("cider", "wer", "exact_match", "bleu_4"):
        assert evaluated[key] == pytest.approx(trained[f"eval_{key}"]), key


@pytest.mark.slow
def test_killed_two_process_run_resumes(scenes, tmp_path, env):
    out = tmp_path / "run"
    flags = ["train", "--model", "tiny", "--data", str(scenes), "--output_dir", str(out),
             "--per_device_train_batch_size", "4", "--eval_strategy", "no", "--save_strategy",
             "steps", "--save_steps", "2", "--save_total_limit", "5", *COMMON]  # fmt: skip
    first = subprocess.Popen([*ACCELERATE, *flags, "--max_steps", "400"], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 240
        while last_complete_checkpoint(out) is None and first.poll() is None:
            assert time.monotonic() < deadline, "no checkpoint written in time"
            time.sleep(0.2)
        time.sleep(0.5)  # let the checkpoint's last file land
        # the launcher starts its workers in sessions of their own: kill every one of them
        for process in [*psutil.Process(first.pid).children(recursive=True), first]:
            try:
                process.kill()
            except psutil.NoSuchProcess:
                pass
    finally:
        first.wait(timeout=30)
    checkpoint = Path(last_complete_checkpoint(out))
    step = json.loads((checkpoint / "trainer_state.json").read_text())["global_step"]
    assert 2 <= step < 400
    second = run([*ACCELERATE, *flags, "--max_steps", str(step + 2), "--resume"], env)
    assert "resuming from" in second.stderr
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == step + 2
