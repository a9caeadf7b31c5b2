"""Load and build captioning models through transformers' own classes.

A Hub id (`microsoft/git-base`) and a local directory written by `save_pretrained` go through the
same `from_pretrained` call; a from-scratch preset (`tiny`, `small`) is just such a directory,
built by `build_preset`. Families differ only in which transformers class loads them.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from importlib import resources
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import AutoConfig, AutoProcessor, GitConfig, GitForCausalLM, GitProcessor

from captioner.compose import CompositeSpec, build_composite, is_spec
from captioner.errors import CaptionerError
from captioner.hub import hub_reachable, is_offline
from captioner.lora import attach, base_model_path, is_adapter_dir
from captioner.tokenizer import train_wordpiece

log = logging.getLogger(__name__)

# Presets are small JSON files in presets/, found by scanning the folder: `tiny` and `small`
# (from-scratch GIT), `dinov2-tiny` (a pretrained DINOv2 + a small decoder trained from scratch).
PRESETS = tuple(
    sorted(
        f.name.removesuffix(".json")
        for f in resources.files("captioner.presets").iterdir()
        if f.name.endswith(".json")
    )
)
# Written by training beside the model: the options it ran with (its split, above all, so that
# evaluation scores the held-out images and not training ones).
CONFIG_NAME = "captioner_config.json"


def is_preset(name: str | os.PathLike) -> bool:
    """A preset name (`tiny`, `dinov2-tiny`, ...) rather than a model folder or Hub id."""
    return str(name) in PRESETS


def needs_build(name: str | os.PathLike) -> bool:
    """A model that training builds from its training captions: a preset or a composition
    (`vision=...,text=...`), rather than a folder or Hub id that loads as it is."""
    return is_preset(name) or is_spec(str(name))


def training_options(model_dir: str | os.PathLike) -> dict[str, Any]:
    """The options a captioner-trained model was trained with ({} for any other model)."""
    path = Path(model_dir) / CONFIG_NAME
    return json.loads(path.read_text()) if path.is_file() else {}


# config.model_type -> the transformers class that generates captions for it.
FAMILY_CLASSES = {
    "git": "AutoModelForCausalLM",
    "blip": "BlipForConditionalGeneration",
    "vision-encoder-decoder": "VisionEncoderDecoderModel",
    "llava": "LlavaForConditionalGeneration",
}


def model_family(config) -> str:
    """The family key of a loaded `PretrainedConfig`, or a clear error for unsupported ones."""
    if config.model_type not in FAMILY_CLASSES:
        supported = ", ".join(FAMILY_CLASSES)
        raise CaptionerError(
            f"model type '{config.model_type}' is not supported (supported: {supported})"
        )
    return config.model_type


def _load_error(name_or_path: str, err: Exception) -> CaptionerError:
    path = Path(name_or_path)
    if path.exists():
        if not (path / "config.json").exists():
            return CaptionerError(f"{name_or_path}: not a model directory (no config.json)")
        return CaptionerError(f"{name_or_path}: could not load model: {err}")
    if name_or_path in PRESETS:
        return CaptionerError(
            f"'{name_or_path}' is a from-scratch preset: build it with build_preset() "
            "(`captioner train --model tiny` does this for you)"
        )
    return CaptionerError(
        f"could not load '{name_or_path}': not a local directory, and the Hugging Face Hub "
        f"did not provide it (offline, or no such repository). ({type(err).__name__})"
    )


def load_model(name_or_path: str | Path, *, trust_remote_code: bool = False, merge: bool = True):
    """Return `(model, processor)` for a Hub id, a `save_pretrained` directory, or a LoRA adapter
    folder (its base model with the adapter folded in; `merge=False` keeps the peft wrapper).

    safetensors only; remote code only when the user asks for it.
    """
    name = str(name_or_path)
    if is_adapter_dir(name):
        base, _ = load_model(base_model_path(name), trust_remote_code=trust_remote_code)
        processor = AutoProcessor.from_pretrained(name, trust_remote_code=trust_remote_code)
        return attach(base, name, merge=merge), processor
    if not Path(name).exists() and not is_offline() and not hub_reachable():
        raise _load_error(name, ConnectionError("the Hub is unreachable"))
    try:
        config = AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise _load_error(name, err) from None
    model_cls = getattr(transformers, FAMILY_CLASSES[model_family(config)])
    try:
        model = model_cls.from_pretrained(
            name, use_safetensors=True, trust_remote_code=trust_remote_code
        )
        processor = AutoProcessor.from_pretrained(name, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise _load_error(name, err) from None
    return model, processor


def merge_adapter(adapter_dir: str | Path, out_dir: str | Path) -> Path:
    """Fold a LoRA adapter into its base model and save a plain model folder (with the
    processor) that loads without peft or captioner."""
    if not is_adapter_dir(adapter_dir):
        raise CaptionerError(f"{adapter_dir}: not a LoRA adapter folder (no adapter_config.json)")
    model, processor = load_model(adapter_dir)
    out = Path(out_dir)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def preset_config(name: str) -> dict:
    """The JSON preset `name` (`tiny`, `small`) or a path to a JSON file of the same shape."""
    if Path(name).suffix == ".json" and Path(name).is_file():
        return json.loads(Path(name).read_text())
    if name not in PRESETS:
        raise CaptionerError(f"unknown preset '{name}' (choose from {', '.join(PRESETS)})")
    return json.loads(resources.files("captioner.presets").joinpath(f"{name}.json").read_text())


def build_preset(name: str, captions: Iterable[str], out_dir: str | Path, *, seed: int = 0) -> Path:
    """Build preset or composition `name` with a tokenizer trained on `captions`.

    Saves model, tokenizer and processor to `out_dir` with `save_pretrained`, so the directory
    loads exactly like a Hub model (plain transformers, no captioner needed). `seed` fixes the
    random initialisation of whatever is not pretrained.
    """
    captions = [c for c in captions if c and c.strip()]
    if is_spec(name):
        return build_composite(CompositeSpec.parse(name), captions, out_dir, seed=seed)
    spec = preset_config(name)
    if spec.get("family", "git") != "git":
        values = {k: v for k, v in spec.items() if k != "training_defaults"}
        return build_composite(
            CompositeSpec.from_dict(values, where=name), captions, out_dir, seed=seed
        )
    if not captions:
        raise CaptionerError("cannot build a preset tokenizer: no training captions")
    tokenizer = train_wordpiece(
        captions,
        vocab_size=spec.get("tokenizer_vocab_size", 1000),
        model_max_length=spec["max_position_embeddings"],
    )
    return build_git(spec, tokenizer, out_dir, seed=seed)


def build_git(spec: dict, tokenizer, out_dir: str | Path, *, seed: int = 0) -> Path:
    """Save a randomly initialised GIT shaped by a preset `spec`, with `tokenizer`'s vocabulary
    and special ids, plus its `GitProcessor`, to `out_dir`. Any BERT-style tokenizer works: a
    caption-trained one (presets) or git-base's real 30,522-word vocabulary (tests, benchmarks).
    `seed` fixes the initial weights (a local generator: the caller's global RNG is untouched)."""
    # Imported here: without torchvision, importing it logs a fallback warning that commands which
    # never build a model (`captioner show`) should not print.
    from transformers import CLIPImageProcessor

    size = spec["image_size"]
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size}
    )
    config = GitConfig(
        vision_config=spec["vision_config"],
        vocab_size=len(tokenizer),
        hidden_size=spec["hidden_size"],
        intermediate_size=spec["intermediate_size"],
        num_hidden_layers=spec["num_hidden_layers"],
        num_attention_heads=spec["num_attention_heads"],
        max_position_embeddings=spec["max_position_embeddings"],
        bos_token_id=tokenizer.cls_token_id,
        eos_token_id=tokenizer.sep_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GitForCausalLM(config)
    model.generation_config.bos_token_id = tokenizer.cls_token_id
    model.generation_config.eos_token_id = tokenizer.sep_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    GitProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(out)
    n_params = sum(p.numel() for p in model.parameters())
    log.info("built GIT: %.2fM parameters, vocab %d -> %s", n_params / 1e6, len(tokenizer), out)
    return out
