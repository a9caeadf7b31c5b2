"""The options of `captioner train`: four dataclasses parsed together by one `HfArgumentParser`
(`parse_train_args`, as transformers' example scripts do): `ModelArguments`, `DataArguments`,
`DecodingOptions` (how evaluation captions are decoded) and `CaptionTrainingArguments`
(TrainingArguments with captioner's defaults and rules). A YAML/JSON `--config` file sets the same
keys; flags win over it."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from transformers import HfArgumentParser, TrainingArguments

from captioner.data.sources import DataArguments
from captioner.decoding import DecodingOptions
from captioner.errors import CaptionerError
from captioner.models.build import PRESETS, is_preset, needs_build, preset_config
from captioner.training.augment import DEFAULT_OPS, Augmenter
from captioner.training.collapse import DEFAULT_THRESHOLD

log = logging.getLogger(__name__)

# A from-scratch model barely moves at the guide's 5e-5: ~1e-3 with warmup works (measured).
# (transformers 5 reads a warmup_steps below 1 as a fraction of all steps.)
PRESET_TRAINING_DEFAULTS: dict[str, Any] = {
    "learning_rate": 1e-3,
    "warmup_steps": 0.05,
    "weight_decay": 0.01,
}
# Metrics where lower is better: picking the best checkpoint by one of them flips the default.
LOWER_IS_BETTER = ("wer", "wer_corpus", "loss")


@dataclass
class ModelArguments:
    """Which model to fine-tune."""

    model: str | None = field(
        default=None,
        metadata={
            "help": f"A preset ({', '.join(PRESETS)}), a composition "
            "(vision=...,text=...), a model folder, a LoRA adapter folder or a Hub id of any "
            "family `captioner models` lists (GIT, BLIP, LLaVA, PaliGemma, Florence-2, BLIP-2, "
            "and chat VLMs such as SmolVLM, Qwen2-VL, Gemma 3)."
        },
    )
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Allow model code from the Hub repository."}
    )
    freeze: str | None = field(
        default=None,
        metadata={
            "help": "vision | none. Default: vision for composed models (vision=...,text=... "
            "and presets built on a pretrained part), none otherwise.",
        },
    )
    feature_cache: str = field(
        default="auto",
        metadata={
            "help": "With the vision tower frozen, compute its outputs once per image and reuse "
            "them: auto (under $CAPTIONER_CACHE) | off | a folder."
        },
    )
    feature_cache_max_gb: float = field(
        default=8.0, metadata={"help": "Refuse to grow the feature cache past this size."}
    )
    lora_r: int = field(
        default=0, metadata={"help": "LoRA rank on the language model's attention (0: off)."}
    )
    lora_alpha: int = field(default=16, metadata={"help": "LoRA scaling (alpha / r)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA path."})
    lora_target_modules: list[str] | None = field(
        default=None,
        metadata={
            "help": "Module names to adapt (default: the text decoder's attention projections)."
        },
    )
    lora_vision: bool = field(
        default=False, metadata={"help": "Also put LoRA adapters on the vision tower."}
    )


def _default(value: Any, help: str) -> Any:
    return field(default=value, metadata={"help": help})


@dataclass
class CaptionTrainingArguments(TrainingArguments):
    """TrainingArguments with captioner's defaults, the rules this task needs, and two options of
    its own (`resume`, `early_stopping_patience`). Every other field is transformers' own."""

    per_device_train_batch_size: int = _default(32, "Batch size per device (the guide's 32).")
    per_device_eval_batch_size: int = _default(32, "Eval batch size per device.")
    eval_strategy: str = _default("epoch", "no | steps | epoch")
    save_strategy: str = _default("epoch", "no | steps | epoch (follows eval_strategy if unset)")
    save_total_limit: int | None = _default(2, "Keep at most this many checkpoints.")
    logging_steps: float = _default(10, "Log every N steps.")
    load_best_model_at_end: bool = _default(True, "Load the best checkpoint (by CIDEr-D) at end.")
    metric_for_best_model: str | None = _default("cider", "CIDEr-D of generated captions.")
    dataloader_num_workers: int = _default(1, "Decode + preprocess beside the training step.")
    seed: int = _default(0, "Seeds the split, the caption drawn per epoch and the model init.")
    resume: bool = _default(False, "Continue from the newest complete checkpoint in output_dir.")
    pixel_cache: str = _default("auto", "auto (small datasets) | off | a folder for pixel values.")
    early_stopping_patience: int | None = _default(
        None, "Stop after N evaluations without a better metric."
    )
    stop_on_collapse: bool = _default(
        False, "Stop when two evaluations in a row give (nearly) every image the same caption."
    )
    augment_views: int = _default(
        0,
        "Caption-preserving augmentation: N augmented copies of each training image (its "
        "features cached once with a frozen tower; each epoch trains on one of them or the "
        "image itself). 0: off.",
    )
    augment: str = _default(
        DEFAULT_OPS,
        "Which augmentations (comma-separated): crop (zoom in), shrink (zoom out onto the "
        "border colour, moved), blur, posterize, grayscale (never for a caption naming a "
        "colour), flip (never for a caption with a left/right word).",
    )
    patch_dropout: float = _default(
        0.0,
        "With a frozen tower (cached features) and a cross-attending decoder (VED): the share "
        "of patch tokens each training example leaves out, drawn anew each epoch; captioning "
        "reads them all. 0: off.",
    )
    collapse_threshold: float = _default(
        DEFAULT_THRESHOLD, "Collapse: distinct captions / eval images below this (min 20 images)."
    )

    def __post_init__(self) -> None:
        self._task_rules()
        super().__post_init__()

    def _task_rules(self) -> None:
        """Rules that hold whoever builds the arguments (CLI, config file or Python)."""
        eval_strategy = str(getattr(self.eval_strategy, "value", self.eval_strategy))
        # One strategy for eval and save unless told otherwise: load_best_model_at_end needs it.
        if self.save_strategy == "epoch" and eval_strategy != "epoch":
            self.save_strategy = eval_strategy
        if self.save_steps == 500 and self.eval_steps is not None:  # 500: transformers' default
            self.save_steps = self.eval_steps
        if eval_strategy == "no":
            self.load_best_model_at_end = False
        metric = str(self.metric_for_best_model or "").removeprefix("eval_")
        if self.greater_is_better is None:
            self.greater_is_better = metric not in LOWER_IS_BETTER
        if not torch.cuda.is_available():
            if int(os.environ.get("WORLD_SIZE", "1")) > 1:
                # Several processes and no GPU (accelerate launch / torchrun on CPUs): gloo. Else
                # each process would train on its own, all writing into one folder.
                self.use_cpu = True
            if self.fp16:
                log.warning("fp16 needs a CUDA GPU; none here, so training runs in fp32")
                self.fp16 = False
            if self.bf16 and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
                log.warning(
                    "bf16 needs a GPU or a CPU with bf16 instructions (AVX512-BF16, "
                    "AMX); this one has neither, so training runs in fp32"
                )
                self.bf16 = False
            if self.bf16:
                # CPU autocast (AVX512-BF16 / AMX): transformers refuses --bf16 without a bf16
                # GPU unless told the run is on the CPU. Measured on the cached dinov2-tiny:
                # 1.19-1.29x fp32 samples/s, same held-out quality; dinov2-smollm2 1.3-1.5x
                # (RESULTS.md).
                self.use_cpu = True
            self.dataloader_pin_memory = False  # nothing to pin for on CPU
        if self.dataloader_persistent_workers:
            log.warning(
                "dataloader_persistent_workers turned off: the caption drawn per example "
                "changes each epoch, which needs fresh workers"
            )
            self.dataloader_persistent_workers = False
        if self.augment_views < 0:
            raise CaptionerError("--augment_views must be 0 (off) or more")
        if not 0.0 <= self.patch_dropout < 1.0:
            raise CaptionerError(f"--patch_dropout must be in [0, 1), not {self.patch_dropout}")
        if self.augment_views:
            Augmenter.parse(self.augment)  # an unknown op fails before any data is read
        self.remove_unused_columns = False  # the collator needs `image` and `captions`
        self.prediction_loss_only = True  # never gather eval logits; metrics come from generate
        self.label_names = ["labels"]


