"""Load and build captioning models through transformers' own classes.

A Hub id (`microsoft/git-base`) and a local directory written by `save_pretrained` go through the
same `from_pretrained` call; a from-scratch preset (`tiny`, `small`) is just such a directory,
built by `build_preset`. What differs between families (which class loads them, and the rest)
is asked of the family (families/).

One path through it: `model_source(name)` says what a name is (a preset, a composition, a LoRA
adapter folder, a model folder or a Hub id); `build_preset` makes the first two into a folder,
and `load_model` loads the rest through the family's class.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from importlib import resources
from pathlib import Path
from typing import Any

from transformers import AutoConfig

from captioner.decoding import MAX_PROMPT_CHARS
from captioner.errors import CaptionerError
from captioner.hub import hub_reachable, is_offline
from captioner.models.compose import CompositeSpec, build_composite, is_spec
from captioner.models.families import family_for
from captioner.models.families.git import GitFamily
from captioner.models.lora import ADAPTER_CONFIG, attach, base_model_path, is_adapter_dir
from captioner.models.parts import check_target, publish_folder
from captioner.models.tokenizer import train_caption_tokenizer

log = logging.getLogger(__name__)

# Presets are small JSON files in presets/, found by scanning the folder: `tiny` and `small`
# (from-scratch GIT), `dinov2-tiny` (a pretrained DINOv2 + a small decoder trained from scratch).
_PRESET_DIR = resources.files("captioner.models.presets")
PRESETS = tuple(
    sorted(f.name.removesuffix(".json") for f in _PRESET_DIR.iterdir() if f.name.endswith(".json"))
)
# Written by training beside the model: the options it ran with (its split, above all, so that
# evaluation scores the held-out images and not training ones).
CONFIG_NAME = "captioner_config.json"
MAX_CONFIG_BYTES = 1 << 20
# The saved options something reads back, and the JSON types each must have (None is "unset").
SAVED_OPTION_TYPES: dict[str, tuple[type, ...]] = {
    "prompt": (str,),
    "test_size": (int, float),
    "seed": (int,),
    "image_column": (str,),
    "caption_column": (str,),
    "on_bad_image": (str,),
}
MAX_ADAPTER_CHAIN = 8  # an adapter whose base is an adapter...: never a loop


def is_preset(name: str | os.PathLike) -> bool:
    """A preset name (`tiny`, `dinov2-tiny`, ...) rather than a model folder or Hub id."""
    return str(name) in PRESETS


def needs_build(name: str | os.PathLike) -> bool:
    """A model that training builds from its training captions: a preset or a composition
    (`vision=...,text=...`), rather than a folder or Hub id that loads as it is."""
    return is_preset(name) or is_spec(str(name))


def is_composition(name: str | os.PathLike) -> bool:
    """A model built from pretrained parts (a `vision=...,text=...` spec or a preset that
    composes one): its pretrained vision tower is frozen by default."""
    if is_spec(str(name)):
        return True
    return is_preset(name) and preset_config(str(name)).get("family", "git") != "git"


def training_options(model_dir: str | os.PathLike) -> dict[str, Any]:
    """The options a captioner-trained model was trained with ({} for any other model).

    The file is checked, as anything in a model folder someone sent: a JSON object, and the
    options read back from it (`SAVED_OPTION_TYPES`: the prompt, the split) of the right type
    and within their bounds; anything else is an error naming the file."""
    path = Path(model_dir) / CONFIG_NAME
    if not path.is_file():
        return {}
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_CONFIG_BYTES + 1)
        if len(data) > MAX_CONFIG_BYTES:
            raise CaptionerError(f"{path}: larger than {MAX_CONFIG_BYTES:,} bytes")
        options = json.loads(data)
    except OSError as err:
        raise CaptionerError(f"{path}: cannot read ({err.strerror or err})") from None
    except (ValueError, RecursionError) as err:  # JSONDecodeError, UnicodeDecodeError
        raise CaptionerError(f"{path}: not valid JSON ({type(err).__name__})") from None
    if not isinstance(options, dict):
        raise CaptionerError(f"{path}: must hold a JSON object of options, not a {_kind(options)}")
    for key, kinds in SAVED_OPTION_TYPES.items():
        value = options.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, kinds)):
            want = " or ".join("number" if k is float else _kind(k()) for k in kinds)
            raise CaptionerError(f"{path}: {key} must be a {want}, not a {_kind(value)}")
    prompt = options.get("prompt")
    if prompt is not None and len(prompt) > MAX_PROMPT_CHARS:
        raise CaptionerError(
            f"{path}: the saved prompt has {len(prompt)} characters, at most {MAX_PROMPT_CHARS}"
        )
    return options


def _kind(value: Any) -> str:
    """A JSON value's type as JSON calls it."""
    names = {dict: "object", list: "list", str: "string", bool: "boolean", type(None): "null"}
    return names.get(type(value), "number")


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
    return _load(str(name_or_path), trust_remote_code, merge, ())


