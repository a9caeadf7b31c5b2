"""The one batched captioning engine: images in, captions out.

`captioner caption`, `captioner eval`, the training callback, the server and the demo all call
`Captioner.caption` (or its batch-by-batch twin `caption_iter`, or `caption_stream`, which yields
each caption's text as it is generated), so speed-ups and fixes land everywhere.

Why it is fast compared with the guide's loop (one image, `generate(max_length=50)`):
- images are decoded and preprocessed in a background DataLoader worker while the model runs;
- many images share one `generate` call (the per-step Python overhead is paid once per batch);
- `torch.inference_mode` and the KV cache (`use_cache=True`).

Why batching does not change captions: every item in a batch has the same image size (the
processor resizes) and the same prompt, so nothing is padded; greedy captions are the same as
one-at-a-time captions (tested).

Feature reuse: a frozen vision tower's output for an image never changes, and training may have
cached it (training/features.py). Given a `features` source (image -> its tower output, or None),
an image with features is not decoded, and a batch whose images all have them goes to generate
as the family's `cached_inputs` instead of pixels: the tower does not run, the captions are the
pixel path's (tested). A batch with any miss runs pixels for all its images, as without a source.
Families that take cached features: VisionEncoderDecoder (`encoder_outputs`) and LLaVA (the
projector input, through the family's forward pre-hook); the others ignore the source. The engine
only asks the source; the jobs decide which cache belongs to the loaded model (by fingerprint).

What differs between model families is asked of the family (models/families/): how images +
prompt become generate's inputs (run in the loader worker, beside image decoding), what generate
needs besides the decoding options, and how the prompt comes off the output. For GIT, BLIP and
VisionEncoderDecoder a `prompt` is the start of the caption and stays in it; for LLaVA, chat
models, PaliGemma, Florence-2 and BLIP-2 it is an instruction and the caption is what the model
writes after it. Decoding options are a `DecodingOptions` (decoding.py); URLs are fetched by
data/fetch.py.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import psutil
import torch
from PIL import Image
from transformers import GenerationMixin, StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer
from transformers.modeling_outputs import BaseModelOutput

from captioner.data.fetch import fetch, is_url
from captioner.data.images import load_image, source_name
from captioner.decoding import DecodingOptions, Generated
from captioner.errors import BadImageError, CaptionerError
from captioner.models import precision
from captioner.models.build import load_model, training_options
from captioner.models.export import is_onnx_dir, load_onnx
from captioner.models.families import Family, family_of
from captioner.options import LoadOptions

log = logging.getLogger(__name__)

# Measured (bench/RESULTS.md, 2 cores, torch's default threads): the `small` preset captions at
# 35 images/s in batches of 32 and 49 in batches of 96; per-step generate overhead keeps paying
# off well past 32 for small models, and the memory check below lowers it for big ones.
CPU_MAX_BATCH = 96
GPU_MAX_BATCH = 256

# Called with the number of images finished after each batch (the apps draw a progress bar).
ProgressFn = Callable[[int], None]
# An image source -> the vision tower's output for it (what the family's `cached_inputs` takes),
# or None when it has none. Called in the loader worker: it must pickle (FeatureCache.get does).
FeatureSource = Callable[[Any], torch.Tensor | None]


@dataclass(frozen=True)
class StreamEvent:
    """A piece of one image's caption (`Captioner.caption_stream`). `text` is what the caption
    gained since that image's previous event; its last event (`done`) also carries the whole
    `caption`: a `Generated` str (and then the image's `text` pieces join to exactly it), a list
    of them for num_return_sequences > 1, or the image's BadImageError."""

    index: int
    text: str
    caption: Any = None

    @property
    def done(self) -> bool:
        return self.caption is not None


class StreamListener(Protocol):
    """What `caption_iter(listener=...)` tells as it generates (called from its thread)."""

    def wants_text(self, index: int) -> bool: ...  # False: skip decoding this image's steps

    def text(self, index: int, delta: str) -> None: ...

    def done(self, index: int, caption: Any) -> None: ...

    def cancelled(self, index: int) -> bool: ...  # True: stop generating for this image


def open_image(src: Any) -> Image.Image:
    """Any supported source (path, URL, bytes, PIL image, datasets image dict) -> RGB PIL image."""
    if is_url(src):
        try:
            return load_image(fetch(src))
        except BadImageError as err:
            raise BadImageError(src, err.reason) from None
    return load_image(src)


@dataclass
class _Features:
    """An image whose tower output came from the feature source: decoded only if its batch
    has to run pixels after all (another image of the batch has no features)."""

    source: Any
    tensor: torch.Tensor


class _Images(torch.utils.data.Dataset):
    """Decodes one image per item; a bad image becomes its BadImageError. With a feature source,
    an image it has features for becomes `_Features` instead (no decoding)."""

    def __init__(self, sources: Sequence[Any], features: FeatureSource | None = None) -> None:
        self.sources = sources
        self.features = features

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, i: int):
        if self.features is not None:
            tensor = self.features(self.sources[i])
            if tensor is not None:
                return i, _Features(self.sources[i], tensor)
        return i, _decoded(self.sources[i])


