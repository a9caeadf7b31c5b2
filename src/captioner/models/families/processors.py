"""Processors without torchvision.

SmolVLM/Idefics3 and the Qwen-VL processors also build a video processor, which imports
torchvision; there is no torchvision for the CPU build of torch captioner pins, and captioning
never needs video. When `AutoProcessor` fails for that reason, the processor is assembled from
its image processor and tokenizer (and the saved chat template and processor settings), which is
all that images + text need."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def load_processor(name: str, **kwargs: Any):
    from transformers import AutoProcessor

    try:
        return AutoProcessor.from_pretrained(name, **kwargs)
    except (ImportError, ValueError, OSError, TypeError) as err:
        if "torchvision" not in str(err) and "Torchvision" not in str(err):
            raise
        log.info("%s: building the processor without its video processor (%s)", name, err)
        return _without_video(name, **kwargs)


def _without_video(name: str, **kwargs: Any):
    import transformers
    from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES

    config = AutoConfig.from_pretrained(name, **kwargs)
    class_name = PROCESSOR_MAPPING_NAMES.get(config.model_type)
    if class_name is None:
        raise ValueError(f"{name}: no processor class for model type {config.model_type}")
    processor_class = getattr(transformers, class_name)
    settings = _saved_settings(name)
    image_processor = AutoImageProcessor.from_pretrained(name, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(name, **kwargs)
    accepted = _init_parameters(processor_class)
    extra = {k: v for k, v in settings.items() if k in accepted}
    if "video_processor" in accepted:
        extra["video_processor"] = None
    return processor_class(image_processor=image_processor, tokenizer=tokenizer, **extra)


def _saved_settings(name: str) -> dict[str, Any]:
    """processor_config.json's settings plus the chat template, from a folder or the Hub."""
    settings: dict[str, Any] = {}
    for filename in ("processor_config.json", "chat_template.json", "chat_template.jinja"):
        path = _file(name, filename)
        if path is None:
            continue
        if filename.endswith(".jinja"):
            settings["chat_template"] = path.read_text()
        else:
            settings.update(json.loads(path.read_text()))
    return settings


def _file(name: str, filename: str) -> Path | None:
    if Path(name).is_dir():
        path = Path(name) / filename
        return path if path.is_file() else None
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(name, filename))
    except Exception:  # noqa: BLE001 - an optional file the repository does not have
        return None


def _init_parameters(cls) -> set[str]:
    import inspect

    return set(inspect.signature(cls.__init__).parameters)
