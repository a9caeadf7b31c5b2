"""The model families captioner trains, captions and serves: one module each, and this registry.

`family_for(config)` answers "which family is this model?" for a loaded config: the family that
lists its `model_type`, else the generic chat family for any other model in transformers'
`AutoModelForImageTextToText` mapping (its processor must have a chat template), else a one-line
error. Nothing outside this package tests `model_type`.

Adding a family: a module here with a `Family` subclass that sets what differs (docs/
architecture.md, "A model family"), a line in `FAMILIES`, and a tiny model in
`tests/tiny_vlms.py`, which `tests/test_families.py` trains, captions, serves and merges.
"""

from __future__ import annotations

from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

from captioner.errors import CaptionerError
from captioner.models.families.base import Family, PixelFamily
from captioner.models.families.blip import BlipFamily
from captioner.models.families.blip2 import Blip2Family
from captioner.models.families.chat import ChatFamily
from captioner.models.families.florence2 import Florence2Family
from captioner.models.families.git import GitFamily
from captioner.models.families.llava import LlavaFamily
from captioner.models.families.paligemma import PaliGemmaFamily
from captioner.models.families.vision_encoder_decoder import VisionEncoderDecoderFamily

__all__ = ["FAMILIES", "Family", "PixelFamily", "family_for", "family_named", "family_of"]

# Families with conventions of their own, then the generic chat family (it owns no model_type:
# it is the fallback for the rest of AutoModelForImageTextToText).
FAMILIES: tuple[Family, ...] = (
    GitFamily(),
    BlipFamily(),
    VisionEncoderDecoderFamily(),
    LlavaFamily(),
    PaliGemmaFamily(),
    Florence2Family(),
    Blip2Family(),
    ChatFamily(),
)
_BY_TYPE = {model_type: f for f in FAMILIES for model_type in f.model_types}
CHAT = FAMILIES[-1]


def family_named(name: str) -> Family:
    for family in FAMILIES:
        if family.name == name:
            return family
    raise CaptionerError(f"unknown family {name!r} (known: {', '.join(f.name for f in FAMILIES)})")


def family_for(config) -> Family:
    """The family of a model config (a `PretrainedConfig`, or a dict read from config.json)."""
    model_type = config.get("model_type") if isinstance(config, dict) else config.model_type
    if model_type in _BY_TYPE:
        return _BY_TYPE[model_type]
    if model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES:
        return CHAT
    raise CaptionerError(
        f"model type '{model_type}' is not supported: captioner takes GIT, BLIP, "
        "VisionEncoderDecoder, LLaVA, PaliGemma, Florence-2, BLIP-2/InstructBLIP and any "
        "AutoModelForImageTextToText model with a chat template (`captioner models` lists them)"
    )


def family_of(model) -> Family:
    """The family of a loaded model (or an ONNX export's stand-in: anything with a config)."""
    return family_for(model.config)
