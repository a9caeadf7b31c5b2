"""Captioners composed from a pretrained vision tower and a text decoder, in transformers' own
`VisionEncoderDecoderModel`, so every result loads with plain `from_pretrained`.

A composition is written as a spec: `vision=NAME,text=NAME[,key=value...]` on the command line
(`captioner train --model vision=dinov2-small,text=scratch,vision_layers=6`), or a preset JSON
file in `presets/` with `"family": "vision-encoder-decoder"` (`dinov2-tiny`). The parts:

- `vision`: a part name (`captioner parts list`: converted once from a registry package), a
  local folder or a Hub id of any AutoModel vision tower (DINOv2, ViT, SigLIP/CLIP vision...).
  `vision_layers=N` keeps its first N layers: DINOv2's self-supervised features lose colour in
  the last layers (a linear probe reads colour at 1.00 from layers 2-4, 0.94 at layer 12), and a
  shorter tower is faster. `image_size=N` resizes inputs to N x N pixels.
- `text`: `scratch` (a small BERT decoder with cross-attention and a WordPiece tokenizer trained
  on the training captions: `decoder_*` keys size it), or a folder / Hub id of a decoder that
  takes cross-attention (BERT/MiniLM, GPT-2, ...), loaded with `add_cross_attention=True`.

The vision tower is frozen by default (`--freeze vision`): its outputs are computed once per image
and cached (features.py), which is what makes fine-tuning on a CPU fast.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForCausalLM,
    AutoTokenizer,
    BertConfig,
    BertLMHeadModel,
    VisionEncoderDecoderModel,
    VisionTextDualEncoderProcessor,
)
from transformers.utils import logging as hf_logging

from captioner.errors import CaptionerError
from captioner.parts import get_part, is_part
from captioner.tokenizer import train_wordpiece

log = logging.getLogger(__name__)

SCRATCH = "scratch"
# Backbone bookkeeping that goes stale when layers are dropped (VED's config check then fails).
_BACKBONE_KEYS = ("stage_names", "out_features", "out_indices", "architectures")


@dataclass
class CompositeSpec:
    """How to build a VisionEncoderDecoder captioner (see the module docstring)."""

    vision: str
    text: str = SCRATCH
    vision_layers: int | None = None
    image_size: int | None = None
    decoder_hidden_size: int = 256
    decoder_layers: int = 2
    decoder_heads: int = 4
    max_caption_tokens: int = 32
    tokenizer_vocab_size: int = 1000
    family: str = "vision-encoder-decoder"
    extra: dict[str, Any] = field(default_factory=dict)  # unknown keys: reported, not used

    @classmethod
    def parse(cls, text: str) -> CompositeSpec:
        """`vision=dinov2-small,text=scratch,vision_layers=6` -> a spec; errors name the key."""
        values: dict[str, Any] = {}
        for item in text.split(","):
            key, sep, value = item.partition("=")
            if not sep or not value.strip():
                raise CaptionerError(f"--model {text!r}: expected key=value items, got {item!r}")
            values[key.strip()] = value.strip()
        return cls.from_dict(values, where=f"--model {text!r}")

    @classmethod
    def from_dict(cls, values: dict[str, Any], where: str = "spec") -> CompositeSpec:
        known = {f.name: f for f in fields(cls) if f.name != "extra"}
        unknown = sorted(set(values) - set(known) - {"_comment"})
        if unknown:
            raise CaptionerError(f"{where}: unknown key(s) {', '.join(unknown)}")
        if "vision" not in values:
            raise CaptionerError(f"{where}: needs vision=NAME (a part, folder or Hub id)")
        typed = {}
        for key, value in values.items():
            if key == "_comment":
                continue
            kind = int if known[key].type in ("int", "int | None") else str
            try:
                typed[key] = kind(value)
            except ValueError:
                raise CaptionerError(f"{where}: {key} must be a whole number") from None
        return cls(**typed)


def is_spec(name: str) -> bool:
    """A composition written on the command line (`vision=...,text=...`)."""
    return "vision=" in str(name)


def build_composite(
    spec: CompositeSpec, captions: list[str], out_dir: str | Path, *, seed: int = 0
) -> Path:
    """Build the composite `spec.family` names and save it to `out_dir`."""
    if spec.family == "vision-encoder-decoder":
        return build_vision_encoder_decoder(spec, captions, out_dir, seed=seed)
    raise CaptionerError(f"unknown composite family {spec.family!r} (vision-encoder-decoder)")


def build_vision_encoder_decoder(
    spec: CompositeSpec, captions: list[str], out_dir: str | Path, *, seed: int = 0
) -> Path:
    """Build the composite and save model + processor to `out_dir` (loads with plain
    `VisionEncoderDecoderModel` / `AutoProcessor.from_pretrained`)."""
    vision_dir = _resolve(spec.vision)
    encoder = _vision_tower(vision_dir, spec.vision_layers)
    image_processor = _image_processor(vision_dir, spec.image_size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        decoder, tokenizer = _text_decoder(spec, captions)
    model = VisionEncoderDecoderModel(encoder=encoder, decoder=decoder)
    _set_special_tokens(model, tokenizer, spec.max_caption_tokens)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    # VED has no processor class of its own; this stock one pairs any image processor with any
    # tokenizer, and AutoProcessor loads it back.
    VisionTextDualEncoderProcessor(
        image_processor=image_processor, tokenizer=tokenizer
    ).save_pretrained(out)
    trainable = sum(p.numel() for p in decoder.parameters())
    log.info(
        "built %s + %s: %.1fM vision, %.2fM text parameters -> %s",
        spec.vision,
        spec.text,
        sum(p.numel() for p in encoder.parameters()) / 1e6,
        trainable / 1e6,
        out,
    )
    return out


def vision_tower(model: torch.nn.Module) -> torch.nn.Module | None:
    """The image encoder of a loaded captioner, for freezing and feature caching."""
    for path in ("encoder", "vision_tower", "model.vision_tower", "git.image_encoder"):
        module = model
        for attr in path.split("."):
            module = getattr(module, attr, None)
        if module is not None:
            return module
    return None


def freeze(module: torch.nn.Module) -> int:
    """Stop training `module`; returns how many parameters were frozen."""
    count = 0
    for p in module.parameters():
        p.requires_grad_(False)
        count += p.numel()
    return count


def _resolve(name: str) -> str:
    """A part name becomes its converted folder; a folder or Hub id stays as it is."""
    return str(get_part(name)) if is_part(name) else name


def _quietly(load, *args, **kwargs):
    """Load without transformers' report of the weights it drops (the layers cut off)."""
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        return load(*args, **kwargs)
    except (OSError, ValueError) as err:
        raise CaptionerError(f"cannot load {args[0]}: {err}") from None
    finally:
        hf_logging.set_verbosity(verbosity)