TrainArgs = tuple[ModelArguments, DataArguments, DecodingOptions, CaptionTrainingArguments]


class _Parser(HfArgumentParser):
    """HfArgumentParser whose errors are CaptionerErrors (one line), not usage + exit 2."""

    def error(self, message: str):  # type: ignore[override]
        raise CaptionerError(f"captioner train: {message}")


def train_arg_parser() -> HfArgumentParser:
    """The one parser of `captioner train`: our dataclasses and TrainingArguments together."""
    parser = _Parser(
        (ModelArguments, DataArguments, DecodingOptions, CaptionTrainingArguments),
        prog="captioner train",
        description="Fine-tune (or train a from-scratch preset) with transformers' Trainer. "
        "--model, --data and --output_dir are required (here or in --config FILE, a YAML/JSON "
        "file of the same keys; flags win). Evaluation generates captions and scores them; the "
        "best checkpoint is chosen by CIDEr-D.",
        allow_abbrev=False,  # `--num_train 5` is a typo to report, not num_train_epochs
    )
    parser.add_argument("--config", help="YAML/JSON file with the same keys as these flags.")
    return parser


def parse_train_args(argv: list[str]) -> TrainArgs:
    """Flags (and the `--config` file they name) -> the four argument dataclasses.

    Precedence: transformers' defaults < captioner's < a preset's (`PRESET_TRAINING_DEFAULTS`)
    < the config file < the flags. argparse types string defaults too, so a YAML `1e-3` (a string
    in YAML 1.1) becomes a float like the flag would.
    """
    parser = train_arg_parser()
    known, _ = parser.parse_known_args(argv)  # only --config and --model matter here
    file_values = load_config_file(known.config) if known.config else {}
    dests = {a.dest for a in parser._actions}
    unknown = sorted(set(file_values) - dests)
    if unknown:
        raise CaptionerError(f"{known.config}: unknown option(s): {', '.join(unknown)}")
    model = known.model or file_values.get("model")
    if model and needs_build(model):
        parser.set_defaults(**PRESET_TRAINING_DEFAULTS)
    if model and is_preset(model):  # a preset may carry its own (dinov2-smollm2: LoRA)
        parser.set_defaults(**preset_config(model).get("training_defaults", {}))
    parser.set_defaults(**file_values)
    try:
        *args, _, rest = parser.parse_args_into_dataclasses(argv, return_remaining_strings=True)
    except (ValueError, TypeError) as err:  # TrainingArguments' own checks
        raise CaptionerError(f"invalid training arguments: {err}") from None
    if rest:
        raise CaptionerError(f"unknown option(s): {' '.join(rest)} (see captioner train --help)")
    model_args, data_args, decoding, training_args = args
    given_output = "output_dir" in file_values or any(
        a.split("=")[0] in ("--output_dir", "--output-dir") for a in argv
    )  # TrainingArguments would default it to ./trainer_output: a run must say where it goes
    missing = [
        flag
        for flag, value in (
            ("--model", model_args.model),
            ("--data", data_args.data),
            ("--output_dir", given_output),
        )
        if not value
    ]
    if missing:
        raise CaptionerError(f"missing required option(s): {', '.join(missing)}")
    return model_args, data_args, decoding, training_args


def load_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """Read a YAML or JSON config file of flat `key: value` pairs (the CLI's flag names)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise CaptionerError(f"{path}: cannot read config file ({err.strerror})") from None
    try:
        values = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as err:
        kind = path.suffix.lstrip(".") or "YAML"
        raise CaptionerError(f"{path}: not valid {kind}: {err}") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise CaptionerError(f"{path}: expected a mapping of option names to values")
    return values