def _decoded(src: Any) -> Image.Image | BadImageError:
    try:
        image = open_image(src)
    except BadImageError as err:
        return err
    image.info["source"] = source_name(src)  # names it if preprocessing fails
    return image


class _Batch:
    """The loader's collate function: the family turns a batch's decoded images + the prompt
    into generate's inputs, in the worker. An image the processor chokes on fails alone."""

    def __init__(self, family: Family, processor, prompt: str | None, config) -> None:
        self.family, self.processor, self.prompt, self.config = family, processor, prompt, config
        self._pixel_size: tuple[int, int] | None = None

    def __call__(self, items: list[tuple[int, Any]]):
        if any(isinstance(x, _Features) for _, x in items) and not all(
            isinstance(x, (_Features, BadImageError)) for _, x in items
        ):  # a miss: the whole batch runs pixels (one generate call, one kind of input)
            items = [(i, _decoded(x.source) if isinstance(x, _Features) else x) for i, x in items]
        good = [(i, im) for i, im in items if not isinstance(im, BadImageError)]
        errors = [(i, e) for i, e in items if isinstance(e, BadImageError)]
        try:
            return self._inputs(good), errors
        except Exception:  # find the image that fails, keep the rest
            kept = []
            for i, image in good:
                try:
                    self._inputs([(i, image)])
                    kept.append((i, image))
                except Exception as err:  # noqa: BLE001 - reported per image
                    name = (
                        source_name(image.source) if isinstance(image, _Features)
                        else image.info.get("source", f"image {i}")
                    )  # fmt: skip
                    errors.append((i, BadImageError(name, f"cannot preprocess: {err}")))
            return self._inputs(kept), errors

    def _inputs(self, good: list[tuple[int, Any]]):
        if not good:
            return [], None, 0
        if isinstance(good[0][1], _Features):  # every image of the batch has features
            features = torch.stack([f.tensor for _, f in good])
            inputs, prompt_tokens = self.family.prompt_inputs(
                self.processor, self.config, self.prompt, len(good), self.pixel_size()
            )
            inputs = {**self.family.cached_inputs(features), **inputs}
            return [i for i, _ in good], inputs, prompt_tokens
        inputs, prompt_tokens = self.family.generation_inputs(
            self.processor, [image for _, image in good], self.prompt, self.config
        )
        return [i for i, _ in good], inputs, prompt_tokens

    def pixel_size(self) -> tuple[int, int]:
        """(height, width) of the pixels the processor makes (a fixed-pixels family makes one
        size): LLaVA's prompt ids depend on it, and features have no pixels to measure."""
        if self._pixel_size is None:
            pixels = self.family.pixel_values(self.processor, [Image.new("RGB", (64, 64))])
            self._pixel_size = (int(pixels.shape[-2]), int(pixels.shape[-1]))
        return self._pixel_size