def _vision_tower(name: str, layers: int | None) -> torch.nn.Module:
    config = _quietly(AutoConfig.from_pretrained, name)
    config = getattr(config, "vision_config", config)  # CLIP/SigLIP: the vision half only
    if layers is not None:
        total = config.num_hidden_layers
        if not 1 <= layers <= total:
            raise CaptionerError(f"vision_layers={layers}: {name} has 1 to {total} layers")
        values = {k: v for k, v in config.to_dict().items() if k not in _BACKBONE_KEYS}
        config = type(config)(**{**values, "num_hidden_layers": layers})
    return _quietly(AutoModel.from_pretrained, name, config=config).eval()


def _image_processor(name: str, image_size: int | None):
    processor = _quietly(AutoImageProcessor.from_pretrained, name)
    if image_size is not None:  # square inputs of this size (a resize, then a centre crop)
        processor.size = {"shortest_edge": image_size}
        processor.crop_size = {"height": image_size, "width": image_size}
    return processor


def _text_decoder(spec: CompositeSpec, captions: list[str]):
    """A from-scratch BERT decoder + caption tokenizer, or a pretrained decoder with added
    cross-attention (its cross-attention starts random)."""
    if spec.text != SCRATCH:
        tokenizer = _quietly(AutoTokenizer.from_pretrained, spec.text)
        decoder = _quietly(
            AutoModelForCausalLM.from_pretrained,
            spec.text,
            is_decoder=True,
            add_cross_attention=True,
        )
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        return decoder, tokenizer
    captions = [c for c in captions if c and c.strip()]
    if not captions:
        raise CaptionerError("cannot build a caption tokenizer: no training captions")
    tokenizer = train_wordpiece(
        captions,
        vocab_size=spec.tokenizer_vocab_size,
        model_max_length=spec.max_caption_tokens,
    )
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.decoder_hidden_size,
        num_hidden_layers=spec.decoder_layers,
        num_attention_heads=spec.decoder_heads,
        intermediate_size=4 * spec.decoder_hidden_size,
        max_position_embeddings=spec.max_caption_tokens,
        is_decoder=True,
        add_cross_attention=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.cls_token_id,
        eos_token_id=tokenizer.sep_token_id,
        tie_word_embeddings=True,
    )
    return BertLMHeadModel(config), tokenizer


def _set_special_tokens(model: VisionEncoderDecoderModel, tokenizer, max_tokens: int) -> None:
    """Generation starts at the tokenizer's start token ([CLS], or BOS/EOS for GPT-style ones)
    and stops at its end token ([SEP] or EOS)."""
    start = tokenizer.cls_token_id
    start = tokenizer.bos_token_id if start is None else start
    end = tokenizer.sep_token_id
    end = tokenizer.eos_token_id if end is None else end
    for config in (model.config, model.generation_config):
        config.decoder_start_token_id = start
        config.pad_token_id = tokenizer.pad_token_id
        config.eos_token_id = end
    model.generation_config.bos_token_id = start
    model.generation_config.max_length = None
    model.generation_config.max_new_tokens = max_tokens - 2
