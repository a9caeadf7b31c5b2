"""Where captioner keeps what it caches on disk: one root for parts, features, pixels and
thumbnails, `$CAPTIONER_CACHE` (a leading `~` means home) or `~/.cache/captioner`."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir(kind: str) -> Path:
    """The cache folder for `kind` ("parts", "features", "pixels", "thumbs")."""
    base = os.environ.get("CAPTIONER_CACHE")
    root = Path(base).expanduser() if base else Path.home() / ".cache" / "captioner"
    return root / kind
