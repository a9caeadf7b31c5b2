"""Processors without torchvision.

SmolVLM/Idefics3 and the Qwen-VL processors take a video processor, and building one imports
torchvision, which has no build for the CPU torch captioner pins (and captioning never needs
video). Where `AutoProcessor` fails for that reason, the same processor class is built
image-only from the saved parts: its image processor (the PIL one), its tokenizer, its saved
settings (`image_seq_len`, ...) and chat template. `ProcessorMixin` insists that every
sub-processor in `__init__`'s signature is given, so `image_only` makes a same-named subclass
whose signature has no `video_processor`; saving it still records the real class name, so the
folder loads with plain `AutoProcessor` wherever torchvision exists."""

from __future__ import annotations

import inspect
import json
import logging
from pathlib import Path
from typing import Any

import transformers
from huggingface_hub import hf_hub_download
from huggingface_hub.errors import EntryNotFoundError
from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer, ProcessorMixin
from transformers.utils import is_torchvision_available

from captioner.errors import CaptionerError

log = logging.getLogger(__name__)

# Keys of processor_config.json that are not the processor's own settings.
_NOT_SETTINGS = ("processor_class", "auto_map", "image_processor", "video_processor")


def load_processor(name: str, **kwargs: Any):
    """`AutoProcessor.from_pretrained(name)`, or the image-only build where video needs
    torchvision and torchvision is missing."""
    try:
        return AutoProcessor.from_pretrained(name, **kwargs)
    except (ImportError, OSError, AttributeError, TypeError) as err:
        if is_torchvision_available():
            raise
        failure: Exception = err
        if _wants_video(name):
            log.info("%s: building the processor without its video processor (%s)", name, err)
            try:
                return _image_only_processor(name, **kwargs)
            except (ImportError, OSError, AttributeError, TypeError, ValueError) as inner:
                failure = inner
        if isinstance(failure, ImportError) or "torchvision" in str(failure).lower():
            first = str(failure).strip().splitlines()[0] if str(failure).strip() else ""
            raise CaptionerError(
                f"{name}: its processor needs torchvision, which is not installed (there is no "
                f"build of it for this CPU torch): {first}"
            ) from None
        raise failure from None


def image_only(processor_class: type) -> type:
    """`processor_class` without its video processor, under the same name. SmolVLM's
    `apply_chat_template` override only reads video sampling defaults, so the base one is used."""
    signature = inspect.signature(processor_class.__init__)
    if "video_processor" not in signature.parameters:
        return processor_class

    def __init__(self, image_processor: Any, tokenizer: Any, **kwargs: Any) -> None:
        processor_class.__init__(
            self, image_processor=image_processor, tokenizer=tokenizer, video_processor=None,
            **kwargs,
        )  # fmt: skip

    # to_dict() saves the __init__ arguments it finds in the signature (image_seq_len, ...).
    __init__.__signature__ = signature.replace(  # type: ignore[attr-defined]
        parameters=[p for n, p in signature.parameters.items() if n != "video_processor"]
    )
    return type(
        processor_class.__name__,
        (processor_class,),
        {
            "__init__": __init__,
            "__module__": processor_class.__module__,
            "apply_chat_template": ProcessorMixin.apply_chat_template,
        },
    )


def _wants_video(name: str) -> bool:
    config = _saved_json(name, "processor_config.json") or {}
    cls = _processor_class(config.get("processor_class"))
    return cls is not None and "video_processor" in inspect.signature(cls.__init__).parameters


def _image_only_processor(name: str, **kwargs: Any):
    config = _saved_json(name, "processor_config.json") or {}
    settings = {k: v for k, v in config.items() if k not in _NOT_SETTINGS}
    template = _saved_file(name, "chat_template.jinja")
    if template is not None:
        settings["chat_template"] = template.read_text()
    elif (saved := _saved_json(name, "chat_template.json")) is not None:
        settings["chat_template"] = saved.get("chat_template")
    hub = {k: v for k, v in kwargs.items() if k in ("trust_remote_code", "revision", "token")}
    return image_only(_processor_class(config["processor_class"]))(
        image_processor=AutoImageProcessor.from_pretrained(name, **hub),
        tokenizer=AutoTokenizer.from_pretrained(name, **hub),
        **settings,
    )


def _processor_class(class_name: str | None):
    return getattr(transformers, class_name, None) if class_name else None


def _saved_json(name: str, filename: str) -> dict | None:
    path = _saved_file(name, filename)
    return json.loads(path.read_text()) if path is not None else None


def _saved_file(name: str, filename: str) -> Path | None:
    """A file of a model folder, or of a Hub repository (None when it has none)."""
    if Path(name).is_dir():
        path = Path(name) / filename
        return path if path.is_file() else None

    try:
        return Path(hf_hub_download(name, filename))
    except EntryNotFoundError:
        return None
