"""LoRA adapters on a captioner's language model, through peft.

`add_lora` wraps a loaded captioner in a peft model: low-rank adapters on the attention
projections of the text decoder (and, with `vision=True`, of the vision tower); the modules that
start random in a composition (VED's cross-attention and encoder projection, LLaVA's projector)
are trained whole (`modules_to_save`). Everything else stays frozen. Trainer then saves only the
adapter (`adapter_config.json` + `adapter_model.safetensors`) beside the processor.

An adapter folder is a model folder everywhere: `models.load_model` loads its base (the Hub id or
folder peft recorded, else the run's own `preset/` folder) and folds the adapter in, so
`caption`, `eval` and `serve` take it directly; `merge` writes a plain model folder.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model

from captioner.errors import CaptionerError
from captioner.models.families import Family, family_of

log = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PICKLED_WEIGHTS = "adapter_model.bin"  # peft's other format: a pickle, never loaded here


def is_adapter_dir(path: str | os.PathLike) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def add_lora(
    model: torch.nn.Module,
    *,
    r: int,
    alpha: int = 16,
    dropout: float = 0.05,
    target_modules: list[str] | None = None,
    vision: bool = False,
) -> PeftModel:
    """`model` with LoRA adapters; only the adapters and the random parts train."""
    # A module that is no transformers model gets the base family's defaults (and, having no
    # such layers, the error below).
    family = family_of(model) if hasattr(model, "config") else Family()
    targets = target_modules or _default_targets(model, family, vision)
    if not targets:
        raise CaptionerError(
            "--lora_r: found no attention projections to adapt; name them with "
            "--lora_target_modules"
        )
    # the random parts themselves, not their children (peft reloads only whole named modules)
    save = sorted(
        {
            n.split(".")[-1]
            for n, _ in model.named_modules()
            if n.split(".")[-1] in family.random_parts
        }
    )
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=targets,
        modules_to_save=save or None,
    )
    peft_model = get_peft_model(model, config)
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    log.info(
        "LoRA r=%d on %d projections (+ %s whole): %.2fM trainable parameters",
        r,
        len(targets),
        save,
        trainable / 1e6,
    )
    return peft_model


def attach(base: torch.nn.Module, adapter_dir: str | os.PathLike, *, merge: bool = True):
    """`base` with the adapter in `adapter_dir` folded in (merged: plain modules, full speed).

    safetensors only: peft would unpickle an `adapter_model.bin` (code, not just weights)."""
    folder = Path(adapter_dir)
    if not (folder / ADAPTER_WEIGHTS).is_file():
        if (folder / PICKLED_WEIGHTS).exists():
            raise CaptionerError(
                f"{folder / PICKLED_WEIGHTS}: a pickle file, which captioner never loads; "
                f"adapters load from {ADAPTER_WEIGHTS} only"
            )
        raise CaptionerError(f"{folder}: no {ADAPTER_WEIGHTS} (the adapter's weights)")
    try:
        model = PeftModel.from_pretrained(base, str(folder))
    except (OSError, ValueError, KeyError, TypeError) as err:  # a config or weights peft rejects
        raise CaptionerError(f"{folder}: cannot load the adapter ({err})") from None
    return model.merge_and_unload() if merge else model


def base_model_path(adapter_dir: str | os.PathLike) -> str:
    """Where the adapter's base model is: the run's `preset/` folder for a built model (peft
    records an absolute path, which breaks when the folder moves), else what peft recorded."""
    adapter_dir = Path(adapter_dir)
    if (adapter_dir / "preset" / "config.json").is_file():
        return str(adapter_dir / "preset")
    path = adapter_dir / ADAPTER_CONFIG
    try:
        config = json.loads(path.read_bytes())
    except OSError as err:
        raise CaptionerError(f"{path}: cannot read ({err.strerror or err})") from None
    except (ValueError, RecursionError) as err:
        raise CaptionerError(f"{path}: not valid JSON ({type(err).__name__})") from None
    recorded = config.get("base_model_name_or_path") if isinstance(config, dict) else None
    if not recorded or not isinstance(recorded, str):
        raise CaptionerError(f"{path}: does not say which model the adapter adapts")
    return recorded


def _default_targets(model: torch.nn.Module, family: Family, vision: bool) -> list[str]:
    """The family's LoRA target layers by full name: in the language model only, unless
    `vision` (the tower and the LM may share leaf names such as q_proj)."""
    found = set()
    vision_prefixes = family.vision_prefixes()
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or _is_random_part(name, family):
            continue
        if name.startswith(vision_prefixes) and not vision:
            continue
        if name.split(".")[-1] in family.lora_targets:
            found.add(name)
    return sorted(found)


def _is_random_part(name: str, family: Family) -> bool:
    return any(part in name.split(".") for part in family.random_parts)
