"""Fine-tuning with transformers' Trainer, minus the guide's defects.

One path: data (`DataArguments.load`) → model (`load_model`, or a from-scratch preset built from
the training captions) → `CaptionCollator` (dynamic padding, -100 labels, one caption per epoch)
→ `CaptionTrainer` → model + processor + metrics + curves in `output_dir`.

Options come as four dataclasses, parsed together by one `HfArgumentParser` (`parse_train_args`,
as transformers' example scripts do): `ModelArguments`, `DataArguments`, `DecodingOptions` (how
evaluation captions are decoded) and `CaptionTrainingArguments` (TrainingArguments with
captioner's defaults). A YAML/JSON `--config` file sets the same keys; flags win over it.

Evaluation *generates*: `CaptionTrainer.evaluation_loop` computes the eval loss without keeping a
single logit (`prediction_loss_only`), then captions a fixed, bounded subset of the eval split with
the same `Captioner` the CLI uses and scores it against all references. The scores land in the
Trainer's own metrics dict (`eval_cider`, `eval_wer`, ...), so `metric_for_best_model`,
`load_best_model_at_end` and early stopping work unchanged.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import torch
import yaml
from accelerate.utils import gather_object
from transformers import (
    EarlyStoppingCallback,
    HfArgumentParser,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from captioner.data.sources import DataArguments, ImageColumn, first_rows
from captioner.decoding import DecodingOptions
from captioner.engine import Captioner
from captioner.errors import CaptionerError
from captioner.evaluation import metrics
from captioner.evaluation.report import plot_curves
from captioner.hub import push_to_hub
from captioner.models.build import (
    CONFIG_NAME,
    build_preset,
    is_composition,
    is_preset,
    load_model,
    needs_build,
    preset_config,
)
from captioner.models.compose import freeze
from captioner.models.families import family_of
from captioner.models.lora import add_lora
from captioner.training.card import write_model_card
from captioner.training.checkpoints import last_complete_checkpoint
from captioner.training.collapse import DEFAULT_THRESHOLD, CollapseGuard, diversity
from captioner.training.collate import INDEX_COLUMN, CaptionCollator
from captioner.training.features import FeatureCache

log = logging.getLogger(__name__)

PIXEL_CACHE_MAX_BYTES = 2 << 30  # "small dataset": its pixel values fit in 2 GiB on disk
DEFAULT_MAX_EVAL_SAMPLES = 200  # generation eval during training: a fixed, bounded subset
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
        metadata={"help": "tiny | small (from-scratch presets) | a model folder | a Hub id."},
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
            self.dataloader_pin_memory = False  # nothing to pin for on CPU
        if self.dataloader_persistent_workers:
            log.warning(
                "dataloader_persistent_workers turned off: the caption drawn per example "
                "changes each epoch, which needs fresh workers"
            )
            self.dataloader_persistent_workers = False
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


def train(
    model_args: ModelArguments,
    data_args: DataArguments,
    training_args: CaptionTrainingArguments,
    decoding: DecodingOptions | None = None,
    callbacks: list[TrainerCallback] | None = None,
) -> Path:
    """Train as the arguments say; return `output_dir`, which then holds the final model.
    `callbacks`: extra `TrainerCallback`s (the benchmark times steps with one)."""
    out = Path(training_args.output_dir)
    seed = training_args.seed
    # 1. The model, unless it is a preset or a composition (built from the training captions in
    #    step 3). A wrong model path fails here, before any data is read.
    model = processor = None
    if not needs_build(model_args.model):
        model, processor = load_model(
            model_args.model, trust_remote_code=model_args.trust_remote_code
        )
    # 2. Data: the train split, and a fixed subset of the eval split for generation metrics.
    train_ds, eval_ds = _load_splits(data_args, seed)
    if eval_ds is None and training_args.eval_strategy != "no":
        raise CaptionerError("no eval split (test_size=0): pass --eval_strategy no")
    # 3. A preset or composition: a tokenizer trained on the training captions; what is not a
    #    pretrained part starts random.
    #    With several processes, the first builds it and the others wait, then load it.
    if model is None:
        preset_dir = out / "preset"
        with training_args.main_process_first(local=False, desc="building the model"):
            fresh = not (training_args.resume and (preset_dir / "config.json").exists())
            if fresh and training_args.process_index == 0:  # one writer, output_dir is shared
                captions = [c for caps in train_ds["captions"] for c in caps]
                build_preset(model_args.model, captions, preset_dir, seed=seed)
        model, processor = load_model(preset_dir)
    # 4. A frozen vision tower runs once per image: its outputs are cached (by one process per
    #    machine). LoRA freezes the rest: only adapters (and the parts of a composition that
    #    start random) train.
    with training_args.main_process_first(desc="encoder features"):
        fill = training_args.local_process_index == 0
        features = _frozen_features(model_args, model, processor, [train_ds, eval_ds], fill)
    if model_args.lora_r:
        model = add_lora(
            model,
            r=model_args.lora_r,
            alpha=model_args.lora_alpha,
            dropout=model_args.lora_dropout,
            target_modules=model_args.lora_target_modules,
            vision=model_args.lora_vision,
        )
    if features is not None and training_args.dataloader_num_workers == 1:
        # Batches are tensor lookups: a worker process only adds IPC (measured: a third slower).
        training_args.dataloader_num_workers = 0
    # 5. The collator (pixels cached on disk for small datasets) and the Trainer.
    n_images = len(train_ds) + len(eval_ds or [])
    family = family_of(model)
    pixel_cache = None
    if family.fixed_pixels and features is None:
        pixel_cache = _pixel_cache_dir(training_args.pixel_cache, processor, n_images)
    collator = CaptionCollator(
        processor,
        family,
        seed=seed,
        cache_dir=pixel_cache,
        features=features,
        prompt=(decoding or DecodingOptions()).prompt,
    )
    trainer = _make_trainer(
        model, processor, training_args, train_ds, eval_ds, collator, decoding, callbacks
    )
    # 6. What ran, beside the model (evaluation reads the split from it).
    out.mkdir(parents=True, exist_ok=True)
    if training_args.should_save:
        resolved = _resolved_options(model_args, data_args, decoding, training_args)
        (out / CONFIG_NAME).write_text(json.dumps(resolved, indent=2, default=str) + "\n")
    # 7. Train, from the newest complete checkpoint with --resume.
    checkpoint = _resume_checkpoint(out) if training_args.resume else None
    log.info("training %s on %d examples (%d eval) -> %s", model_args.model, len(train_ds),
             len(eval_ds or []), out)  # fmt: skip
    try:
        result = trainer.train(resume_from_checkpoint=checkpoint)
    except KeyboardInterrupt:
        log.warning("interrupted: the last checkpoint in %s can be resumed with --resume", out)
        raise
    # 8. The final model, metrics, curves; the Hub.
    _save_results(trainer, result, out, len(train_ds), eval_ds)
    _write_card(trainer, out, model_args, data_args, len(train_ds), len(eval_ds or []))
    if training_args.push_to_hub:
        _push(trainer, out)
    return out


def _frozen_features(
    model_args: ModelArguments, model, processor, splits, fill: bool = True
) -> FeatureCache | None:
    """Freeze the vision tower when asked (by default for composed models) and, for an
    encoder-decoder, fill the feature cache with every training and eval image."""
    setting = model_args.freeze or ("vision" if is_composition(model_args.model) else "none")
    if setting not in ("vision", "none"):
        raise CaptionerError(f"--freeze must be vision or none, not {setting!r}")
    family = family_of(model)
    tower = family.vision_tower(model)
    if setting == "none" or tower is None:
        return None
    log.info("froze the vision tower (%.1fM parameters)", freeze(tower) / 1e6)
    if model_args.feature_cache == "off" or not family.feature_cache:
        return None
    root = model_args.feature_cache
    if root == "auto":
        root = Path(os.environ.get("CAPTIONER_CACHE") or Path.home() / ".cache" / "captioner")
        root = root / "features"
    cache = FeatureCache(
        root,
        tower,
        processor.image_processor,
        max_bytes=int(model_args.feature_cache_max_gb * 2**30),
    )
    images = [src for ds in splits if ds is not None for src in ImageColumn(ds)]
    computed = cache.fill(images)
    log.info(
        "feature cache %s: %d computed, %d reused", cache.dir, computed, len(images) - computed
    )
    return cache


def _load_splits(data_args: DataArguments, seed: int):
    """Undecoded images (the collator decodes them in workers, once) + a row index for the seeded
    caption draw; the eval split is cut to its first `max_eval_samples` rows (already random)."""
    splits = data_args.load(seed)
    train_ds, eval_ds = splits["train"], splits.get("test")
    if len(train_ds) == 0:
        raise CaptionerError(f"{data_args.data}: no training examples")
    if eval_ds is not None and len(eval_ds) == 0:
        eval_ds = None
    limit = data_args.max_eval_samples or DEFAULT_MAX_EVAL_SAMPLES
    return _with_index(train_ds), _with_index(eval_ds, limit)


def _with_index(ds, limit: int | None = None):
    if ds is None:
        return None
    ds = first_rows(ds, limit).cast_column("image", datasets.Image(decode=False))
    return ds.add_column(INDEX_COLUMN, list(range(len(ds))))


def _make_trainer(model, processor, args, train_ds, eval_ds, collator, decoding, callbacks):
    callbacks = [_EpochCaptions(collator), *(callbacks or [])]
    if args.early_stopping_patience:
        callbacks.append(EarlyStoppingCallback(args.early_stopping_patience))
    callbacks.append(CollapseGuard(args.collapse_threshold, stop=args.stop_on_collapse))
    try:
        return CaptionTrainer(
            model=model,
            args=args,
            train_dataset=train_ds,
            eval_dataset=eval_ds,
            data_collator=collator,
            processing_class=processor,
            callbacks=callbacks,
            decoding=decoding,
        )
    except Exception as err:  # with push_to_hub, Trainer creates the Hub repo right here
        if not args.push_to_hub:
            raise
        raise CaptionerError(
            f"--push_to_hub: cannot create the Hub repository ({_first_line(err)}); log in with "
            "`hf auth login`, check the network, or train without --push_to_hub"
        ) from None


def _resolved_options(model_args, data_args, decoding, training_args) -> dict[str, Any]:
    """Our options + every TrainingArguments value that differs from transformers' default or
    from captioner's (a flat dict that `--config` takes back to the same run). The seed, the
    output folder and whatever a preset sets are always written."""
    theirs = _field_defaults(TrainingArguments)
    mine = _field_defaults(CaptionTrainingArguments)
    ours = {**dataclasses.asdict(model_args), **dataclasses.asdict(data_args)}
    ours |= dataclasses.asdict(decoding or DecodingOptions())
    keep = {"output_dir", "seed", "resume", "early_stopping_patience", *PRESET_TRAINING_DEFAULTS}
    if is_preset(model_args.model):
        keep |= set(preset_config(model_args.model).get("training_defaults", {}))
    trained = training_args.to_dict()
    return ours | {
        k: v for k, v in trained.items() if k in keep or v != theirs.get(k) or v != mine.get(k)
    }


def _field_defaults(cls) -> dict[str, Any]:
    out = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = getattr(f.default, "value", f.default)  # enums as their strings
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


def _resume_checkpoint(out: Path) -> str | None:
    checkpoint = last_complete_checkpoint(out)
    if checkpoint is None:
        log.warning("--resume: no checkpoint in %s, starting from scratch", out)
    else:
        log.warning("resuming from %s", checkpoint)
    return checkpoint


def _save_results(trainer: Trainer, result, out: Path, n_train: int, eval_ds) -> None:
    trainer.save_model(str(out))  # safetensors, with the processor (processing_class)
    train_metrics = dict(result.metrics, train_samples=n_train)
    trainer.log_metrics("train", train_metrics)
    trainer.save_metrics("train", train_metrics)
    if eval_ds is not None:
        eval_metrics = dict(trainer.evaluate(), eval_samples=len(eval_ds))
        trainer.log_metrics("eval", eval_metrics)
        trainer.save_metrics("eval", eval_metrics)
    trainer.save_state()
    if trainer.is_world_process_zero():
        plot_curves(trainer.state.log_history, out / "curves.png")


def _write_card(trainer, out, model_args, data_args, n_train: int, n_eval: int) -> None:
    """README.md: what the model is, its data, options, scores and samples, and how to use it."""
    args = trainer.args
    ours = [dataclasses.asdict(x) for x in (model_args, data_args, trainer.decoding)]
    current = {k: v for d in ours for k, v in d.items()} | args.to_dict()
    defaults = {
        **_field_defaults(ModelArguments),
        **_field_defaults(DataArguments),
        **_field_defaults(DecodingOptions),
        # captioner's own defaults, after the same rules, so that only the user's choices show
        **CaptionTrainingArguments(output_dir=str(out)).to_dict(),
    }
    said_elsewhere = {"model", "data", "output_dir", "logging_dir", "resume"}
    changed = {k: v for k, v in current.items() if k not in said_elsewhere and v != defaults.get(k)}
    results = out / "eval_results.json"
    write_model_card(
        out,
        base_model=model_args.model,
        data=data_args.data,
        sizes={"train": n_train, "eval (scored)": n_eval},
        options_changed=changed,
        metrics=json.loads(results.read_text()) if results.is_file() else {},
        samples=trainer.last_samples,
        curves="curves.png",
        family=family_of(trainer.model).name,
        repo_id=args.hub_model_id,
        prompt=trainer.decoding.prompt,
    )


def _push(trainer: Trainer, out: Path) -> None:
    """The finished model, its card and curves, through the same allow-list as `captioner push`
    (Trainer's own push would upload whatever else sits in the folder)."""
    repo_id = getattr(trainer, "hub_model_id", None) or trainer.args.hub_model_id or out.name
    try:
        push_to_hub(out, repo_id, private=bool(trainer.args.hub_private_repo))
    except CaptionerError as err:  # network / auth: the model is safe on disk either way
        raise CaptionerError(f"{err}; the trained model is in {out}") from None


def _first_line(err: BaseException) -> str:
    text = str(err).splitlines()[0] if str(err) else ""
    return f"{type(err).__name__}: {text}"


def _pixel_cache_dir(setting: str, processor, n_images: int) -> Path | None:
    """Preprocessed pixels on disk for small datasets (`--pixel_cache auto`)."""
    if setting == "off":
        return None
    if setting != "auto":
        return Path(setting)
    crop = getattr(processor.image_processor, "crop_size", None) or {}
    side = max(crop.values()) if isinstance(crop, dict) and crop else 384
    if n_images * 3 * side * side * 4 > PIXEL_CACHE_MAX_BYTES:
        return None
    root = os.environ.get("CAPTIONER_CACHE") or Path.home() / ".cache" / "captioner"
    return Path(root) / "pixels"


class _EpochCaptions(TrainerCallback):
    """Tell the collator the epoch before each epoch's DataLoader (and its workers) starts."""

    def __init__(self, collator: CaptionCollator) -> None:
        self.collator = collator

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.collator.epoch = int((state.epoch or 0) + 1e-6)


class CaptionTrainer(Trainer):
    """Trainer whose evaluation generates captions and scores them (loss is kept, logits not)."""

    def __init__(self, *args, decoding: DecodingOptions | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.decoding = decoding or DecodingOptions()
        self.last_samples: list[tuple[str, list[str]]] = []  # (caption, references): the card's

    def evaluation_loop(
        self,
        dataloader,
        description,
        prediction_loss_only=None,
        ignore_keys=None,
        metric_key_prefix="eval",
    ):
        # The eval loss always sees the epoch-0 caption draw, so it is comparable across epochs.
        collator, epoch = self.data_collator, getattr(self.data_collator, "epoch", 0)
        collator.epoch = 0
        try:
            output = super().evaluation_loop(
                dataloader, description, True, ignore_keys, metric_key_prefix
            )
        finally:
            collator.epoch = epoch
        scores = self.generation_metrics(dataloader.dataset)
        output.metrics.update({f"{metric_key_prefix}_{k}": v for k, v in scores.items()})
        return output

    def generation_metrics(self, dataset) -> dict[str, float]:
        """Caption `dataset`'s images with the shared engine; score against all references.
        With several processes each captions a contiguous shard and the predictions are
        gathered in order, so every process scores exactly what one process would."""
        start = time.perf_counter()
        world = self.args.world_size
        shard = (
            dataset.shard(world, self.args.process_index, contiguous=True) if world > 1 else dataset
        )
        captioner = Captioner(self.model, self.processing_class, device=self.args.device)
        # ImageColumn hands the engine undecoded images one batch at a time: memory stays flat
        # whatever the eval split's size.
        predictions = captioner.caption(
            ImageColumn(shard),
            self.decoding,
            batch_size=self.args.per_device_eval_batch_size,
            num_workers=0,
        ) if len(shard) else []  # fmt: skip
        if world > 1:
            predictions = gather_object(predictions)
        references = [list(refs) for refs in dataset["captions"]]
        corpus = metrics.compute(predictions, references)
        scores = {k: float(v) for k, v in corpus.items() if v is not None}
        scores.update(diversity(predictions))  # read by CollapseGuard
        scores["gen_runtime"] = round(time.perf_counter() - start, 3)
        self.last_samples = list(zip(predictions, references, strict=True))
        for pred, refs in list(zip(predictions, references, strict=True))[:3]:
            log.info("eval sample: %r (reference: %r)", pred, refs[0])
        return scores
