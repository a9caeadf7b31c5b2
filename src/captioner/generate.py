"""The one batched captioning engine: images in, captions out.

`captioner caption`, `captioner eval`, the training callback, the server and the demo all call
`Captioner.caption` (or its streaming twin `caption_iter`), so speed-ups and fixes land everywhere.

Why it is fast compared with the guide's loop (one image, `generate(max_length=50)`):
- images are decoded and preprocessed in a background DataLoader worker while the model runs;
- many images share one `generate` call (the per-step Python overhead is paid once per batch);
- `torch.inference_mode` and the KV cache (`use_cache=True`).

Why batching does not change captions: every item in a batch has the same image size (the
processor resizes) and the same prompt, so nothing is padded; greedy captions are the same as
one-at-a-time captions (tested).

Model families differ only in how the prompt is turned into ids (`_prompt_kwargs`).
"""

from __future__ import annotations

import logging
import os
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from captioner.errors import BadImageError, CaptionerError

log = logging.getLogger(__name__)

URL_TIMEOUT_S = 20.0
URL_MAX_BYTES = 20 * 1024 * 1024
# Measured (bench/RESULTS.md, 2 cores, torch's default threads): the `small` preset captions at
# 35 images/s in batches of 32 and 49 in batches of 96; per-step generate overhead keeps paying
# off well past 32 for small models, and the memory check below lowers it for big ones.
CPU_MAX_BATCH = 96
GPU_MAX_BATCH = 256


def is_url(src: Any) -> bool:
    return isinstance(src, str) and src.lower().startswith(("http://", "https://"))


