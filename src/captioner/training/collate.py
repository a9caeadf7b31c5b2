"""Batches for caption training: one caption per example per epoch, dynamic padding, -100 labels.

The guide pads every caption to 512 tokens and trains on the pads (`labels = input_ids`). Here a
batch is padded to its longest caption and every pad, prompt, image and template position is
-100, so the loss covers the caption and its end token only. How images + prompt + caption
become a batch is the family's (models/families/): a pixel family (GIT, BLIP,
VisionEncoderDecoder, LLaVA compositions) gets its pixels from here, possibly cached, and makes
the text part; a processor family (chat models, PaliGemma, Florence-2, BLIP-2) gets the decoded
images and runs its processor on images and text together.

Images are decoded here, in DataLoader workers, i.e. once per epoch at most; with `cache_dir` the
preprocessed pixel values are kept on disk, keyed by the image file's hash and the image
processor's config, and later epochs (and later runs) skip decoding altogether.
"""

from __future__ import annotations

import hashlib
import logging
import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from captioner.data.images import load_image
from captioner.errors import BadImageError, CaptionerError
from captioner.models.families import Family
from captioner.training.augment import draw_view

log = logging.getLogger(__name__)

INDEX_COLUMN = "__index__"


def draw_caption(captions: list[str], seed: int, epoch: int, index: int) -> str:
    """One caption of an example, fixed by (seed, epoch, index): reproducible, new each epoch."""
    if len(captions) == 1:
        return captions[0]
    rng = np.random.default_rng([seed, epoch, index])
    return captions[int(rng.integers(len(captions)))]


def content_hash(src: Any) -> str | None:
    """sha1 of the encoded image file, or None where there is no file (an in-memory PIL image).
    The key of the pixel and feature caches: the same file anywhere is the same image."""
    if isinstance(src, dict):
        src = src.get("bytes") or src.get("path")
    if isinstance(src, (str, Path)):
        try:
            src = Path(src).read_bytes()
        except OSError:
            return None  # load_image reports the missing file with its name
    if isinstance(src, (bytes, bytearray)):
        return hashlib.sha1(src).hexdigest()
    return None


def drop_patches(features: torch.Tensor, rate: float, keys: list[tuple[int, ...]]) -> torch.Tensor:
    """Each example's first token (DINOv2/ViT's CLS) and a random `1 - rate` of the rest, in
    their order; the subset is fixed by its key (seed, epoch, index). Patch dropout (FLIP,
    open_clip's `patch_dropout`) on cached features: a decoder that cannot count on any one patch
    reads the whole drawing, not the details of one artist's style. Positions are already in
    the features, so a subset needs no position ids."""
    n_patches = features.shape[1] - 1
    keep = max(1, round(n_patches * (1.0 - rate)))
    rows = []
    for feature, key in zip(features, keys, strict=True):
        rng = np.random.default_rng([*key, 0x9A7C])
        picked = np.sort(rng.choice(n_patches, keep, replace=False)) + 1
        rows.append(feature[torch.from_numpy(np.concatenate([[0], picked]))])
    return torch.stack(rows)


