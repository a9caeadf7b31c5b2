"""Everything that talks to the Hugging Face Hub beyond `from_pretrained` / `load_dataset`.

`hub_reachable` is asked before a Hub call, so that a machine without network fails in about a
second with one clear line, instead of after minutes of retries (measured here: ~145 s for
`from_pretrained`, ~25 s for `load_dataset`). `push_to_hub` uploads a finished model folder:
the files an allow-list names (`PUSH_ALLOW`) at its top level and nothing else, so an eval
folder, a report with its images inlined, checkpoints or stray files never leave the machine.
"""

from __future__ import annotations

import fnmatch
import glob
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

from huggingface_hub import HfApi, constants

from captioner.errors import CaptionerError

# What is uploaded: files at the top of the model folder with these names. The model (config,
# weights, generation config), its processor (tokenizer, image processor), captioner's config,
# the card, the training curves and the metrics files Trainer writes (numbers only). Folders
# are never uploaded.
PUSH_ALLOW = (
    "config.json",
    "generation_config.json",
    "adapter_config.json",  # a LoRA run: the adapter (adapter_model.safetensors) and its base
    "captioner_config.json",
    "*.safetensors",
    "*.safetensors.index.json",
    "preprocessor_config.json",
    "processor_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "spiece.model",
    "tokenizer.model",
    "chat_template.jinja",
    "README.md",
    "curves.png",
    "train_results.json",
    "eval_results.json",
    "all_results.json",
)


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


def push_files(model_dir: str | os.PathLike) -> list[str]:
    """The files `push_to_hub` uploads from `model_dir`: its top-level files named by
    `PUSH_ALLOW`, sorted."""
    root = Path(model_dir)
    return sorted(
        f.name
        for f in root.iterdir()
        if f.is_file() and any(fnmatch.fnmatchcase(f.name, pattern) for pattern in PUSH_ALLOW)
    )


def push_to_hub(model_dir: str | os.PathLike, repo_id: str, *, private: bool = False) -> str:
    """Upload a trained model directory (model, processor, card, curves, metrics; never
    checkpoints, eval folders or reports) to the Hub as `repo_id` — the guide's
    `trainer.push_to_hub()` for a finished run. Returns the URL.
    """
    path = Path(model_dir)
    if not (path / "config.json").is_file():
        raise CaptionerError(f"{path}: not a model directory (no config.json)")
    files = push_files(path)
    if is_offline() or not hub_reachable():
        raise CaptionerError(f"cannot push to {repo_id}: the Hugging Face Hub is unreachable")
    api = HfApi()
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        # exact names (escaped: a name is matched as a pattern): nothing the list does not name
        allow = [glob.escape(name) for name in files]
        info = api.upload_folder(folder_path=path, repo_id=repo_id, allow_patterns=allow)
    except Exception as err:  # auth, permissions, network: one line, not a traceback
        raise CaptionerError(f"push to {repo_id} failed: {type(err).__name__}: {err}") from None
    return str(getattr(info, "commit_url", "") or f"https://huggingface.co/{repo_id}")
