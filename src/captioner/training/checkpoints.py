"""Which of Trainer's `checkpoint-N` folders can be resumed from.

A run killed while saving leaves the newest checkpoint half written: a torn
`trainer_state.json`, a truncated `model.safetensors`. Resuming from it fails deep inside
Trainer with a JSON or safetensors traceback, although the checkpoint before it is fine.
`last_complete_checkpoint` trusts nothing: a checkpoint counts only if its state parses and every
weights file opens, and each newer one that does not is skipped with a warning naming why.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

from safetensors import safe_open

log = logging.getLogger(__name__)

_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "trainer_state.json"


def checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """The `checkpoint-N` folders of `output_dir`, newest (highest N) first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _CHECKPOINT.match(child.name)
        if match and child.is_dir():
            found.append((int(match.group(1)), child))
    return [path for _, path in sorted(found, reverse=True)]


def checkpoint_problem(folder: str | os.PathLike) -> str | None:
    """Why `folder` cannot be resumed from, or None when it can: `trainer_state.json` must
    parse as a JSON object, and every `*.safetensors` file must open (header and size)."""
    path = Path(folder)
    state = path / STATE_FILE
    try:
        if not isinstance(json.loads(state.read_text(encoding="utf-8")), dict):
            return f"{STATE_FILE} is not a JSON object"
    except FileNotFoundError:
        return f"no {STATE_FILE}"
    except (OSError, UnicodeDecodeError, ValueError) as err:
        return f"{STATE_FILE} is unreadable ({type(err).__name__})"
    weights = sorted(path.glob("*.safetensors"))
    if not weights and not any(path.glob("*.bin")):
        return "no weights file"
    for file in weights:
        try:
            with safe_open(str(file), framework="numpy") as f:
                f.keys()
        except Exception as err:  # safetensors raises its own error types for a torn file
            return f"{file.name} does not open ({type(err).__name__}: {_first_line(err)})"
    return None


def last_complete_checkpoint(output_dir: str | os.PathLike) -> str | None:
    """The newest checkpoint in `output_dir` that can be resumed from (as a string, which is
    what `Trainer.train(resume_from_checkpoint=...)` takes), or None if there is none. Every
    newer, incomplete one is logged as a warning."""
    for folder in checkpoints(output_dir):
        problem = checkpoint_problem(folder)
        if problem is None:
            return str(folder)
        log.warning("skipping incomplete checkpoint %s: %s", folder.name, problem)
    return None


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return lines[0][:200] if lines else ""
