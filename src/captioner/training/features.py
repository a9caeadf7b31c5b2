"""Frozen vision-encoder outputs, computed once per image and reused by every epoch and run.

With the vision tower frozen, its output for an image never changes, so running it every epoch
is wasted work (most of a composed captioner's FLOPs on a CPU). `FeatureCache.fill` runs the
encoder once per image, in batches, and stores `last_hidden_state` in safetensors shards under

    <root>/<fingerprint>/shard-<uuid>.safetensors     keys: sha1 of the image file's bytes

where the fingerprint hashes the encoder's class, config and weights and the image processor's
config: a different encoder, layer cut or image size gets its own folder, and a later run with
the same ones reuses the features. The collator then hands the model `encoder_outputs` instead
of `pixel_values` (VisionEncoderDecoder's forward takes either and computes the same loss).

Shards are written whole to a temporary name and renamed, so a killed run leaves only complete
shards. Reading opens shards lazily in each process (DataLoader workers included) and reads one
tensor per image. Disk use is bounded: `fill` refuses, with a message saying what to change,
when the cache would grow past `max_bytes`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers.utils.logging import tqdm

from captioner.data.images import load_image
from captioner.errors import BadImageError, CaptionerError
from captioner.training.collate import content_hash

log = logging.getLogger(__name__)

SHARD_IMAGES = 512  # images per shard: a killed fill loses at most this many


class FeatureCache:
    """Encoder outputs by image content hash, for one (encoder, image processor) pair."""

    def __init__(
        self, root: str | os.PathLike, encoder: torch.nn.Module, image_processor: Any, *,
        max_bytes: int,
    ) -> None:  # fmt: skip
        self.encoder = encoder
        self.image_processor = image_processor
        self.max_bytes = max_bytes
        self.dir = Path(root) / fingerprint(encoder, image_processor)
        self._where: dict[str, Path] | None = None  # image hash -> shard
        self._open: dict[Path, Any] = {}

    def __getstate__(self) -> dict[str, Any]:
        """Pickled into DataLoader workers without the encoder or open files."""
        state = dict(self.__dict__, encoder=None, _open={})
        return state

    def fill(self, images: Sequence[Any], batch_size: int = 32) -> int:
        """Compute and store the features of every image not cached yet; return how many were
        computed. Images that do not load are left out (the collator skips them, as it skips
        any broken image)."""
        todo: dict[str, Any] = {}
        for src in images:
            digest = content_hash(src)
            if digest is not None and digest not in self.index() and digest not in todo:
                todo[digest] = src
        if not todo:
            return 0
        self._check_room(todo)
        self.dir.mkdir(parents=True, exist_ok=True)
        pending: dict[str, torch.Tensor] = {}
        items = list(todo.items())
        with tqdm(total=len(items), desc="encoder features", unit="img") as bar:
            for start in range(0, len(items), batch_size):
                pending.update(self._encode(items[start : start + batch_size]))
                bar.update(min(batch_size, len(items) - start))
                if len(pending) >= SHARD_IMAGES:
                    self._write(pending)
                    pending = {}
        if pending:
            self._write(pending)
        return len(items)

    def get(self, src: Any) -> torch.Tensor | None:
        """The cached features of one image, or None when it has none."""
        digest = content_hash(src)
        shard = self.index().get(digest) if digest is not None else None
        if shard is None:
            return None
        if shard not in self._open:
            self._open[shard] = safe_open(str(shard), framework="pt")
        return self._open[shard].get_tensor(digest)

    def index(self) -> dict[str, Path]:
        if self._where is None:
            self._where = {}
            for shard in sorted(self.dir.glob("shard-*.safetensors")):
                with safe_open(str(shard), framework="pt") as f:
                    self._where.update(dict.fromkeys(f.keys(), shard))
        return self._where

    def size_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.dir.glob("shard-*.safetensors"))

    @torch.inference_mode()
    def _encode(self, items: list[tuple[str, Any]]) -> dict[str, torch.Tensor]:
        images, digests = [], []
        for digest, src in items:
            try:
                images.append(load_image(src))
                digests.append(digest)
            except BadImageError as err:
                log.warning("no features for %s", err)
        if not images:
            return {}
        pixels = self.image_processor(images=images, return_tensors="pt").pixel_values
        param = next(self.encoder.parameters())
        hidden = self.encoder(pixel_values=pixels.to(param.device, param.dtype)).last_hidden_state
        return {d: h.float().cpu().contiguous() for d, h in zip(digests, hidden, strict=True)}

    def _check_room(self, todo: dict[str, Any]) -> None:
        digest, src = next(iter(todo.items()))
        per_image = next(iter(self._encode([(digest, src)]).values()), None)
        if per_image is None:
            return
        needed = self.size_bytes() + len(todo) * per_image.numel() * per_image.element_size()
        if needed > self.max_bytes:
            raise CaptionerError(
                f"the feature cache in {self.dir} would grow to {needed / 2**30:.1f} GiB, over "
                f"its {self.max_bytes / 2**30:.1f} GiB limit: raise --feature_cache_max_gb, "
                "point --feature_cache at a bigger disk, or pass --feature_cache off"
            )

    def _write(self, tensors: dict[str, torch.Tensor]) -> None:
        # a unique name: processes on several machines may fill one shared cache at once
        shard = self.dir / f"shard-{uuid.uuid4().hex}.safetensors"
        tmp = shard.with_name(f".{shard.name}.{os.getpid()}.tmp")
        save_file(tensors, str(tmp))
        os.replace(tmp, shard)
        self.index().update(dict.fromkeys(tensors, shard))


def fingerprint(encoder: torch.nn.Module, image_processor: Any) -> str:
    """A short hash of what decides an image's features: the encoder's class, config and weights,
    and the image processor's settings."""
    h = hashlib.sha1()
    h.update(type(encoder).__name__.encode())
    config = getattr(encoder, "config", None)
    if config is not None:  # not its path or library version: the same encoder anywhere
        settings = {k: v for k, v in config.to_dict().items() if not k.startswith("_")}
        settings.pop("transformers_version", None)
        h.update(json.dumps(settings, sort_keys=True, default=str).encode())
    for name, tensor in sorted(encoder.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    h.update(json.dumps(image_processor.to_dict(), sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]