def _load(name: str, trust_remote_code: bool, merge: bool, adapters: tuple[str, ...]):
    """`load_model`; `adapters` are the adapter folders whose base this is (a chain)."""
    if is_adapter_dir(name):
        here = os.path.realpath(name)
        if here in adapters or len(adapters) >= MAX_ADAPTER_CHAIN:
            first = Path(adapters[0] if adapters else name) / ADAPTER_CONFIG
            raise CaptionerError(
                f"{first}: base_model_name_or_path leads back to an adapter of the chain "
                f"({name}): an adapter cannot be its own base"
            )
        base, _ = _load(base_model_path(name), trust_remote_code, True, (*adapters, here))
        processor = family_for(base.config).load_processor(
            name, trust_remote_code=trust_remote_code
        )
        return attach(base, name, merge=merge), processor
    if not Path(name).exists() and not is_offline() and not hub_reachable():
        raise _load_error(name, ConnectionError("the Hub is unreachable"))
    try:
        config = AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise _load_error(name, err) from None
    family = family_for(config)
    try:
        model = family.load_model(name, trust_remote_code=trust_remote_code)
        processor = family.load_processor(name, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise _load_error(name, err) from None
    return model, processor


def merge_adapter(adapter_dir: str | Path, out_dir: str | Path, *, overwrite: bool = False) -> Path:
    """Fold a LoRA adapter into its base model and save a plain model folder (with the
    processor) that loads without peft or captioner.

    `out_dir` must be new or empty unless `overwrite`; it is written in a temporary folder and
    renamed into place, so a failed merge leaves it as it was. It may be neither the adapter's
    folder nor its base's (nor hold them)."""
    if not is_adapter_dir(adapter_dir):
        raise CaptionerError(f"{adapter_dir}: not a LoRA adapter folder (no adapter_config.json)")
    keep = (adapter_dir, base_model_path(adapter_dir))
    check_target(out_dir, overwrite=overwrite, keep=keep)  # before the minutes of loading
    model, processor = load_model(adapter_dir)

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)

    return publish_folder(out_dir, write, overwrite=overwrite, keep=keep)


def preset_config(name: str) -> dict:
    """The JSON preset `name` (`tiny`, `small`) or a path to a JSON file of the same shape."""
    if Path(name).suffix == ".json" and Path(name).is_file():
        return json.loads(Path(name).read_text())
    if name not in PRESETS:
        raise CaptionerError(f"unknown preset '{name}' (choose from {', '.join(PRESETS)})")
    return json.loads(_PRESET_DIR.joinpath(f"{name}.json").read_text())


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
    tokenizer = train_caption_tokenizer(
        captions,
        vocab_size=spec.get("tokenizer_vocab_size", 1000),
        model_max_length=spec["max_position_embeddings"],
    )
    return GitFamily().build(spec, tokenizer, out_dir, seed=seed)
