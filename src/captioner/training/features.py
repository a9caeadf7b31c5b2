"""Frozen vision-encoder outputs, computed once per image and reused by every epoch and run.

With the vision tower frozen, its output for an image never changes, so running it every epoch
is wasted work (most of a composed captioner's FLOPs on a CPU). `FeatureCache.fill` runs the
encoder once per image, in batches, and stores its `last_hidden_state` in safetensors shards under

    <root>/<fingerprint>/shard-<uuid>.safetensors     keys: sha1 of the image file's bytes

where the fingerprint hashes the encoder's class, config, weights and `cache_settings` (LLaVA's
feature layer and CLS strategy) and the image processor's config: a different encoder, layer cut
or image size gets its own folder, and a later run with the same ones reuses the features. The
collator then hands the model the features instead of `pixel_values`, through the family's
`cached_inputs` (VisionEncoderDecoder's `encoder_outputs`; LLaVA's projector input).

With `--augment_views K` (augment.py) `fill` also stores K augmented views of each training
image, keyed `<sha1>~v<k>~<ops hash>` (the ops its captions allow), once; the collator draws one
of the K + 1 per image and epoch.

A shard is trusted only if it proves it belongs here:

- each shard records the fingerprint in its safetensors metadata; one that does not open (a
  truncated copy), lacks the fingerprint (an older captioner) or carries another (copied from
  another model's folder) is dropped with a warning naming it, and its images are computed
  again. A shard all of whose images an earlier shard already holds is dropped as a duplicate.
- `fill` holds an exclusive lock on `<folder>/.lock` (fcntl, as `captioner parts get` does)
  while it decides what is missing and writes it: two runs filling one cache at once compute
  each image once (the second finds the first's shards), so no duplicate shards count against
  the size limit. Dropping bad shards and stale temporary files happens under the same lock.
- shards are written whole to a temporary name and renamed, so a killed run leaves only complete
  shards; they get the umask's usual file mode (safetensors writes 0600, which would hide a
  shared cache from other users).

Reading opens shards lazily in each process (DataLoader workers included) and reads one tensor
per image; a shard that disappeared or broke since is reported and its images skipped. Disk use
is bounded: `fill` refuses, with a message saying what to change, when the cache would grow past
`max_bytes` (counting only the shards in use).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from transformers.utils.logging import tqdm

from captioner.data.images import load_image
from captioner.errors import BadImageError, CaptionerError
from captioner.models.parts import file_lock
from captioner.training.augment import Augmenter
from captioner.training.collate import content_hash

log = logging.getLogger(__name__)

SHARD_IMAGES = 512  # images per shard: a killed fill loses at most this many
FORMAT = "captioner-features/1"  # the shards' `format` metadata
LOCK_NAME = ".lock"


class FeatureCache:
    """Encoder outputs by image content hash, for one (encoder, image processor) pair."""

    def __init__(
        self, root: str | os.PathLike, encoder: torch.nn.Module, image_processor: Any, *,
        max_bytes: int, known_fingerprint: str | None = None,
    ) -> None:  # fmt: skip
        """`known_fingerprint`: `fingerprint(encoder, image_processor)` when the caller already
        computed it (it hashes every weight of the tower)."""
        self.encoder = encoder
        self.image_processor = image_processor
        self.max_bytes = max_bytes
        self.fingerprint = known_fingerprint or fingerprint(encoder, image_processor)
        self.dir = Path(root) / self.fingerprint
        self._where: dict[str, Path] | None = None  # image hash -> shard
        self._rejected: dict[Path, str] = {}  # shard -> why it is not used
        self._open: dict[Path, Any] = {}
        self._pixel_size: tuple[int, int] | None = None

    def __getstate__(self) -> dict[str, Any]:
        """Pickled into DataLoader workers without the encoder or open files."""
        return dict(self.__dict__, encoder=None, _open={})

    @property
    def pixel_size(self) -> tuple[int, int]:
        """(height, width) of the pixels the image processor makes, as a batch of pixels would
        have them (the size LLaVA's prompt ids are computed for)."""
        if self._pixel_size is None:
            blank = Image.new("RGB", (64, 64))
            pixels = self.image_processor(images=[blank], return_tensors="pt").pixel_values
            self._pixel_size = (int(pixels.shape[-2]), int(pixels.shape[-1]))
        return self._pixel_size

    def fill(
        self, images: Sequence[Any], batch_size: int = 32, *, views: int = 0,
        augmenter: Augmenter | None = None, captions: Sequence[Sequence[str]] | None = None,
    ) -> int:  # fmt: skip
        """Compute and store the features of every image not cached yet; return how many were
        computed. Images that do not load are left out (the collator skips them, as it skips
        any broken image). Safe to run from several processes at once: each image is computed
        by one of them.

        With `views` > 0 (and an `augmenter`), also `views` augmented copies of each image, keyed
        by `augmenter.view_key` (the ops its `captions` allow decide them; augment.py)."""
        digests: dict[str, tuple[Any, Any]] = {}  # cache key -> (image, transform or None)
        for i, src in enumerate(images):
            digest = content_hash(src)
            if digest is None:
                continue
            digests.setdefault(digest, (src, None))
            if views and augmenter is not None:
                caps = list(captions[i]) if captions is not None else []
                for view in range(1, views + 1):
                    key = augmenter.view_key(digest, view, caps)
                    transform = partial(augmenter.apply, digest=digest, view=view, captions=caps)
                    digests.setdefault(key, (src, transform))
        if not digests:
            return 0
        self.dir.mkdir(parents=True, exist_ok=True)
        with self._locked():
            self._where = None  # what other processes wrote while we waited for the lock
            self._clean()
            todo = {d: src for d, src in digests.items() if d not in self.index()}
            if not todo:
                return 0
            self._check_room(todo)
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

    def get(
        self, src: Any, view: int = 0, augmenter: Augmenter | None = None,
        captions: Sequence[str] = (),
    ) -> torch.Tensor | None:  # fmt: skip
        """The cached features of one image (or of its augmented view `view`, which `fill` made
        with the same augmenter and captions), or None when it has none."""
        digest = content_hash(src)
        if digest is not None and view and augmenter is not None:
            digest = augmenter.view_key(digest, view, list(captions))
        shard = self.index().get(digest) if digest is not None else None
        if shard is None:
            return None
        try:
            if shard not in self._open:
                self._open[shard] = safe_open(str(shard), framework="pt")
            return self._open[shard].get_tensor(digest)
        except (OSError, SafetensorError) as err:  # removed or broken since it was indexed
            log.warning("feature cache: cannot read %s (%s); skipping its images", shard, err)
            self._forget(shard, str(err))
            return None

    def index(self) -> dict[str, Path]:
        """Image hash -> the shard that holds it, over the shards that prove they belong here
        (the first shard wins where two hold an image)."""
        if self._where is None:
            self._where, self._rejected = {}, {}
            for shard in sorted(self.dir.glob("shard-*.safetensors")):
                problem = self._check(shard)
                if problem is None:
                    continue
                self._rejected[shard] = problem
                if problem != "duplicate":
                    log.warning("feature cache: not using %s: %s; its images are computed "
                                "again", shard, problem)  # fmt: skip
        return self._where

    def size_bytes(self) -> int:
        """Bytes of the shards in use (not the rejected ones, which `fill` removes)."""
        return sum(_size(p) for p in set(self.index().values()))

    # ---- internals ----

    def _check(self, shard: Path) -> str | None:
        """Index `shard` if it belongs here; otherwise say why not."""
        try:
            with safe_open(str(shard), framework="pt") as f:
                meta = f.metadata() or {}
                keys = list(f.keys())
        except (OSError, SafetensorError) as err:
            return f"unreadable ({err})"
        found = meta.get("fingerprint")
        if found is None:
            return "no fingerprint in its metadata (written by an older captioner)"
        if found != self.fingerprint:
            return f"written for encoder {found}, not {self.fingerprint} (copied from elsewhere?)"
        new = [k for k in keys if k not in self._where]
        if keys and not new:
            return "duplicate"
        self._where.update(dict.fromkeys(new, shard))
        return None

    def _clean(self) -> None:
        """Remove rejected shards and temporary files of killed fills (under the lock: no
        writer is running)."""
        self.index()
        for shard, problem in self._rejected.items():
            log.info("feature cache: removing %s (%s)", shard.name, problem)
            shard.unlink(missing_ok=True)
        for tmp in self.dir.glob(".shard-*.tmp"):
            tmp.unlink(missing_ok=True)
        self._rejected = {}

    def _forget(self, shard: Path, why: str) -> None:
        self._open.pop(shard, None)
        if self._where is not None:
            self._where = {k: s for k, s in self._where.items() if s != shard}
        self._rejected[shard] = why

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """One fill at a time per cache folder."""
        lock = self.dir / LOCK_NAME
        lock.touch()
        try:
            _share_file(lock)
        except OSError:  # another user's lock file keeps its mode
            pass
        with file_lock(lock):
            yield

    @torch.inference_mode()
    def _encode(self, items: list[tuple[str, tuple[Any, Any]]]) -> dict[str, torch.Tensor]:
        images, digests = [], []
        for digest, (src, transform) in items:
            try:
                image = load_image(src)
                images.append(transform(image) if transform is not None else image)
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
        digest, item = next(iter(todo.items()))
        per_image = next(iter(self._encode([(digest, item)]).values()), None)
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
        # a unique name: processes on several machines may share one cache folder
        shard = self.dir / f"shard-{uuid.uuid4().hex}.safetensors"
        tmp = shard.with_name(f".{shard.name}.{os.getpid()}.tmp")
        save_file(tensors, str(tmp), metadata={"format": FORMAT, "fingerprint": self.fingerprint})
        _share_file(tmp)
        os.replace(tmp, shard)
        self.index().update(dict.fromkeys(tensors, shard))


def fingerprint(encoder: torch.nn.Module, image_processor: Any) -> str:
    """A short hash of what decides an image's features: the encoder's class, config, weights
    and `cache_settings` (what it selects from the tower, if it says), and the image processor's
    settings."""
    h = hashlib.sha1()
    h.update(type(encoder).__name__.encode())
    config = getattr(encoder, "config", None)
    if config is not None:  # not its path or library version: the same encoder anywhere
        settings = {k: v for k, v in config.to_dict().items() if not k.startswith("_")}
        settings.pop("transformers_version", None)
        h.update(json.dumps(settings, sort_keys=True, default=str).encode())
    extra = getattr(encoder, "cache_settings", None)
    if extra:
        h.update(json.dumps(extra, sort_keys=True, default=str).encode())
    for name, tensor in sorted(encoder.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    h.update(json.dumps(image_processor.to_dict(), sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _share_file(path: Path) -> None:
    """The umask's usual file mode (as models/parts.py gives converted parts)."""
    umask = os.umask(0)
    os.umask(umask)
    path.chmod(0o666 & ~umask)