def fetch_url(url: str, *, timeout: float | None = None, max_bytes: int | None = None) -> bytes:
    """Download `url` with a timeout and a byte limit; failures become BadImageError(url, why)."""
    timeout = URL_TIMEOUT_S if timeout is None else timeout
    max_bytes = URL_MAX_BYTES if max_bytes is None else max_bytes
    req = urllib.request.Request(url, headers={"User-Agent": "captioner"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310 (http/https only)
            data = resp.read(max_bytes + 1)
    except urllib.error.HTTPError as err:
        raise BadImageError(url, f"download failed: HTTP {err.code} {err.reason}") from None
    except (urllib.error.URLError, OSError, ValueError) as err:
        reason = getattr(err, "reason", err)
        raise BadImageError(url, f"download failed (no network?): {reason}") from None
    if len(data) > max_bytes:
        raise BadImageError(url, f"download larger than the {max_bytes} byte limit")
    return data


def open_image(src: Any):
    """Any supported source (path, URL, bytes, PIL image, datasets image dict) -> RGB PIL image."""
    from captioner.images import load_image

    if is_url(src):
        try:
            return load_image(fetch_url(src))
        except BadImageError as err:
            if err.path == src:
                raise
            raise BadImageError(src, err.reason) from None
    return load_image(src)


def source_name(src: Any) -> str:
    """A short printable name for an image source (used in errors and output rows)."""
    if isinstance(src, dict):
        return str(src.get("path") or "<image bytes>")
    if isinstance(src, (bytes, bytearray)):
        return "<image bytes>"
    if hasattr(src, "size") and hasattr(src, "mode"):
        return getattr(src, "filename", "") or "<PIL image>"
    return str(src)


class _Images(torch.utils.data.Dataset):
    """Decodes + preprocesses one image per item; a bad image becomes its BadImageError."""

    def __init__(self, sources: Sequence[Any], image_processor) -> None:
        self.sources = sources
        self.image_processor = image_processor

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, i: int):
        src = self.sources[i]
        try:
            image = open_image(src)
            pixels = self.image_processor(images=image, return_tensors="pt").pixel_values[0]
        except BadImageError as err:
            return i, err
        except Exception as err:  # the processor choking on an odd image is a per-item failure
            return i, BadImageError(source_name(src), f"cannot preprocess: {err}")
        return i, pixels


def _collate(items):
    return items  # keep (index, pixels | error) pairs; stacking happens after errors are removed


class Captioner:
    """Batched captioning with any supported model (GIT, BLIP, VisionEncoderDecoder)."""

    def __init__(self, model, processor, device: str | torch.device | None = None) -> None:
        if device is None:  # a model already on an accelerator (training) stays where it is
            current = next(model.parameters()).device
            on_cpu = current.type == "cpu"
            device = ("cuda" if torch.cuda.is_available() else "cpu") if on_cpu else current
        self.device = torch.device(device)
        self.model = model.to(self.device)
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.image_processor = getattr(processor, "image_processor", processor)
        self.family = model.config.model_type

    @classmethod
    def from_pretrained(
        cls,
        name_or_path,
        *,
        device: str | torch.device | None = None,
        trust_remote_code: bool = False,
    ) -> Captioner:
        from captioner.models import load_model

        model, processor = load_model(name_or_path, trust_remote_code=trust_remote_code)
        return cls(model, processor, device=device)

    # ---- public API ----

    def caption(self, images: Sequence[Any] | Any, **kwargs) -> list[str] | list[list[str]]:
        """Caption `images` (a list, or one image); raises BadImageError on the first bad one.

        Keyword arguments are those of `caption_iter` (decoding options, batch_size, progress).
        Returns one string per image, or a list of `num_return_sequences` strings per image when
        that is > 1. With a `prompt`, captions start with the prompt (it is part of the caption).
        """
        if isinstance(images, (str, bytes, bytearray, dict, os.PathLike)) or hasattr(
            images, "mode"
        ):
            images = [images]
        elif not (hasattr(images, "__len__") and hasattr(images, "__getitem__")):
            images = list(images)
        out: list[Any] = [None] * len(images)
        for i, result in self.caption_iter(images, **kwargs):
            if isinstance(result, BadImageError):
                raise result
            out[i] = result
        return out

    @torch.inference_mode()
    def caption_iter(
        self,
        images: Sequence[Any],
        *,
        batch_size: int | None = None,
        num_beams: int = 1,
        max_new_tokens: int = 30,
        do_sample: bool = False,
        top_p: float | None = None,
        temperature: float | None = None,
        num_return_sequences: int = 1,
        repetition_penalty: float | None = None,
        prompt: str | None = None,
        bad_words: Sequence[str] | None = None,
        num_workers: int | None = None,
        progress: bool = False,
    ) -> Iterator[tuple[int, str | list[str] | BadImageError]]:
        """Yield `(index, caption)` in input order, batch by batch, for big jobs.

        A bad image yields `(index, BadImageError)` instead of stopping the run. `caption` is
        a str, or a list of `num_return_sequences` strs when that is > 1.
        """
        if not (hasattr(images, "__len__") and hasattr(images, "__getitem__")):
            images = list(images)  # a generator: the loader needs random access
        if not images:
            return
        if num_return_sequences > 1 and not do_sample and num_return_sequences > num_beams:
            raise CaptionerError(
                f"num_return_sequences={num_return_sequences} needs --do_sample or "
                f"--num_beams >= {num_return_sequences}"
            )
        per_image = max(num_beams, 1) * (num_return_sequences if do_sample else 1)
        if batch_size is None:
            batch_size = self.auto_batch_size(per_image, max_new_tokens)
        batch_size = max(1, min(batch_size, len(images)))
        if num_workers is None:
            # A worker process costs ~1 s to start; worth it only when there is work to overlap.
            num_workers = 1 if len(images) > 2 * batch_size else 0
        loader = torch.utils.data.DataLoader(
            _Images(images, self.image_processor),
            batch_size=batch_size,
            num_workers=num_workers,
            collate_fn=_collate,
            pin_memory=self.device.type == "cuda",
        )
        gen_kwargs = self._generate_kwargs(
            num_beams=num_beams,
            max_new_tokens=max_new_tokens,
            do_sample=do_sample,
            top_p=top_p,
            temperature=temperature,
            num_return_sequences=num_return_sequences,
            repetition_penalty=repetition_penalty,
            bad_words=bad_words,
        )
        n_out = num_return_sequences
        bar = _progress(len(images)) if progress else None
        was_training = self.model.training  # the training callback passes the live model
        self.model.eval()
        try:
            for batch in loader:
                good = [(i, px) for i, px in batch if not isinstance(px, BadImageError)]
                captions: dict[int, Any] = {}
                if good:
                    pixels = torch.stack([px for _, px in good]).to(self.device, self.model.dtype)
                    texts = self._generate(pixels, prompt, gen_kwargs)
                    for k, (i, _) in enumerate(good):
                        group = texts[k * n_out : (k + 1) * n_out]
                        captions[i] = group if n_out > 1 else group[0]
                for i, px in batch:
                    yield i, (px if isinstance(px, BadImageError) else captions[i])
                if bar is not None:
                    bar[0].advance(bar[1], len(batch))
        finally:
            self.model.train(was_training)
            if bar is not None:
                bar[0].stop()

    def auto_batch_size(self, sequences_per_image: int = 1, max_new_tokens: int = 30) -> int:
        """Images per `generate` call: a cap (96 on CPU, 256 on GPU), lowered so the KV cache and
        activations fit a quarter of free memory."""
        cfg = self.model.config
        text = cfg.get_text_config(decoder=True)
        layers = getattr(text, "num_hidden_layers", 12)
        hidden = getattr(text, "hidden_size", 768)
        vision = getattr(cfg, "vision_config", None) or getattr(cfg, "encoder", None)
        n_img = 256
        if vision is not None and getattr(vision, "patch_size", None):
            n_img = (vision.image_size // vision.patch_size) ** 2 + 1
        elt = torch.finfo(self.model.dtype).bits // 8
        # keys+values per layer, x2 slack for activations / the vision encoder / beam reorders.
        per_seq = 4 * layers * (n_img + max_new_tokens) * hidden * elt
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            cap = GPU_MAX_BATCH
        else:
            import psutil

            free, cap = psutil.virtual_memory().available, CPU_MAX_BATCH
        fits = int(free * 0.25) // max(per_seq * sequences_per_image, 1)
        return int(max(1, min(cap, fits)))

    # ---- internals ----

    def _generate_kwargs(
        self, *, bad_words, do_sample, top_p, temperature, repetition_penalty, **kw
    ) -> dict:
        kwargs = dict(kw, do_sample=do_sample, use_cache=True)
        if do_sample:
            if top_p is not None:
                kwargs["top_p"] = top_p
            if temperature is not None:
                kwargs["temperature"] = temperature
        elif top_p is not None or temperature is not None:
            raise CaptionerError("--top_p / --temperature only apply with --do_sample")
        if repetition_penalty is not None:
            kwargs["repetition_penalty"] = repetition_penalty
        if bad_words:
            kwargs["bad_words_ids"] = self.bad_words_ids(bad_words)
        tok = self.tokenizer
        if getattr(self.model.generation_config, "pad_token_id", None) is None:
            kwargs["pad_token_id"] = tok.pad_token_id if tok.pad_token_id is not None else 0
        return kwargs

    def bad_words_ids(self, words: Sequence[str]) -> list[list[int]]:
        """Token id sequences for each word, as it appears mid-sentence and capitalised.

        Words the tokenizer can only spell with [UNK] are skipped: banning [UNK] would ban
        every unknown word, and the model cannot produce the word anyway.
        """
        out: list[list[int]] = []
        unk = self.tokenizer.unk_token_id
        for word in words:
            word = word.strip()
            for variant in {word, " " + word, word.capitalize(), " " + word.capitalize()}:
                ids = self.tokenizer(variant, add_special_tokens=False).input_ids
                if ids and unk not in ids and ids not in out:
                    out.append(ids)
        return out

    def _prompt_kwargs(self, prompt: str | None, n: int) -> dict:
        """Prompt ids for a batch of `n` (all items share the prompt, so no padding)."""
        if not prompt:
            return {}
        tok = self.tokenizer
        ids = tok(prompt, add_special_tokens=False).input_ids
        if self.family == "git":
            # As GIT's docs: [CLS] + prompt, without the trailing [SEP] (that would end it).
            start = self.model.config.bos_token_id
            start = tok.cls_token_id if start is None else start
            key, ids = "input_ids", [start, *ids]
        elif self.family == "blip":
            # BLIP's generate swaps the first id for BOS and drops the last ([SEP]).
            key, ids = "input_ids", tok(prompt).input_ids
        else:  # vision-encoder-decoder: the prompt continues the decoder start token
            key, ids = "decoder_input_ids", [self.model.config.decoder_start_token_id, *ids]
        return {key: torch.tensor([ids] * n, device=self.device)}

    def _generate(self, pixels: torch.Tensor, prompt: str | None, gen_kwargs: dict) -> list[str]:
        ids = self.model.generate(
            pixel_values=pixels, **self._prompt_kwargs(prompt, len(pixels)), **gen_kwargs
        )
        texts = self.tokenizer.batch_decode(ids, skip_special_tokens=True)
        return [" ".join(t.split()) for t in texts]


def _progress(total: int):
    """A rich progress bar on stderr showing images/s; returns (progress, task)."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        ProgressColumn,
        TextColumn,
        TimeRemainingColumn,
    )
    from rich.text import Text

    class ImagesPerSecond(ProgressColumn):
        def render(self, task) -> Text:
            rate = task.completed / task.elapsed if task.elapsed else 0.0
            return Text(f"{rate:.1f} img/s", style="cyan")

    progress = Progress(
        TextColumn("captioning"),
        BarColumn(),
        MofNCompleteColumn(),
        ImagesPerSecond(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
    )
    task = progress.add_task("caption", total=total)
    progress.start()
    return progress, task
