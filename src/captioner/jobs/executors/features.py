"""Feature reuse at captioning time: a model whose frozen vision tower has a filled feature cache
(training/features.py; `captioner train` fills one) captions those images from the cached tower
outputs instead of running the tower again.

The cache is found, never made: its folder is `<root>/<fingerprint>`, where the fingerprint
hashes the loaded model's tower (class, config, weights) and image processor, so a cache of
another tower, layer cut or image size is never used, and nothing is written here. `setting`:

- "auto" (the default): the folder the model was trained with (`--feature_cache DIR` in its
  captioner_config.json), else the standard root (`$CAPTIONER_CACHE/features`, by default
  `~/.cache/captioner/features`), as training's `--feature_cache auto` uses;
- "off": never;
- a folder: that root.

Only a float32 tower qualifies: the cache holds float32 outputs, and a bfloat16 or int8 tower
gives other features than its own pixel path would (and its weights do not hash the same).
Families: VisionEncoderDecoder and LLaVA (those with `feature_cache`); the others run pixels.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from transformers import PreTrainedModel

from captioner.models.build import training_options
from captioner.paths import cache_dir

if TYPE_CHECKING:
    from captioner.engine import Captioner

log = logging.getLogger(__name__)


def reuse_features(captioner: Captioner, model: Any = None, setting: str = "auto") -> Any:
    """Point `captioner` at the feature cache of its tower when one exists and holds features
    (`model`: the folder it was loaded from, for its training's cache folder). Returns the
    `FeatureCache` in use, or None (then captioning runs pixels, as always)."""
    family = getattr(captioner, "family", None)  # None: a stand-in (tests mock the loading)
    if setting == "off" or family is None or not family.feature_cache:
        return None
    roots = [r for r in _roots(model, setting) if _has_folders(r)]
    if not roots:  # checked first: the fingerprint hashes every tower weight
        return None
    get_base = getattr(captioner.model, "get_base_model", None)  # peft: the model inside
    base = get_base() if callable(get_base) else captioner.model
    if not isinstance(base, PreTrainedModel):  # an ONNX export runs its own vision part
        return None
    encoder = family.feature_encoder(captioner.model)
    image_processor = getattr(captioner.processor, "image_processor", None)
    if encoder is None or image_processor is None:
        return None
    if any(p.dtype != torch.float32 for p in encoder.parameters()):
        log.info("feature cache: not used with a %s tower (it holds float32 outputs)",
                 next(encoder.parameters()).dtype)  # fmt: skip
        return None
    from captioner.training.features import FeatureCache, fingerprint  # jobs sit above training

    try:  # once for every root: it hashes every weight of the tower
        tower = fingerprint(encoder, image_processor)
    except (TypeError, RuntimeError) as err:  # a tower whose weights do not hash (quantized)
        log.info("feature cache: not used (%s)", err)
        return None
    for root in roots:
        cache = FeatureCache(root, encoder, image_processor, max_bytes=0,  # never filled here
                             known_fingerprint=tower)  # fmt: skip
        if cache.dir.is_dir() and cache.index():
            log.info("feature cache %s: reusing the tower outputs of %d images", cache.dir,
                     len(cache.index()))  # fmt: skip
            captioner.features = cache.get
            return cache
    return None


def _roots(model: Any, setting: str) -> list[Path]:
    if setting != "auto":
        return [Path(setting)]
    roots = []
    if isinstance(model, (str, os.PathLike)):
        trained = training_options(model).get("feature_cache")
        if isinstance(trained, str) and trained not in ("auto", "off"):
            roots.append(Path(trained))
    return [*roots, cache_dir("features")]


def _has_folders(root: Path) -> bool:
    try:
        return root.is_dir() and any(p.is_dir() for p in root.iterdir())
    except OSError:
        return False