@dataclass
class CaptionCollator:
    """Turns rows `{image, captions}` into a model batch. Set `epoch` before each epoch's loader
    is iterated (training.py does it in a callback) so the drawn captions change across epochs."""

    processor: Any
    family: Family
    seed: int = 0
    epoch: int = 0
    cache_dir: str | os.PathLike | None = None  # pixel families: preprocessed pixels on disk
    features: Any = None  # a features.FeatureCache: encoder outputs instead of pixels
    max_length: int | None = None
    image_column: str = "image"
    caption_column: str = "captions"
    # The caption prompt. For GIT, BLIP and VED a caption prefix ("a picture of"): every caption
    # starts with it and its tokens carry no loss, so the model learns to continue it; for the
    # other families an instruction (chat models) or task ("caption en", "<CAPTION>").
    prompt: str | None = None
    # Caption-preserving augmentation (augment.py), on training batches only (`training`; the
    # trainer clears it for evaluation). With `features`, one of the `views` cached augmented
    # copies per image and epoch (0: the image itself); without, a fresh view each epoch.
    augmenter: Any = None
    views: int = 0
    # With `features`: the share of patch tokens each training example leaves out (drop_patches)
    patch_dropout: float = 0.0
    training: bool = True
    _config_key: str | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        tokenizer = self.processor.tokenizer
        if tokenizer.pad_token_id is None:
            raise CaptionerError(
                f"the tokenizer ({type(tokenizer).__name__}) has no pad token; "
                "set one (e.g. the eos token) before training"
            )
        if self.features is not None and not self.family.feature_cache:
            raise CaptionerError(f"cached encoder features do not apply to {self.family.name}")
        if self.patch_dropout and (self.features is None or not self.family.patch_dropout):
            raise CaptionerError(
                f"--patch_dropout thins cached encoder outputs: it needs a frozen vision tower "
                f"and a family whose decoder reads any number of them ({self.family.name} with "
                f"{'no ' if self.features is None else ''}feature cache)"
            )
        if not self.family.fixed_pixels and (self.features is not None or self.cache_dir):
            raise CaptionerError(f"{self.family.name} batches are made from images, not caches")

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        images, captions, views, indices = [], [], [], []
        for position, row in enumerate(rows):
            index = row.get(INDEX_COLUMN)
            caps = row[self.caption_column]
            if isinstance(caps, str):
                caps = [caps]
            if index is None:  # no index column: a stable stand-in from the captions themselves
                index = zlib.crc32("\n".join(caps).encode()) + position
            images.append(row[self.image_column])
            captions.append(draw_caption(caps, self.seed, self.epoch, int(index)))
            views.append(self._view(list(caps), int(index)))
            indices.append(int(index))

        if not self.family.fixed_pixels:
            return self._from_images(images, captions)
        if self.features:
            visual, kept = self.encoder_outputs(images, views)
        else:
            visual, kept = self.pixels(images, views)
        if not kept:
            raise CaptionerError("every image in a batch failed to load (see the warnings above)")
        captions = [captions[i] for i in kept]
        if self.features and self.patch_dropout and self.training:
            keys = [(self.seed, self.epoch, indices[i]) for i in kept]
            visual = drop_patches(visual, self.patch_dropout, keys)
        # the pixels' (height, width): LLaVA's prompt ids depend on it (features have no pixels)
        image_size = self.features.pixel_size if self.features else tuple(visual.shape[-2:])
        text = self.family.text_inputs(
            self.processor, captions, self.prompt, self.max_length, image_size
        )
        if self.features:
            return {**self.family.cached_inputs(visual), **text}
        return {"pixel_values": visual, **text}

    def _from_images(self, images: list[Any], captions: list[str]) -> dict[str, Any]:
        """A processor family's batch: decoded images + captions through the family."""
        loaded, kept = [], []
        for i, src in enumerate(images):
            try:
                loaded.append(load_image(src))
                kept.append(i)
            except BadImageError as err:
                log.warning("skipping image %s", err)
        if not kept:
            raise CaptionerError("every image in a batch failed to load (see the warnings above)")
        return self.family.training_inputs(
            self.processor, loaded, [captions[i] for i in kept], self.prompt, self.max_length
        )

    def _view(self, captions: list[str], index: int) -> tuple[int, list[str]] | None:
        """(view number, the image's captions) to augment with, or None for the image as is."""
        if self.augmenter is None or not self.training:
            return None
        if self.features is not None:
            view = draw_view(self.views, self.seed, self.epoch, index)
            return (view, captions) if view else None
        return (1 + self.epoch * 1_000_003 + index, captions)  # a new view every epoch

    def encoder_outputs(
        self, images: list[Any], views: list[tuple[int, list[str]] | None] | None = None
    ) -> tuple[torch.Tensor, list[int]]:
        """Cached encoder outputs (of the drawn augmented view where `views` says) of the images
        that have them, and their positions."""
        views = views or [None] * len(images)
        found = {
            i: self.features.get(src, view[0], self.augmenter, view[1])
            if view
            else self.features.get(src)
            for i, (src, view) in enumerate(zip(images, views, strict=True))
        }
        kept = [i for i, f in found.items() if f is not None]
        if len(kept) < len(found):
            log.warning("skipping %d image(s) with no cached features", len(found) - len(kept))
        if not kept:
            return torch.empty(0), []
        return torch.stack([found[i] for i in kept]), kept

    def pixels(
        self, images: list[Any], views: list[tuple[int, list[str]] | None] | None = None
    ) -> tuple[torch.Tensor, list[int]]:
        """Pixel values of the images that load (augmented where `views` says), and their
        positions. A broken image is skipped with a warning naming it (data.py drops those up
        front; this covers files that changed)."""
        found: dict[int, torch.Tensor] = {}
        todo: list[tuple[int, Any, Path | None]] = []
        views = views or [None] * len(images)
        for i, (src, view) in enumerate(zip(images, views, strict=True)):
            if view is not None:  # an augmented view: made fresh, never cached
                try:
                    image = load_image(src)
                except BadImageError as err:
                    log.warning("skipping image %s", err)
                    continue
                digest = content_hash(src) or f"{i:012x}"
                todo.append((i, self.augmenter.apply(image, digest, view[0], view[1]), None))
                continue
            path = self._cache_path(src)
            if path is not None and path.exists():
                try:
                    found[i] = torch.from_numpy(np.load(path))
                    continue
                except (OSError, ValueError):
                    pass  # a torn write from a killed run: recompute and overwrite it
            try:
                todo.append((i, load_image(src), path))
            except BadImageError as err:
                log.warning("skipping image %s", err)
        if todo:
            out = self.processor.image_processor(
                images=[image for _, image, _ in todo], return_tensors="pt"
            )
            for (i, _, path), values in zip(todo, out["pixel_values"], strict=True):
                found[i] = values
                if path is not None:
                    _save_atomic(path, values.numpy())
        kept = sorted(found)
        if not kept:
            return torch.empty(0), []
        return torch.stack([found[i] for i in kept]), kept

    def _cache_path(self, src: Any) -> Path | None:
        if self.cache_dir is None:
            return None
        digest = content_hash(src)
        if digest is None:
            return None
        if self._config_key is None:
            config = self.processor.image_processor.to_json_string()
            self._config_key = hashlib.sha1(config.encode()).hexdigest()[:16]
        return Path(self.cache_dir) / self._config_key / f"{digest}.npy"


def _save_atomic(path: Path, array: np.ndarray) -> None:
    """Write then rename, so parallel workers and killed runs never leave a half file behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npy")
    np.save(tmp, array)
    os.replace(tmp, path)
