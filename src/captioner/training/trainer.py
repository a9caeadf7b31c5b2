"""Fine-tuning with transformers' Trainer, minus the guide's defects.

One path: data (`DataArguments.load`) → model (`load_model`, or a from-scratch preset built from
the training captions) → `CaptionCollator` (dynamic padding, -100 labels, one caption per epoch)
→ `CaptionTrainer` → model + processor + metrics + curves in `output_dir`.

Options come as four dataclasses parsed by one `HfArgumentParser` (arguments.py).

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
import time
from pathlib import Path
from typing import Any

import datasets
from accelerate.utils import gather_object
from transformers import (
    EarlyStoppingCallback,
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
from captioner.paths import cache_dir
from captioner.training.arguments import (
    PRESET_TRAINING_DEFAULTS,
    CaptionTrainingArguments,
    ModelArguments,
)
from captioner.training.augment import Augmenter
from captioner.training.card import write_model_card
from captioner.training.checkpoints import last_complete_checkpoint
from captioner.training.collapse import CollapseGuard, diversity
from captioner.training.collate import INDEX_COLUMN, CaptionCollator
from captioner.training.features import FeatureCache

log = logging.getLogger(__name__)

PIXEL_CACHE_MAX_BYTES = 2 << 30  # "small dataset": its pixel values fit in 2 GiB on disk
DEFAULT_MAX_EVAL_SAMPLES = 200  # generation eval during training: a fixed, bounded subset


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
    augmenter = _augmenter(training_args)
    with training_args.main_process_first(desc="encoder features"):
        fill = training_args.local_process_index == 0
        features = _frozen_features(model_args, model, processor, [train_ds, eval_ds], fill)
        if features is not None and augmenter is not None and fill:
            _fill_views(features, train_ds, augmenter, training_args.augment_views)
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
        augmenter=augmenter,
        views=training_args.augment_views,
        patch_dropout=training_args.patch_dropout,
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
    """Freeze the vision tower when asked (by default for composed models) and, for a family
    that takes cached vision features (VisionEncoderDecoder, LLaVA), fill the feature cache with
    every training and eval image."""
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
        root = cache_dir("features")
    # What the cache stores: the tower's output (VED) or what LLaVA's projector reads.
    cache = FeatureCache(
        root,
        family.feature_encoder(model),
        processor.image_processor,
        max_bytes=int(model_args.feature_cache_max_gb * 2**30),
    )
    images = [src for ds in splits if ds is not None for src in ImageColumn(ds)]
    computed = cache.fill(images)
    log.info(
        "feature cache %s: %d computed, %d reused", cache.dir, computed, len(images) - computed
    )
    family.use_cached_features(model)  # LLaVA: the projector runs on the cached features
    return cache


def _augmenter(args: CaptionTrainingArguments) -> Augmenter | None:
    """The caption-preserving augmentations `--augment_views` turns on (augment.py)."""
    if args.augment_views <= 0:
        return None
    return Augmenter.parse(args.augment)


def _fill_views(cache: FeatureCache, train_ds, augmenter: Augmenter, views: int) -> None:
    """`views` augmented copies of every training image, cached once (eval images stay as
    they are)."""
    images = list(ImageColumn(train_ds))
    computed = cache.fill(images, views=views, augmenter=augmenter, captions=train_ds["captions"])
    log.info("feature cache: %d augmented views computed (%d per image, ops %s)", computed, views,
             ",".join(augmenter.ops))  # fmt: skip


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
    return cache_dir("pixels")


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

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # With --label_smoothing_factor the Trainer takes `labels` out of the inputs and smooths
        # the loss itself; an encoder-decoder (VisionEncoderDecoder) makes its decoder inputs
        # from those labels, so without them its decoder would get no input at all.
        if self.label_smoother is not None and "labels" in inputs:
            prepare = getattr(
                self.accelerator.unwrap_model(model), "prepare_decoder_input_ids_from_labels", None
            )
            if prepare is not None and "decoder_input_ids" not in inputs:
                inputs = {**inputs, "decoder_input_ids": prepare(labels=inputs["labels"])}
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    def evaluation_loop(
        self,
        dataloader,
        description,
        prediction_loss_only=None,
        ignore_keys=None,
        metric_key_prefix="eval",
    ):
        # The eval loss always sees the epoch-0 caption draw, so it is comparable across epochs.
        # No augmentation either: the loss is of the images as they are.
        collator, epoch = self.data_collator, getattr(self.data_collator, "epoch", 0)
        training = getattr(collator, "training", True)
        collator.epoch = 0
        collator.training = False
        try:
            output = super().evaluation_loop(
                dataloader, description, True, ignore_keys, metric_key_prefix
            )
        finally:
            collator.epoch = epoch
            collator.training = training
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
        features = getattr(self.data_collator, "features", None)
        if features is not None:  # the frozen tower's cached outputs: eval images never decoded
            captioner.features = features.get
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
