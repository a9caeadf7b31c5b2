"""The layout's rules, checked: import-linter contracts, a fast `--help` that never imports torch,
and one clear line (never a traceback) for a bad value on every command."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


def test_import_contracts_hold():
    """The library never imports the apps; modules import only lower layers (no cycles)."""
    lint = Path(sys.executable).with_name("lint-imports")
    run = subprocess.run([str(lint)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout[-3000:]
    assert "0 broken" in run.stdout


def test_help_is_fast_and_never_imports_torch():
    code = (
        "import sys, time\n"
        "t = time.perf_counter()\n"
        "sys.argv = ['captioner', '--help']\n"
        "from captioner.cli import main\n"
        "try:\n"
        "    main()\n"
        "except SystemExit:\n"
        "    pass\n"
        "print('SECONDS', time.perf_counter() - t)\n"
        "print('HEAVY', sorted(m for m in ('torch', 'transformers', 'datasets') "
        "if m in sys.modules))\n"
    )
    start = time.perf_counter()
    run = subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, text=True)
    wall = time.perf_counter() - start
    assert run.returncode == 0, run.stderr
    assert "HEAVY []" in run.stdout  # none of the heavy libraries was imported
    assert "train" in run.stdout and "caption" in run.stdout
    print(f"captioner --help: {wall:.2f} s wall (interpreter start included)")


def test_the_public_api_is_declared_and_lazy():
    code = (
        "import sys, captioner\n"
        "assert 'torch' not in sys.modules\n"
        "assert set(captioner.__all__) >= {'Captioner', 'load_captions', 'load_model', 'train',"
        " 'evaluate', 'DecodingOptions'}\n"
        "from captioner import Captioner, evaluate, load_captions, load_model, train\n"
        "assert Captioner.__module__ == 'captioner.engine' and callable(train)\n"
    )
    run = subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr


# One bad value per command: each must end in one `error:` line, exit non-zero, no traceback.
BAD_VALUES = [
    (["caption", "MODEL", "x.png", "--num_beams", "0"], "--num_beams must be >= 1"),
    (["caption", "MODEL", "x.png", "--temperature", "0.5"], "only apply with --do_sample"),
    (
        ["caption", "MODEL", "x.png", "--max_new_tokens", "lots"],
        "Invalid value for '--max_new_tokens'",
    ),
    (["eval", "MODEL", "DATA", "--top_p", "2", "--do_sample"], "--top_p must be > 0"),
    (["eval", "MODEL", "DATA", "--on_bad_image", "maybe"], "--on_bad_image must be"),
    (["serve", "MODEL", "--max_batch_size", "0"], "--max_batch_size must be >= 1, got 0"),
    (["serve", "MODEL", "--api_key", ""], "--api_key must not be empty"),
    (
        [
            "train",
            "--model",
            "tiny",
            "--data",
            "DATA",
            "--output_dir",
            "OUT",
            "--learning_rate",
            "fast",
        ],
        "invalid float value: 'fast'",
    ),  # fmt: skip
    (
        ["train", "--model", "tiny", "--data", "DATA", "--output_dir", "OUT", "--num_beams", "0"],
        "--num_beams must be >= 1",
    ),  # fmt: skip
    (["train", "--model", "tiny"], "missing required option(s): --data, --output_dir"),
    (["data", "check", "DATA", "--max_pixels", "-"], "Invalid value for '--max_pixels'"),
    (["data", "scenes", "OUT", "--difficulty", "impossible"], "difficulty"),
    (["show", "DATA", "--split", "nope"], "split 'nope' is empty"),
    (["push", "MODEL", "--hub_model_id", "me/x"], "not a model directory"),
    (["demo", "--num_scenes", "many"], "Invalid value for '--num_scenes'"),
]


@pytest.mark.parametrize(
    ("argv", "message"), BAD_VALUES, ids=[" ".join(a[:2]) for a, _ in BAD_VALUES]
)
def test_a_bad_value_is_one_clear_line(argv, message, tmp_path, tiny_model_dir):
    from captioner.data.scenes import generate_scenes

    data = generate_scenes(tmp_path / "scenes", n=6)
    names = {"MODEL": str(tiny_model_dir), "DATA": str(data), "OUT": str(tmp_path / "out")}
    if argv[0] == "push":
        names["MODEL"] = str(tmp_path)
    argv = [names.get(a, a) for a in argv]
    run = subprocess.run(
        [sys.executable, "-m", "captioner", *argv],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert run.returncode != 0
    assert "Traceback" not in run.stderr
    errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, run.stderr[-2000:]
    assert message in errors[0], errors[0]
