"""captioner: fine-tune, evaluate, run and serve image-captioning models with transformers.

The public API (loaded on first use, so that `import captioner` and `captioner --help` stay fast:
the engine and training import torch, which takes seconds):

    Captioner         the batched captioning engine (`Captioner.from_pretrained(dir or Hub id)`)
    DecodingOptions   how captions are decoded (beams, length, sampling, prompt, bad words)
    LoadOptions       how a model is loaded (device, dtype, int8, trust_remote_code)
    load_captions     any dataset source -> DatasetDict{"train", "test"} of {image, captions}
    load_model        (model, processor) for a model folder or Hub id
    train             fine-tune with transformers' Trainer (see captioner.training.trainer)
    evaluate          caption a split and score it (see captioner.evaluation.evaluate)
"""

from __future__ import annotations

import importlib
from importlib.metadata import version as _version
from typing import TYPE_CHECKING, Any

__version__ = _version("captioner")

# name -> module that defines it
_API = {
    "Captioner": "captioner.engine",
    "DecodingOptions": "captioner.decoding",
    "LoadOptions": "captioner.options",
    "load_captions": "captioner.data.sources",
    "load_model": "captioner.models.build",
    "train": "captioner.training.trainer",
    "evaluate": "captioner.evaluation.evaluate",
}
__all__ = [
    "Captioner",
    "DecodingOptions",
    "LoadOptions",
    "evaluate",
    "load_captions",
    "load_model",
    "train",
    "__version__",
]

if TYPE_CHECKING:
    from captioner.data.sources import load_captions
    from captioner.decoding import DecodingOptions
    from captioner.engine import Captioner
    from captioner.evaluation.evaluate import evaluate
    from captioner.models.build import load_model
    from captioner.options import LoadOptions
    from captioner.training.trainer import train


def __getattr__(name: str) -> Any:
    if name not in _API:
        raise AttributeError(f"module 'captioner' has no attribute {name!r}")
    return getattr(importlib.import_module(_API[name]), name)
