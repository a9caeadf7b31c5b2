"""Fine-tuning with transformers' Trainer, minus the guide's defects.

One path: data (`load_captions`) → model (`load_model`, or a from-scratch preset built from the
training captions) → `CaptionCollator` (dynamic padding, -100 labels, one caption per epoch) →
`CaptionTrainer` → model + processor + metrics + curves in `output_dir`.

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

from transformers import Trainer, TrainerCallback

from captioner.errors import CaptionerError

log = logging.getLogger(__name__)

CONFIG_NAME = "captioner_config.json"
PIXEL_CACHE_MAX_BYTES = 2 << 30  # "small dataset": its pixel values fit in 2 GiB on disk

# TrainingArguments defaults that differ from transformers' own (explicit values always win).
DEFAULT_ARGS: dict[str, Any] = {
    "per_device_train_batch_size": 32,  # as the guide
    "per_device_eval_batch_size": 32,
    "num_train_epochs": 3,
    "eval_strategy": "epoch",
    "save_strategy": "epoch",
    "save_total_limit": 2,
    "logging_steps": 10,
    "load_best_model_at_end": True,
    "metric_for_best_model": "cider",  # CIDEr-D of generated captions
    "greater_is_better": True,
    "report_to": "none",
    "dataloader_num_workers": 1,  # decode + preprocess beside the training step
}
# A from-scratch model barely moves at the guide's 5e-5 (DESIGN.md): ~1e-3 with warmup works.
# (transformers 5 reads a warmup_steps below 1 as a fraction of all steps.)
PRESET_ARGS: dict[str, Any] = {"learning_rate": 1e-3, "warmup_steps": 0.05, "weight_decay": 0.01}
# Metrics where lower is better: picking the best checkpoint by one of them flips the default.
LOWER_IS_BETTER = ("wer", "wer_corpus", "loss")


@dataclass
class TrainConfig:
    """Everything `captioner train` needs. `training_args` holds TrainingArguments keywords."""

    model: str
    data: str
    output_dir: str
    image_column: str | None = None  # None: load_captions' defaults for the source
    caption_column: str | None = None
    test_size: float = 0.1
    seed: int = 0
    on_bad_image: str = "skip"  # unreadable images: "skip" (counted, reported) or "fail"
    eval_max_samples: int = 200  # eval captions are generated for this many fixed examples
    num_beams: int = 1
    max_new_tokens: int = 30
    early_stopping_patience: int | None = None
    resume: bool = False
    pixel_cache: str = "auto"  # "auto" (small datasets), "off", or a directory
    trust_remote_code: bool = False
    training_args: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        """Split a flat dict (config file + CLI flags) into our fields and TrainingArguments."""
        from transformers import TrainingArguments

        ours = {f.name for f in dataclasses.fields(cls)} - {"training_args"}
        theirs = {f.name for f in dataclasses.fields(TrainingArguments) if f.init}
        unknown = sorted(set(values) - ours - theirs - {"training_args", "warmup_ratio"})
        if unknown:
            raise CaptionerError(
                f"unknown option(s): {', '.join(unknown)} (neither a captioner option nor a "
                "TrainingArguments field)"
            )
        missing = [k for k in ("model", "data", "output_dir") if values.get(k) in (None, "")]
        if missing:
            raise CaptionerError(
                f"missing required option(s): {', '.join('--' + k for k in missing)}"
            )
        defaults = _field_defaults(TrainingArguments) | _field_defaults(cls)
        values = {k: _coerce(v, defaults.get(k)) for k, v in values.items()}
        if "warmup_ratio" in values:  # transformers 4's name; 5 takes the fraction as warmup_steps
            values["warmup_steps"] = float(values.pop("warmup_ratio"))
        extra = dict(values.get("training_args") or {})
        extra.update({k: v for k, v in values.items() if k in theirs and k not in ours})
        return cls(**{k: v for k, v in values.items() if k in ours}, training_args=extra)

    def to_dict(self) -> dict[str, Any]:
        """The flat form, as a `--config` file takes it."""
        flat = dataclasses.asdict(self)
        flat.update(flat.pop("training_args"))
        return flat


def load_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """Read a YAML or JSON config file of flat `key: value` pairs (the CLI's flag names)."""
    import yaml

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise CaptionerError(f"{path}: cannot read config file ({err.strerror})") from None
    try:
        values = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as err:
        raise CaptionerError(
            f"{path}: not valid {path.suffix.lstrip('.') or 'YAML'}: {err}"
        ) from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise CaptionerError(f"{path}: expected a mapping of option names to values")
    return values


def parse_extra_args(argv: list[str]) -> dict[str, Any]:
    """Any other `--<TrainingArguments field> value` from the command line, typed by
    transformers' own `HfArgumentParser`; only the fields actually given are returned."""
    if not argv:
        return {}
    from transformers import HfArgumentParser, TrainingArguments

    given = {a[2:].split("=")[0].replace("-", "_") for a in argv if a.startswith("--")}
    parser = HfArgumentParser(TrainingArguments)
    parser.allow_abbrev = False  # `--num_train 5` is a typo to report, not num_train_epochs
    try:
        namespace, rest = parser.parse_known_args(argv)
    except SystemExit:  # argparse printed what is wrong with the value; say it in one line too
        raise CaptionerError(f"invalid training option(s): {' '.join(argv)}") from None
    if rest:
        raise CaptionerError(f"unknown option(s): {' '.join(rest)}")
    return {k: v for k, v in vars(namespace).items() if k in given}


def resolve_training_args(config: TrainConfig, *, preset: bool):
    """TrainingArguments from our defaults, the preset's, then the user's (user wins)."""
    import torch
    from transformers import TrainingArguments

    user = dict(config.training_args)
    args = {**DEFAULT_ARGS, **(PRESET_ARGS if preset else {}), **user}
    # One strategy for eval and save unless told otherwise: load_best_model_at_end needs it.
    if "eval_strategy" in user and "save_strategy" not in user:
        args["save_strategy"] = user["eval_strategy"]
        if "eval_steps" in user and "save_steps" not in user:
            args["save_steps"] = user["eval_steps"]
    if args["eval_strategy"] == "no" and "load_best_model_at_end" not in user:
        args["load_best_model_at_end"] = False
    metric = str(args.get("metric_for_best_model", "")).removeprefix("eval_")
    if metric in LOWER_IS_BETTER and "greater_is_better" not in user:
        args["greater_is_better"] = False
    if not torch.cuda.is_available() and args.get("fp16"):
        log.warning("fp16 needs a CUDA GPU; none here, so training runs in fp32 (fp16 turned off)")
        args["fp16"] = False
    if not torch.cuda.is_available():
        args.setdefault("dataloader_pin_memory", False)  # nothing to pin for on CPU
    if args.get("dataloader_persistent_workers"):
        log.warning(
            "dataloader_persistent_workers turned off: the caption drawn per example "
            "changes each epoch, which needs fresh workers"
        )
        args["dataloader_persistent_workers"] = False
    args["seed"] = args.get("seed", config.seed)
    args["remove_unused_columns"] = False  # the collator needs `image` and `captions`
    args["prediction_loss_only"] = True  # never gather eval logits; metrics come from generate
    args["label_names"] = ["labels"]
    try:
        return TrainingArguments(output_dir=config.output_dir, **args)
    except (ValueError, TypeError) as err:
        raise CaptionerError(f"invalid training arguments: {err}") from None


def train(config: TrainConfig, callbacks: list | None = None) -> Path:
    """Train as `config` says; return `output_dir`, which then holds the final model.
    `callbacks`: extra `TrainerCallback`s (the benchmark times steps with one)."""
    import torch
    from transformers import EarlyStoppingCallback, TrainingArguments

    from captioner.collate import CaptionCollator
    from captioner.data import load_captions
    from captioner.models import PRESETS, build_preset, load_model
    from captioner.report import plot_curves

    out = Path(config.output_dir)
    preset = config.model in PRESETS
    if not torch.cuda.is_available():
        torch.set_num_threads(len(os.sched_getaffinity(0)))
    model = processor = None
    if not preset:  # a wrong model path fails before any data is read
        model, processor = load_model(config.model, trust_remote_code=config.trust_remote_code)

    splits = load_captions(
        config.data,
        image_column=config.image_column,
        caption_column=config.caption_column,
        test_size=config.test_size,
        seed=config.seed,
        on_bad_image=config.on_bad_image,
    )
    train_ds, eval_ds = splits["train"], splits.get("test")
    if len(train_ds) == 0:
        raise CaptionerError(f"{config.data}: no training examples")
    if eval_ds is not None and len(eval_ds) == 0:
        eval_ds = None
    train_ds, eval_ds = _prepare(train_ds), _prepare(eval_ds, limit=config.eval_max_samples)

    if preset:
        preset_dir = out / "preset"
        if not (config.resume and (preset_dir / "config.json").exists()):
            captions = [c for caps in train_ds["captions"] for c in caps]
            build_preset(config.model, captions, preset_dir)
        model, processor = load_model(preset_dir)

    args = resolve_training_args(config, preset=preset)
    if eval_ds is None and args.eval_strategy != "no":
        raise CaptionerError("no eval split (test_size=0): pass --eval_strategy no")
    if eval_ds is not None:
        _check_metrics(args)
    family = model.config.model_type
    cache = _pixel_cache_dir(config, processor, len(train_ds) + len(eval_ds or []))
    collator = CaptionCollator(
        processor,
        seed=config.seed,
        cache_dir=cache,
        labels_only=family == "vision-encoder-decoder",
    )
    callbacks = [_EpochCaptions(collator), *(callbacks or [])]
    if config.early_stopping_patience:
        callbacks.append(EarlyStoppingCallback(config.early_stopping_patience))
    try:
        trainer = CaptionTrainer(
            model=model,
            args=args,
            train_dataset=train_ds,
            eval_dataset=eval_ds,
            data_collator=collator,
            processing_class=processor,
            callbacks=callbacks,
            generation={"num_beams": config.num_beams, "max_new_tokens": config.max_new_tokens},
        )
    except Exception as err:  # with push_to_hub, Trainer creates the Hub repo right here
        if not args.push_to_hub:
            raise
        raise CaptionerError(
            f"--push_to_hub: cannot create the Hub repository ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}); log in with `hf auth login`, "
            "check the network, or train without --push_to_hub"
        ) from None
    out.mkdir(parents=True, exist_ok=True)
    # What ran: our options + every TrainingArguments value that differs from transformers'.
    base = _field_defaults(TrainingArguments)  # (a 2nd TrainingArguments resets accelerate)
    resolved = {k: v for k, v in config.to_dict().items() if k not in base}
    resolved |= {k: v for k, v in args.to_dict().items() if k == "output_dir" or v != base.get(k)}
    (out / CONFIG_NAME).write_text(json.dumps(resolved, indent=2, default=str) + "\n")

    checkpoint = None
    if config.resume:
        checkpoint = last_checkpoint(out)
        if checkpoint is None:
            log.warning("--resume: no checkpoint in %s, starting from scratch", out)
        else:
            log.warning("resuming from %s", checkpoint)
    log.info(
        "training %s on %d examples (%d eval) -> %s",
        config.model,
        len(train_ds),
        len(eval_ds or []),
        out,
    )
    try:
        result = trainer.train(resume_from_checkpoint=checkpoint)
    except KeyboardInterrupt:
        log.warning("interrupted: the last checkpoint in %s can be resumed with --resume", out)
        raise

    metrics = dict(result.metrics, train_samples=len(train_ds))
    trainer.save_model(str(out))  # safetensors, with the processor (processing_class)
    trainer.log_metrics("train", metrics)
    trainer.save_metrics("train", metrics)
    if eval_ds is not None:
        eval_metrics = dict(trainer.evaluate(), eval_samples=len(eval_ds))
        trainer.log_metrics("eval", eval_metrics)
        trainer.save_metrics("eval", eval_metrics)
    trainer.save_state()
    plot_curves(trainer.state.log_history, out / "curves.png")
    if args.push_to_hub:
        try:
            trainer.push_to_hub()
        except Exception as err:  # network / auth: the model is safe on disk either way
            first = str(err).splitlines()[0] if str(err) else ""
            raise CaptionerError(
                f"push to the Hub failed ({type(err).__name__}: {first}); "
                f"the trained model is in {out}"
            ) from None
    return out


def _coerce(value: Any, default: Any) -> Any:
    """YAML reads `1e-3` as a string (YAML 1.1 wants `1.0e-3`): numeric strings for numeric
    fields become numbers."""
    if not isinstance(value, str) or isinstance(default, bool):
        return value
    if not isinstance(default, (int, float)):
        return value
    try:
        number = float(value)
    except ValueError:
        return value
    return int(number) if isinstance(default, int) and number.is_integer() else number


def _field_defaults(cls) -> dict[str, Any]:
    out = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = getattr(f.default, "value", f.default)  # enums as their strings
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


def last_checkpoint(out: Path) -> str | None:
    """The newest *complete* checkpoint: Trainer writes trainer_state.json last, so a run killed
    while saving leaves a folder without it, which resuming must step over."""
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    found = [p for p in out.glob(f"{PREFIX_CHECKPOINT_DIR}-*") if p.name.split("-")[-1].isdigit()]
    done = []
    for p in sorted(found, key=lambda p: int(p.name.split("-")[-1])):
        if (p / "trainer_state.json").exists():
            done.append(p)
        else:
            log.warning("ignoring incomplete checkpoint %s (killed while saving?)", p)
    return str(done[-1]) if done else None


def _prepare(ds, limit: int | None = None):
    """Undecoded images (the collator decodes them in workers, once) + a row index for the seeded
    caption draw; the eval split is cut to its first `limit` rows (already a random split)."""
    from datasets import Image

    from captioner.collate import INDEX_COLUMN
    from captioner.evaluation import subset

    if ds is None:
        return None
    ds = subset(ds, limit)
    if isinstance(ds.features.get("image"), Image):
        ds = ds.cast_column("image", Image(decode=False))
    return ds.add_column(INDEX_COLUMN, list(range(len(ds))))


def _pixel_cache_dir(config: TrainConfig, processor, n_images: int) -> Path | None:
    if config.pixel_cache == "off":
        return None
    if config.pixel_cache != "auto":
        return Path(config.pixel_cache)
    crop = getattr(processor.image_processor, "crop_size", None) or {}
    side = max(crop.values()) if isinstance(crop, dict) and crop else 384
    if n_images * 3 * side * side * 4 > PIXEL_CACHE_MAX_BYTES:
        return None
    root = os.environ.get("CAPTIONER_CACHE") or Path.home() / ".cache" / "captioner"
    return Path(root) / "pixels"


def _score(predictions: list[str], references: list[list[str]]) -> dict[str, float]:
    """The evaluation issue's metric suite; numbers only (SPICE is None offline). Without Java
    (pycocoevalcap's tokenizer and METEOR need it) WER and exact match still come from jiwer."""
    from captioner.metrics import compute

    try:
        return {k: float(v) for k, v in compute(predictions, references).items() if v is not None}
    except CaptionerError as err:
        if "Java" not in str(err):
            raise
    from captioner.metrics import closest_reference

    pairs = list(zip(predictions, references, strict=True))
    wer = [closest_reference(p, refs)[0] if p else 1.0 for p, refs in pairs]
    exact = [float(p in refs) for p, refs in pairs]
    return {"wer": sum(wer) / len(wer), "exact_match": sum(exact) / len(exact)}


def _check_metrics(args) -> None:
    """Fail over to WER for the best checkpoint when the COCO metrics cannot run (no Java)."""
    if "cider" not in _score(["a red circle"], [["a red circle"]]):
        log.warning("COCO metrics unavailable (they need Java): scoring WER and exact match only")
        if args.metric_for_best_model in ("cider", "eval_cider"):
            args.metric_for_best_model, args.greater_is_better = "wer", False


class _EpochCaptions(TrainerCallback):
    """Tell the collator the epoch before each epoch's DataLoader (and its workers) starts."""

    def __init__(self, collator) -> None:
        self.collator = collator

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.collator.epoch = int((state.epoch or 0) + 1e-6)


class CaptionTrainer(Trainer):
    """Trainer whose evaluation generates captions and scores them (loss is kept, logits not)."""

    def __init__(self, *args, generation: dict | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.generation = generation or {}

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
        """Caption `dataset`'s images with the shared engine; score against all references."""
        from captioner.evaluation import ImageColumn
        from captioner.generate import Captioner

        start = time.perf_counter()
        captioner = Captioner(self.model, self.processing_class, device=self.args.device)
        # ImageColumn hands the engine undecoded images one batch at a time: memory stays flat
        # whatever the eval split's size.
        predictions = captioner.caption(
            ImageColumn(dataset),
            batch_size=self.args.per_device_eval_batch_size,
            num_workers=0,
            **self.generation,
        )
        references = [list(refs) for refs in dataset["captions"]]
        scores = _score(predictions, references)
        scores["gen_runtime"] = round(time.perf_counter() - start, 3)
        for pred, refs in list(zip(predictions, references, strict=True))[:3]:
            log.info("eval sample: %r (reference: %r)", pred, refs[0])
        return scores
