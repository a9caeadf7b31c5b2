"""Batches for caption training: one caption per example per epoch, dynamic padding, -100 labels.

The guide pads every caption to 512 tokens and trains on the pads (`labels = input_ids`). Here a
batch is padded to its longest caption and every pad position is -100, so loss and compute cover
caption tokens only. Image positions need nothing: GIT puts the image tokens in front of the text
inside the model, slices them off the logits and shifts by one itself (`GitForCausalLM.forward`);
BLIP's text decoder shifts too. So for both, labels are the input ids with pads masked.
VisionEncoderDecoder builds its decoder inputs by shifting the labels right, so it gets labels
alone (`labels_only=True`). A LLaVA model (found from its `LlavaProcessor`) reads everything as
one sequence: its saved caption prompt with the image tokens (compose.py), then " " + caption +
eos, padded on the right; labels are -100 on the image tokens, the prompt and the pads, so the
loss covers the caption and its eos only (the model shifts them itself).

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

from captioner.compose import LLAVA, is_llava_processor, prompt_ids
from captioner.errors import BadImageError, CaptionerError
from captioner.images import load_image

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


@dataclass
class CaptionCollator:
    """Turns rows `{image, captions}` into a model batch. Set `epoch` before each epoch's loader
    is iterated (training.py does it in a callback) so the drawn captions change across epochs."""

    processor: Any
    seed: int = 0
    epoch: int = 0
    cache_dir: str | os.PathLike | None = None
    labels_only: bool = False
    features: Any = None  # a features.FeatureCache: encoder outputs instead of pixels
    max_length: int | None = None
    image_column: str = "image"
    caption_column: str = "captions"
    family: str | None = None  # "llava": prompt + caption in one sequence; unset: from processor
    # A caption prefix ("a picture of"): every caption starts with it and its tokens carry no
    # loss, so the model learns to continue it (GIT, BLIP, VED; LLaVA has its instruction).
    prompt: str | None = None
    _config_key: str | None = field(default=None, init=False, repr=False)
    _prompt_ids: dict = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        tokenizer = self.processor.tokenizer
        if tokenizer.pad_token_id is None:
            raise CaptionerError(
                f"the tokenizer ({type(tokenizer).__name__}) has no pad token; "
                "set one (e.g. the eos token) before training"
            )
        if self.family is None and is_llava_processor(self.processor):
            self.family = LLAVA
        if self.family == LLAVA and self.features is not None:
            raise CaptionerError("cached encoder features apply to VisionEncoderDecoder only")

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        images, captions = [], []
        for position, row in enumerate(rows):
            index = row.get(INDEX_COLUMN)
            caps = row[self.caption_column]
            if isinstance(caps, str):
                caps = [caps]
            if index is None:  # no index column: a stable stand-in from the captions themselves
                index = zlib.crc32("\n".join(caps).encode()) + position
            images.append(row[self.image_column])
            captions.append(draw_caption(caps, self.seed, self.epoch, int(index)))

        visual, kept = self.encoder_outputs(images) if self.features else self.pixels(images)
        if not kept:
            raise CaptionerError("every image in a batch failed to load (see the warnings above)")
        captions = [captions[i] for i in kept]
        if self.family == LLAVA:
            return {"pixel_values": visual, **self._llava_text(captions, visual.shape[-2:])}
        if self.prompt:
            captions = [f"{self.prompt.strip()} {c}" for c in captions]

        text = self.processor.tokenizer(
            captions,
            padding="longest",
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        labels = text["input_ids"].masked_fill(text["attention_mask"] == 0, -100)
        if self.prompt:  # no loss on the prompt: positions 1..n, after the start token
            labels[:, 1 : 1 + self._prompt_length()] = -100
        inputs = {"encoder_outputs": (visual,)} if self.features else {"pixel_values": visual}
        if self.labels_only:
            return {**inputs, "labels": self._without_start_token(labels)}
        return {
            **inputs,
            "input_ids": text["input_ids"],
            "attention_mask": text["attention_mask"],
            "labels": labels,
        }

    def _llava_text(self, captions: list[str], size) -> dict[str, torch.Tensor]:
        """prompt + " " + caption + eos per row, right-padded; labels on caption and eos only."""
        tokenizer = self.processor.tokenizer
        key = tuple(size)
        if key not in self._prompt_ids:
            self._prompt_ids[key] = prompt_ids(self.processor, None, *key)
        prompt = self._prompt_ids[key]
        # The leading space: a byte-level BPE LM spells a word after "Caption:" with its space.
        words = tokenizer(
            [" " + c.strip() for c in captions],
            add_special_tokens=False,
            truncation=self.max_length is not None,
            max_length=self.max_length,
        ).input_ids
        rows = [[*prompt, *ids, tokenizer.eos_token_id] for ids in words]
        length = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), length), tokenizer.pad_token_id)
        attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
        labels = torch.full((len(rows), length), -100)
        for i, row in enumerate(rows):
            input_ids[i, : len(row)] = torch.tensor(row)
            attention_mask[i, : len(row)] = 1
            labels[i, len(prompt) : len(row)] = input_ids[i, len(prompt) : len(row)]
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}

    def _prompt_length(self) -> int:
        return len(
            self.processor.tokenizer(self.prompt.strip(), add_special_tokens=False).input_ids
        )

    def _without_start_token(self, labels: torch.Tensor) -> torch.Tensor:
        """VisionEncoderDecoder feeds `decoder_start_token_id` itself and shifts the labels right
        after it, so a tokenizer's own start token ([CLS]) would be learned as a first word."""
        start = self.processor.tokenizer.cls_token_id
        if start is None:
            start = self.processor.tokenizer.bos_token_id
        if start is not None and labels.shape[1] > 1 and bool((labels[:, 0] == start).all()):
            return labels[:, 1:]
        return labels

    def encoder_outputs(self, images: list[Any]) -> tuple[torch.Tensor, list[int]]:
        """Cached encoder outputs of the images that have them, and their positions."""
        found = {i: self.features.get(src) for i, src in enumerate(images)}
        kept = [i for i, f in found.items() if f is not None]
        if len(kept) < len(found):
            log.warning("skipping %d image(s) with no cached features", len(found) - len(kept))
        if not kept:
            return torch.empty(0), []
        return torch.stack([found[i] for i in kept]), kept

    def pixels(self, images: list[Any]) -> tuple[torch.Tensor, list[int]]:
        """Pixel values of the images that load, and their positions. A broken image is skipped
        with a warning naming it (data.py drops those up front; this covers files that changed)."""
        found: dict[int, torch.Tensor] = {}
        todo: list[tuple[int, Any, Path | None]] = []
        for i, src in enumerate(images):
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