class Captioner:
    """Batched captioning with a model of any family (`captioner models`)."""

    def __init__(self, model, processor, device: str | torch.device | None = None) -> None:
        if device is None:  # a model already on an accelerator (training) stays where it is
            current = next(model.parameters()).device
            on_cpu = current.type == "cpu"
            device = ("cuda" if torch.cuda.is_available() else "cpu") if on_cpu else current
        self.device = torch.device(device)
        self.model = model.to(self.device)
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.family = family_of(model)
        # A model trained with --prompt captions with it unless told otherwise.
        self.default_prompt: str | None = None
        # Cached vision-tower outputs by image (the jobs set it for a model whose tower has a
        # filled feature cache); `caption_iter(features=...)` overrides it per call.
        self.features: FeatureSource | None = None

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike,
        load: LoadOptions | None = None,
        **options: Any,
    ) -> Captioner:
        """A model folder, Hub id, LoRA adapter folder or ONNX export, ready to caption.

        `load` holds the load options (device, dtype, int8, trust_remote_code); any of its
        fields may also be given as a keyword, which overrides it. `dtype="bfloat16"` and
        `int8=True` (dynamic int8 linear layers, CPU) trade exactness for speed: see
        precision.py and bench/RESULTS.md for how often captions change."""
        load = (load or LoadOptions()).replace(**options)
        if is_onnx_dir(name_or_path):  # an export (captioner export): runs on onnxruntime
            if load.dtype != "float32" or load.int8:
                raise CaptionerError(
                    "an ONNX export runs as exported: export it with --int8 instead"
                )
            captioner = cls(*load_onnx(name_or_path), device="cpu")
        else:
            model, processor = load_model(name_or_path, trust_remote_code=load.trust_remote_code)
            model = precision.prepare(model, load.dtype, load.int8)
            captioner = cls(model, processor, device="cpu" if load.int8 else load.device)
        captioner.default_prompt = training_options(name_or_path).get("prompt")
        return captioner

    # ---- public API ----

    def caption(
        self,
        images: Sequence[Any] | Any,
        decoding: DecodingOptions | None = None,
        *,
        details: bool = False,
        **kwargs: Any,
    ) -> list[str] | list[list[str]]:
        """Caption `images` (a list, or one image); raises BadImageError on the first bad one.

        `decoding`, `details` and keyword arguments are those of `caption_iter`. Returns one
        string per image, or a list of `num_return_sequences` strings per image when it is > 1.
        With a `prompt`, GIT, BLIP and VisionEncoderDecoder captions start with it (it is part of
        the caption); for the other families it is the instruction (LLaVA's saved prompt, a chat
        model's user turn, PaliGemma's task prefix, Florence-2's task token) and is not.
        """
        images = _as_list(images)
        out: list[Any] = [None] * len(images)
        for i, result in self.caption_iter(images, decoding, details=details, **kwargs):
            if isinstance(result, BadImageError):
                raise result
            out[i] = result
        return out

    def caption_stream(
        self, images: Sequence[Any] | Any, decoding: DecodingOptions | None = None, **kwargs: Any
    ) -> Iterator[StreamEvent]:
        """Caption `images` (batched as `caption` does), yielding each image's caption as it is
        generated: `StreamEvent(index, text)` pieces, a word at a time, then one event with the
        whole caption (`done`). Images of one batch stream side by side.

        Text streams for greedy and sampled decoding with one caption per image. Beam search,
        num_return_sequences > 1 and a model whose generate takes no streamer (an ONNX export)
        stream each caption as one final event; so does the `max_words` cut (the text before it
        streams, the rest of the cut is simply never sent). Leaving the loop early stops
        generation. Keyword arguments are those of `caption_iter`."""
        events: queue.Queue[StreamEvent | BaseException | None] = queue.Queue()
        listener = _QueueListener(events)

        def run() -> None:
            try:
                for _ in self.caption_iter(
                    _as_list(images), decoding, details=True, listener=listener, **kwargs
                ):
                    pass
                events.put(None)
            except BaseException as err:  # noqa: BLE001 - raised again in the caller's thread
                events.put(err)

        thread = threading.Thread(target=run, name="captioner-stream", daemon=True)
        thread.start()
        try:
            while (event := events.get()) is not None:
                if isinstance(event, BaseException):
                    raise event
                yield event
        finally:
            listener.stopped.set()  # the caller left: remaining rows stop at the next step
            thread.join()

    @torch.inference_mode()
    def caption_iter(
        self,
        images: Sequence[Any],
        decoding: DecodingOptions | None = None,
        *,
        batch_size: int | None = None,
        num_workers: int | None = None,
        progress: ProgressFn | None = None,
        details: bool = False,
        listener: StreamListener | None = None,
        features: FeatureSource | None = None,
        **options: Any,
    ) -> Iterator[tuple[int, str | list[str] | BadImageError]]:
        """Yield `(index, caption)` in input order, batch by batch, for big jobs.

        `decoding` holds the decoding options; any of its fields may also be given as a keyword
        (`num_beams=3`), which overrides it. A bad image yields `(index, BadImageError)` instead
        of stopping the run. `caption` is a str, or a list of `num_return_sequences` strs when
        that is > 1. `progress` is called with the number of images done after each batch. With
        `details`, captions are `Generated` strings that also carry the number of tokens
        generated and why generation stopped ("stop": an end token; "length": max_new_tokens).
        A `listener` is told each image's text as it is generated and each caption when it is
        done (what `caption_stream` and the server's batcher stream from). `features` (default:
        `self.features`) gives an image's cached vision-tower output or None: a batch whose
        images all have one skips decoding and the tower (families with `feature_cache` only;
        same captions).
        """
        asked = (decoding or DecodingOptions()).replace(**options)
        decoding = self.resolve(asked)
        if decoding.max_new_tokens < asked.max_new_tokens:
            log.warning(
                "max_new_tokens %d is more than this model's text positions allow: using %d",
                asked.max_new_tokens,
                decoding.max_new_tokens,
            )
        if not (hasattr(images, "__len__") and hasattr(images, "__getitem__")):
            images = list(images)  # a generator: the loader needs random access
        if not images:
            return
        if batch_size is None:
            batch_size = self.auto_batch_size(decoding.sequences_per_image, decoding.max_new_tokens)
        batch_size = max(1, min(batch_size, len(images)))
        if num_workers is None:
            # A worker process costs ~1 s to start; worth it only when there is work to overlap.
            num_workers = 1 if len(images) > 2 * batch_size else 0
        features = self._feature_source(features, decoding)
        loader = torch.utils.data.DataLoader(
            _Images(images, features),
            batch_size=batch_size,
            num_workers=num_workers,
            collate_fn=_Batch(self.family, self.processor, decoding.prompt, self.model.config),
            pin_memory=self.device.type == "cuda",
        )
        gen_kwargs = self._generate_kwargs(decoding)
        n_out = decoding.num_return_sequences
        was_training = self.model.training  # the training callback passes the live model
        self.model.eval()
        tell = None if listener is None else _Reconciled(listener)
        try:
            for (good, inputs, prompt_tokens), errors in loader:
                results: dict[int, Any] = dict(errors)
                if good:
                    texts = self._generate(
                        inputs, prompt_tokens, decoding, gen_kwargs, details or tell is not None,
                        None if tell is None else (tell, good),
                    )  # fmt: skip
                    for k, i in enumerate(good):
                        group = texts[k * n_out : (k + 1) * n_out]
                        results[i] = group if n_out > 1 else group[0]
                for i in sorted(results):
                    if tell is not None:  # the rest of each caption not streamed yet
                        tell.done(i, results[i])
                    yield i, results[i]
                if progress is not None:
                    progress(len(results))
        finally:
            self.model.train(was_training)

    def auto_batch_size(
        self, sequences_per_image: int = 1, max_new_tokens: int | None = None
    ) -> int:
        """Images per `generate` call: a cap (96 on CPU, 256 on GPU), lowered so the KV cache and
        activations fit a quarter of free memory."""
        if max_new_tokens is None:
            max_new_tokens = DecodingOptions().max_new_tokens
        cfg = self.model.config
        text = cfg.get_text_config(decoder=True)
        layers = getattr(text, "num_hidden_layers", 12)
        hidden = getattr(text, "hidden_size", 768)
        vision = getattr(cfg, "vision_config", None) or getattr(cfg, "encoder", None)
        # Image positions: LLaVA says; a fixed-size tower has (side / patch)^2 + 1; a dynamic-
        # resolution model (Qwen-VL, image splitting) is counted generously.
        n_img = 1024
        if getattr(cfg, "image_seq_length", None):  # LLaVA: image tokens in the LM's sequence
            n_img = cfg.image_seq_length
        elif isinstance(getattr(vision, "image_size", None), int) and isinstance(
            getattr(vision, "patch_size", None), int
        ):
            n_img = (vision.image_size // vision.patch_size) ** 2 + 1
        elt = torch.finfo(self.model.dtype).bits // 8
        # keys+values per layer, x2 slack for activations / the vision encoder / beam reorders.
        per_seq = 4 * layers * (n_img + max_new_tokens) * hidden * elt
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            cap = GPU_MAX_BATCH
        else:
            free, cap = psutil.virtual_memory().available, CPU_MAX_BATCH
        fits = int(free * 0.25) // max(per_seq * sequences_per_image, 1)
        return int(max(1, min(cap, fits)))

    def bad_words_ids(self, words: Sequence[str]) -> list[list[int]]:
        """Token id sequences for each word, as it appears mid-sentence and capitalised.

        Words the tokenizer can only spell with [UNK] are skipped: banning [UNK] would ban
        every unknown word, and the model cannot produce the word anyway.
        """
        unk = self.tokenizer.unk_token_id
        variants = sorted(
            {v for w in {w.strip() for w in words if w.strip()}
             for v in (w, " " + w, w.capitalize(), " " + w.capitalize())}
        )  # fmt: skip
        if not variants:
            return []
        # One batched tokenizer call and a set: linear in the number of words.
        spelled = self.tokenizer(variants, add_special_tokens=False).input_ids
        out = {tuple(ids) for ids in spelled if ids and unk not in ids}
        unspellable = {v.strip() for v, ids in zip(variants, spelled, strict=True)
                       if not ids or unk in ids}  # fmt: skip
        if unspellable:
            log.info("bad_words: skipped what the tokenizer cannot spell: %s",
                     ", ".join(sorted(unspellable)[:10]))  # fmt: skip
        return [list(ids) for ids in sorted(out)]

    def resolve(self, decoding: DecodingOptions | None = None, **options: Any) -> DecodingOptions:
        """The options this model runs with: the saved prompt unless one is given, and a caption
        no longer than the model's positions allow (max_new_tokens clamped, min_new_tokens with
        it). Nothing is logged: `caption_iter` notes a clamp."""
        decoding = (decoding or DecodingOptions()).replace(**options)
        if decoding.prompt is None and self.default_prompt:
            decoding = decoding.replace(prompt=self.default_prompt)
        limit = self.max_new_tokens_limit()
        if limit is not None and decoding.prompt:  # the prompt's tokens take positions too
            used = len(self.tokenizer(decoding.prompt, add_special_tokens=False).input_ids)
            limit = max(1, limit - used)
        if limit is not None and decoding.max_new_tokens > limit:
            low = decoding.min_new_tokens
            decoding = decoding.replace(
                max_new_tokens=limit, min_new_tokens=None if low is None else min(low, limit)
            )
        if decoding.force_words:
            raise CaptionerError(
                "--force_words needs constrained beam search, which transformers 5 moved out of "
                "the library (Hub repo transformers-community/constrained-beam-search, run with "
                "trust_remote_code): not available to captioner"
            )
        return decoding

    def max_new_tokens_limit(self) -> int | None:
        """How many tokens a caption may have before the text positions run out (GIT, BLIP and
        BERT decoders have a fixed number; the start token and a prompt token need room)."""
        return self.family.max_new_tokens_limit(self.model.config)

    # ---- internals ----

    def _feature_source(
        self, features: FeatureSource | None, decoding: DecodingOptions
    ) -> FeatureSource | None:
        """The source to use, or None where this model cannot take cached features (a family
        without `cached_inputs`, an ONNX export). A peft-wrapped model (the training callback
        with LoRA) passes the cached inputs through to the model inside."""
        features = self.features if features is None else features
        if features is None:
            return None
        family = self.family
        get_base = getattr(self.model, "get_base_model", None)  # peft: the model inside
        base = get_base() if callable(get_base) else self.model
        if not (family.feature_cache and family.fixed_pixels) or not isinstance(
            base, GenerationMixin
        ):  # an ONNX export runs its own vision part
            log.debug("%s models do not take cached features: running the tower", family.name)
            return None
        if decoding.sequences_per_image > 1 and set(family.cached_inputs(torch.zeros(1))) != {
            "encoder_outputs"
        }:
            # generate repeats `encoder_outputs` per beam / returned sequence, but not LLaVA's
            # projector input (it expands only projected features): pixels then.
            return None
        family.use_cached_features(self.model)  # LLaVA: the projector hook (once per model)
        return features

    def _generate_kwargs(self, decoding: DecodingOptions) -> dict[str, Any]:
        kwargs = {**self.family.generate_kwargs(self.processor, self.model)}
        kwargs.update(decoding.generate_kwargs())
        if decoding.bad_words:
            banned = self.bad_words_ids(decoding.bad_words)
            if banned:  # none spellable: no constraint (transformers rejects an empty list)
                kwargs["bad_words_ids"] = banned
        tok = self.tokenizer
        if getattr(self.model.generation_config, "pad_token_id", None) is None:
            kwargs["pad_token_id"] = tok.pad_token_id if tok.pad_token_id is not None else 0
        return kwargs

    def _generate(
        self, inputs: dict[str, Any], prompt_tokens: int, decoding: DecodingOptions,
        gen_kwargs: dict, details: bool = False,
        stream: tuple[StreamListener, list[int]] | None = None,
    ) -> list[str]:  # fmt: skip
        """One generate call. `stream`: (listener, the batch's image indexes) for token streaming
        (greedy/sampled, one sequence per image, a transformers generate) and for stopping the
        rows whose caller left (`listener.cancelled`)."""
        inputs = {k: self._to_device(v) for k, v in inputs.items()}
        if isinstance(inputs.get("encoder_outputs"), tuple):
            # Cached tower outputs as the forward takes them; generate expands a ModelOutput's
            # tensors for beams and num_return_sequences, not a tuple's.
            inputs["encoder_outputs"] = BaseModelOutput(*inputs["encoder_outputs"])
        ends, starts = self._end_ids(gen_kwargs), self._start_ids()
        kwargs = gen_kwargs
        if stream is not None and self._streams(decoding):
            listener, rows = stream
            captions = _Captions(self, inputs, prompt_tokens, decoding, ends, starts)
            kwargs = {
                **gen_kwargs,
                "streamer": _RowStreamer(captions, listener, rows),
                "stopping_criteria": StoppingCriteriaList([_Cancelled(listener, rows)]),
            }
        ids = self.model.generate(**inputs, **kwargs)
        texts = self.family.decode(
            self.processor, ids, inputs, prompt_tokens, keep_prompt=decoding.keep_prompt
        )
        texts = [decoding.finish(" ".join(t.split())) for t in texts]
        if not details:
            return texts
        new = self.family.generated_ids(ids, inputs, prompt_tokens).tolist()
        return [Generated(text, *_count(row, ends, starts)) for text, row in
                zip(texts, new, strict=True)]  # fmt: skip

    def _streams(self, decoding: DecodingOptions) -> bool:
        """Whether generate can hand over its tokens step by step: transformers' generate (not
        an ONNX export's), one greedy or sampled sequence per image (beams reorder theirs)."""
        one = decoding.num_beams == 1 and decoding.num_return_sequences == 1
        return one and isinstance(self.model, GenerationMixin)

    def _end_ids(self, gen_kwargs: dict) -> set[int]:
        eos = gen_kwargs.get("eos_token_id", self.model.generation_config.eos_token_id)
        return set(eos if isinstance(eos, list) else [] if eos is None else [eos])

    def _start_ids(self) -> set[int]:
        config = self.model.generation_config
        starts = {config.bos_token_id, config.decoder_start_token_id, config.pad_token_id}
        return {i for i in starts if i is not None}

    def _to_device(self, value: Any) -> Any:
        """Tensors to the model's device; floating ones (pixels, features) in the model's dtype,
        inside the tuples and dicts cached inputs come in."""
        if isinstance(value, tuple):
            return tuple(self._to_device(v) for v in value)
        if isinstance(value, dict):
            return {k: self._to_device(v) for k, v in value.items()}
        if not isinstance(value, torch.Tensor):
            return value
        if value.is_floating_point():
            return value.to(self.device, self.model.dtype)
        return value.to(self.device)


def _count(row: list[int], ends: set[int], starts: set[int]) -> tuple[int, str]:
    """(tokens generated, finish reason) of one output row after its prompt: leading start and
    pad tokens do not count; an end token stops it ("stop"), running out of tokens is "length"."""
    i = 0
    while i < len(row) and row[i] in starts and row[i] not in ends:
        i += 1
    for j in range(i, len(row)):
        if row[j] in ends:
            return j - i, "stop"
    return len(row) - i, "length"


def _as_list(images: Sequence[Any] | Any) -> Sequence[Any]:
    """One image or many -> a sequence the loader can index."""
    if isinstance(images, (str, bytes, bytearray, dict, os.PathLike, Image.Image)):
        return [images]
    if not (hasattr(images, "__len__") and hasattr(images, "__getitem__")):
        return list(images)
    return images


# ---- streaming: a batch's tokens, step by step, to the images' listeners ----


class _Captions:
    """Captions of a batch's ids so far, decoded as `_generate` decodes the finished ids (the
    family strips the prompt; whitespace normalised; `decoding.finish`), so that what streams
    is a prefix of the caption."""

    def __init__(self, captioner: Captioner, inputs: dict, prompt_tokens: int,
                 decoding: DecodingOptions, ends: set[int], starts: set[int]) -> None:  # fmt: skip
        self.captioner, self.inputs, self.prompt_tokens = captioner, inputs, prompt_tokens
        self.decoding, self.ends, self.starts = decoding, ends, starts
        # a suffix belongs after the whole caption only; the prefix may stream first
        self.partial = decoding.replace(suffix=None)

    def texts(self, ids: torch.Tensor, final: bool) -> list[str]:
        family, c = self.captioner.family, self.captioner
        texts = family.decode(c.processor, ids, self.inputs, self.prompt_tokens,
                              keep_prompt=self.decoding.keep_prompt)  # fmt: skip
        finish = self.decoding.finish if final else self.partial.finish
        return [finish(" ".join(t.split())) for t in texts]

    def generated(self, ids: torch.Tensor, text: str, k: int) -> Generated:
        row = self.captioner.family.generated_ids(ids, self.inputs, self.prompt_tokens)[k]
        return Generated(text, *_count(row.tolist(), self.ends, self.starts))


class _RowStreamer(BaseStreamer):
    """transformers' streamer interface for a whole batch: `put` gets the prompt ids, then
    each step's (batch,) new tokens. Each row's new text goes to its listener as soon as two
    decodes agree on it (one step behind); a row that writes an end token is done at once,
    without waiting for the rest of its batch."""

    def __init__(self, captions: _Captions, listener: StreamListener, rows: list[int]) -> None:
        self.captions, self.listener, self.rows = captions, listener, rows
        self.ids: torch.Tensor | None = None
        self.open = set(range(len(rows)))
        self.shown = [""] * len(rows)  # the text each row's listener has been given
        self.last = [""] * len(rows)  # each row's text at the previous step

    def put(self, value: torch.Tensor) -> None:
        value = value.detach().cpu()
        if self.ids is None:  # the prompt (a decoder's start ids for an encoder-decoder)
            self.ids = value if value.dim() == 2 else value.view(len(self.rows), -1)
            return
        new = value.view(len(self.rows), -1)
        self.ids = torch.cat([self.ids, new], dim=1)
        rows = new.tolist()  # (batch, n): n > 1 when a step accepts several tokens
        ended = {k for k in self.open if self.captions.ends.intersection(rows[k])}
        talking = [k for k in self.open - ended if self.listener.wants_text(self.rows[k])]
        if not ended and not talking:
            return
        texts = self.captions.texts(self.ids, final=False)
        for k in talking:
            # what two steps in a row agree on: the last token may still change its text (a
            # word piece, half a UTF-8 character decoded as U+FFFD, a space cleaned away)
            stable = os.path.commonprefix([self.last[k], texts[k]]).rstrip("\ufffd")
            self.last[k] = texts[k]
            if len(stable) > len(self.shown[k]) and stable.startswith(self.shown[k]):
                self.listener.text(self.rows[k], stable[len(self.shown[k]) :])
                self.shown[k] = stable
        if ended:
            final = self.captions.texts(self.ids, final=True)
            for k in ended:
                self.open.discard(k)
                self.listener.done(self.rows[k], self.captions.generated(self.ids, final[k], k))

    def end(self) -> None:  # the rows still open are done by `caption_iter` with the result
        pass


class _Cancelled(StoppingCriteria):
    """Stops the rows whose caller has gone (a finished batch's end comes sooner)."""

    def __init__(self, listener: StreamListener, rows: list[int]) -> None:
        self.listener, self.rows = listener, rows

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        gone = [self.listener.cancelled(i) for i in self.rows]
        return torch.tensor(gone, dtype=torch.bool, device=input_ids.device)


class _Reconciled:
    """A listener told each image's `done` once, after the text it still lacked: the streamed
    pieces then join to exactly the caption."""

    def __init__(self, listener: StreamListener) -> None:
        self.listener = listener
        self.sent: dict[int, str] = {}
        self.finished: set[int] = set()

    def wants_text(self, index: int) -> bool:
        return self.listener.wants_text(index)

    def cancelled(self, index: int) -> bool:
        return self.listener.cancelled(index)

    def text(self, index: int, delta: str) -> None:
        self.sent[index] = self.sent.get(index, "") + delta
        self.listener.text(index, delta)

    def done(self, index: int, caption: Any) -> None:
        if index in self.finished:
            return
        self.finished.add(index)
        sent = self.sent.pop(index, "")
        if isinstance(caption, str) and len(caption) > len(sent):
            if not caption.startswith(sent):  # a tokenizer whose words changed afterwards
                log.warning("streamed text %r is not the start of caption %r", sent, caption)
            self.listener.text(index, caption[len(sent) :])
        self.listener.done(index, caption)


class _QueueListener:
    """`caption_stream`'s listener: events into a queue for the caller's thread."""

    def __init__(self, events: queue.Queue) -> None:
        self.events = events
        self.stopped = threading.Event()

    def wants_text(self, index: int) -> bool:
        return not self.stopped.is_set()

    def cancelled(self, index: int) -> bool:
        return self.stopped.is_set()

    def text(self, index: int, delta: str) -> None:
        self.events.put(StreamEvent(index, delta))

    def done(self, index: int, caption: Any) -> None:
        self.events.put(StreamEvent(index, "", caption))
