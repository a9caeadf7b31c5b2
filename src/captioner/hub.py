"""Everything that talks to the Hugging Face Hub beyond `from_pretrained` / `load_dataset`.

`hub_reachable` is asked before a Hub call, so that a machine without network fails in about a
second with one clear line, instead of after minutes of retries (measured here: ~145 s for
`from_pretrained`, ~25 s for `load_dataset`). `push_to_hub` uploads a finished model folder.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from urllib.parse import urlparse

from huggingface_hub import HfApi, constants

from captioner.errors import CaptionerError

# What a model folder holds that is not the model: Trainer's checkpoints, a preset's build
# folder, temporary files.
PUSH_IGNORE = ["checkpoint-*", "checkpoint-*/**", "preset/**", "*.tmp"]


def is_offline() -> bool:
    """The user said so (`HF_HUB_OFFLINE=1`): Hub calls fail at once by themselves."""
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def hub_reachable(timeout: float = 3.0) -> bool:
    """A quick TCP check of the Hub endpoint."""
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True  # a proxy may get there when we cannot: let the real call decide
    host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def push_to_hub(model_dir: str | os.PathLike, repo_id: str, *, private: bool = False) -> str:
    """Upload a trained model directory (model, processor, metrics, curves; no checkpoints) to
    the Hub as `repo_id` — the guide's `trainer.push_to_hub()` for a finished run. Returns the URL.
    """
    path = Path(model_dir)
    if not (path / "config.json").is_file():
        raise CaptionerError(f"{path}: not a model directory (no config.json)")
    if is_offline() or not hub_reachable():
        raise CaptionerError(f"cannot push to {repo_id}: the Hugging Face Hub is unreachable")
    api = HfApi()
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        info = api.upload_folder(folder_path=path, repo_id=repo_id, ignore_patterns=PUSH_IGNORE)
    except Exception as err:  # auth, permissions, network: one line, not a traceback
        raise CaptionerError(f"push to {repo_id} failed: {type(err).__name__}: {err}") from None
    return str(getattr(info, "commit_url", "") or f"https://huggingface.co/{repo_id}")
