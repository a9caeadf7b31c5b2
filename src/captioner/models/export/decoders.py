"""Graphs and runners for the families that declare `OnnxParts` (families/onnx_parts.py).

Each export is two graphs traced from wrappers around the model's own forward, so a new family
gets them by declaring its parts:

- `cross` (VisionEncoderDecoder): `vision.onnx` maps pixels to the encoder states *and* every
  decoder layer's cross-attention keys/values (computed once per image by one decoder call on
  the start token, instead of at every step); `text_decoder.onnx` runs one token per sequence
  against its self-attention past and those cross keys/values.
- `embeds` (LLaVA, chat models): `vision.onnx` maps the processor's image inputs to image
  features; `text_decoder.onnx` is the model on `inputs_embeds` with a past, run once on the
  whole prompt (image features merged into the token embeddings in numpy, from the embedding
  table saved as `embed_tokens.npy`) and then one token a step.

The cache crosses the graph boundary as flat tensors (`past.{i}.key`, ...): the wrappers build
transformers' `DynamicCache` / `EncoderDecoderCache` from them and return what the model added.
Positions are explicit inputs, and the embeds step gets a ready 4-D mask (transformers returns
one as-is), because lengths read from the cache would be traced as constants.
"""

from __future__ import annotations

import inspect
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn
from transformers.cache_utils import DynamicCache, EncoderDecoderCache

from captioner.errors import CaptionerError
from captioner.models.export.runtime import OnnxModel, State, cache_names, session
from captioner.models.families import Family
from captioner.models.families.onnx_parts import OnnxParts

VISION_FILE = "vision.onnx"
TEXT_FILE = "text_decoder.onnx"
TABLE_FILE = "embed_tokens.npy"
OPSET = 17
TRACE_PAST = 3  # a past longer than one and a batch of two: no size is traced as a constant


def _flat(cache: DynamicCache) -> list[torch.Tensor]:
    return [t for layer in cache.layers for t in (layer.keys, layer.values)]


def _pairs(flat: tuple[torch.Tensor, ...]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(flat[i], flat[i + 1]) for i in range(0, len(flat), 2)]


def _cache_kwarg(module: nn.Module) -> str:
    """transformers 5 renames `past_key_values` to `cache` model by model."""
    params = inspect.signature(module.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


class _CrossVision(nn.Module):
    """pixels -> (encoder states, every decoder layer's cross-attention key and value)."""

    def __init__(self, parts: OnnxParts, start_token: int) -> None:
        super().__init__()
        self.vision, self.decoder, self.start = parts.vision, parts.text, start_token

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        states = self.vision(*inputs)
        cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
        start = torch.full((states.shape[0], 1), self.start, dtype=torch.long)
        self.decoder(input_ids=start, encoder_hidden_states=states, use_cache=True,
                     **{_cache_kwarg(self.decoder): cache})  # fmt: skip
        return (states, *_flat(cache.cross_attention_cache))


class _CrossStep(nn.Module):
    """One token per sequence with the self-attention past and the cross keys/values -> (next
    logits, the grown past). The encoder states only gate the cross-attention blocks."""

    def __init__(self, decoder: nn.Module, layers: int) -> None:
        super().__init__()
        self.decoder, self.layers = decoder, layers

    def forward(self, input_ids, position_ids, states, *kv: torch.Tensor):
        past, cross = kv[: 2 * self.layers], kv[2 * self.layers :]
        cache = EncoderDecoderCache(DynamicCache(_pairs(past)), DynamicCache(_pairs(cross)))
        out = self.decoder(
            input_ids=input_ids, position_ids=position_ids, encoder_hidden_states=states,
            use_cache=True, **{_cache_kwarg(self.decoder): cache},
        )  # fmt: skip
        return (out.logits[:, -1], *_flat(cache.self_attention_cache))


class _EmbedsStep(nn.Module):
    """(inputs_embeds, 2-D attention mask over past + new, positions, [image positions over
    past + new], past) -> (logits of the last position, the grown past)."""

    def __init__(self, model: nn.Module, image_blocks: bool) -> None:
        super().__init__()
        self.model, self.image_blocks = model, image_blocks

    def forward(self, inputs_embeds, attention_mask, position_ids, *rest: torch.Tensor):
        past = rest[1:] if self.image_blocks else rest
        total, new = attention_mask.shape[1], inputs_embeds.shape[1]
        keys = torch.arange(total).view(1, -1)
        queries = (torch.arange(new) + (total - new)).view(-1, 1)
        # causal, minus padding; a padding query sees itself so that its row is never all -inf
        seen = (keys <= queries) & (attention_mask[:, None, None, :].bool() | (keys == queries))
        if self.image_blocks:  # image tokens also see the image tokens after them
            image = rest[0].bool()
            seen = seen | (image[:, None, total - new :, None] & image[:, None, None, :])
        mask = torch.zeros(seen.shape, dtype=inputs_embeds.dtype).masked_fill(
            ~seen, torch.finfo(inputs_embeds.dtype).min
        )
        cache = DynamicCache(_pairs(past))
        out = self.model(
            inputs_embeds=inputs_embeds, attention_mask=mask, position_ids=position_ids,
            use_cache=True, logits_to_keep=1, **{_cache_kwarg(self.model): cache},
        )  # fmt: skip
        return (out.logits[:, -1], *_flat(cache))


def _export(module, args, path: Path, inputs: list[str], outputs: list[str], axes: dict) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about python ints are expected here
        try:
            torch.onnx.export(
                module, tuple(args), str(path), input_names=inputs, output_names=outputs,
                dynamic_axes=axes, opset_version=OPSET, dynamo=False,
            )  # fmt: skip
        except Exception as err:  # noqa: BLE001 - an op the tracer cannot express: one line
            first = (str(err).strip().splitlines() or [""])[0][:160]
            raise CaptionerError(
                f"cannot export this model to ONNX: torch.onnx cannot trace its {path.stem} "
                f"graph ({type(err).__name__}: {first})"
            ) from None


def _example(family: Family, processor, config) -> dict[str, Any]:
    """Generation inputs for two different images, as the engine makes them."""
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)) for _ in "ab"]
    inputs, _ = family.generation_inputs(processor, images, None, config)
    return inputs


def export_parts(
    model: nn.Module, parts: OnnxParts, family: Family, processor, folder: Path
) -> dict[str, Any]:
    """Write both graphs (and the embedding table) into `folder`; the format file's entries."""
    example = _example(family, processor, model.config)
    missing = [n for n in parts.vision_inputs if n not in example]
    if missing:
        raise CaptionerError(f"cannot export to ONNX: the processor makes no {missing[0]}")
    vision_args = [example[n] for n in parts.vision_inputs]
    batch = {n: {0: "batch"} for n in parts.vision_inputs}
    meta: dict[str, Any] = {"kind": parts.kind, "vision": VISION_FILE, "decoder": TEXT_FILE,
                            "vision_inputs": list(parts.vision_inputs)}  # fmt: skip
    with torch.inference_mode(False), torch.no_grad():
        if parts.kind == "cross":
            start = model.generation_config.decoder_start_token_id
            if start is None:
                start = model.config.decoder_start_token_id
            vision = _CrossVision(parts, start)
            states, *cross = vision(*vision_args)
            layers = len(cross) // 2
            cross_names = cache_names("cross", layers)
            outputs = ["encoder_hidden_states", *cross_names]
            _export(vision, vision_args, folder / VISION_FILE, list(parts.vision_inputs), outputs,
                    {**batch, **{n: {0: "batch"} for n in outputs}})  # fmt: skip
            pasts = _self_past_shapes(parts.text, states, start)
            step_args = [torch.tensor([[start], [1]]), torch.full((2, 1), TRACE_PAST), states]
            step = _CrossStep(parts.text, layers)
            fixed = cross_names
            fixed_args = cross
            meta["start_token"] = start
        else:
            vision = parts.vision
            features = vision(*vision_args)
            _export(vision, vision_args, folder / VISION_FILE, list(parts.vision_inputs),
                    ["image_features"], {**batch, "image_features": {0: "batch"}})  # fmt: skip
            table = _embedding_table(parts.text)
            np.save(folder / TABLE_FILE, table)
            embeds = torch.from_numpy(table[:4]).expand(2, 4, -1).contiguous()
            mask = torch.ones(2, TRACE_PAST + 4, dtype=torch.long)
            mask[0, :2] = 0  # a left-padded row
            step_args = [embeds, mask, torch.arange(TRACE_PAST, TRACE_PAST + 4).expand(2, 4)]
            if parts.image_blocks:
                step_args.append(torch.zeros_like(mask).index_fill(1, torch.tensor([3, 4]), 1))
            pasts = _lm_past_shapes(parts.text, features)
            step, fixed, fixed_args = _EmbedsStep(parts.text, parts.image_blocks), [], []
            meta.update(table=TABLE_FILE, image_token_id=parts.image_token_id,
                        hidden=int(features.shape[-1]))  # fmt: skip
        past = [torch.randn(2, heads, TRACE_PAST, size) for heads, size in pasts]
        layers = len(pasts) // 2
        past_names, present_names = cache_names("past", layers), cache_names("present", layers)
        step_inputs = (["input_ids", "position_ids", "encoder_hidden_states"]
                       if parts.kind == "cross" else
                       ["inputs_embeds", "attention_mask", "position_ids",
                        *(["image_positions"] if parts.image_blocks else [])])  # fmt: skip
        axes = {n: {0: "batch", 1: "new"} for n in step_inputs}
        axes.update({n: {0: "batch", 2: "past"} for n in past_names})
        axes.update({n: {0: "batch", 2: "total"} for n in present_names})
        axes.update({n: {0: "batch"} for n in ["logits", *fixed]})
        for name in ("attention_mask", "image_positions"):
            if name in step_inputs:
                axes[name] = {0: "batch", 1: "total"}
        _export(step, [*step_args, *past, *fixed_args], folder / TEXT_FILE,
                [*step_inputs, *past_names, *fixed], ["logits", *present_names], axes)  # fmt: skip
    meta["past_shapes"] = [list(s) for s in pasts]
    return meta


def _self_past_shapes(decoder: nn.Module, states: torch.Tensor, start: int) -> list[tuple]:
    cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
    ids = torch.full((states.shape[0], 1), start, dtype=torch.long)
    decoder(input_ids=ids, encoder_hidden_states=states, use_cache=True,
            **{_cache_kwarg(decoder): cache})  # fmt: skip
    return [(t.shape[1], t.shape[3]) for t in _flat(cache.self_attention_cache)]


def _lm_past_shapes(model: nn.Module, features: torch.Tensor) -> list[tuple]:
    out = model(inputs_embeds=features[:, :2], use_cache=True, logits_to_keep=1)
    return [(t.shape[1], t.shape[3]) for t in _flat(out.past_key_values)]


def _embedding_table(model: nn.Module) -> np.ndarray:
    """Every token's input embedding, through the module (some scale their embeddings)."""
    embed = model.get_input_embeddings()
    return embed(torch.arange(embed.num_embeddings)).float().numpy()


# ---- the runners ----


class _StepModel(OnnxModel):
    """Both graphs as sessions; the past lives in the state under `past.{i}.{key,value}`."""

    def __init__(self, path: str | Path) -> None:
        super().__init__(path)
        self.vision = session(self.path / self.meta["vision"])
        self.decoder = session(self.path / self.meta["decoder"])
        self._shapes = [tuple(s) for s in self.meta["past_shapes"]]
        self._past = cache_names("past", len(self._shapes) // 2)
        self._wanted = {i.name for i in self.decoder.get_inputs()}  # unused inputs are pruned

    def _empty_past(self, rows: int) -> State:
        return {name: np.zeros((rows, heads, 0, size), np.float32)
                for name, (heads, size) in zip(self._past, self._shapes, strict=True)}  # fmt: skip

    def _run_vision(self, inputs: dict[str, torch.Tensor]) -> list[np.ndarray]:
        feed = {}
        for name in self.meta["vision_inputs"]:
            value = inputs[name]
            feed[name] = (value.float() if value.is_floating_point() else value).numpy()
        return self.vision.run(None, feed)

    def _run_step(self, state: State, feed: dict[str, np.ndarray]) -> np.ndarray:
        feed.update({k: v for k, v in state.items() if k in self._wanted})
        logits, *present = self.decoder.run(None, {k: v for k, v in feed.items()
                                                   if k in self._wanted})  # fmt: skip
        state.update(zip(self._past, present, strict=True))
        return logits


class OnnxCrossModel(_StepModel):
    """An exported VisionEncoderDecoder: ids are the decoder's (start token, prompt, caption)."""

    def _start(self, inputs: dict[str, torch.Tensor]):
        states, *cross = self._run_vision(inputs)
        rows = len(states)
        ids = inputs.get("decoder_input_ids")
        if ids is None:
            ids = torch.full((rows, 1), self.meta["start_token"], dtype=torch.long)
        state = self._empty_past(rows)
        state["encoder_hidden_states"] = states
        state.update(zip(cache_names("cross", len(cross) // 2), cross, strict=True))
        state["position"] = np.zeros(rows, dtype=np.int64)
        logits = None
        for t in range(ids.shape[1]):  # the start token and any prompt, one step each
            logits = self._next(state, ids[:, t].numpy().astype(np.int64))
        return ids, state, logits

    def _next(self, state: State, tokens: np.ndarray) -> np.ndarray:
        position = state["position"]
        feed = {"input_ids": tokens.reshape(-1, 1), "position_ids": position.reshape(-1, 1)}
        logits = self._run_step(state, feed)
        state["position"] = position + 1
        return logits


class OnnxEmbedsModel(_StepModel):
    """An exported LLaVA / chat model: ids are the prompt (image tokens included), then the
    caption, as the model's own `generate` returns them."""

    def __init__(self, path: str | Path) -> None:
        super().__init__(path)
        self.table = np.load(self.path / self.meta["table"], mmap_mode="r")

    def _start(self, inputs: dict[str, torch.Tensor]):
        (features,) = self._run_vision(inputs)
        ids = inputs["input_ids"].numpy()
        mask = inputs.get("attention_mask")
        mask = np.ones_like(ids) if mask is None else mask.numpy().astype(np.int64)
        embeds = np.asarray(self.table[ids], dtype=np.float32)
        where = ids == self.meta["image_token_id"]
        if where.sum() != features.shape[0] * features.shape[1]:
            raise CaptionerError(
                f"the prompt has {int(where.sum())} image tokens for "
                f"{features.shape[0] * features.shape[1]} image features"
            )
        embeds[where] = features.reshape(-1, features.shape[-1])
        positions = np.clip(mask.cumsum(1) - 1, 0, None)
        state = self._empty_past(len(ids))
        state["attention_mask"] = mask
        state["image_positions"] = where.astype(np.int64)  # fed where the graph takes it
        feed = {"inputs_embeds": embeds, "position_ids": positions}
        logits = self._run_step(state, feed)
        state["position"] = positions[:, -1] + 1
        return inputs["input_ids"], state, logits

    def _next(self, state: State, tokens: np.ndarray) -> np.ndarray:
        rows = len(tokens)
        for name, value in (("attention_mask", 1), ("image_positions", 0)):
            grown = np.full((rows, 1), value, np.int64)
            state[name] = np.concatenate([state[name], grown], axis=1)
        feed = {
            "inputs_embeds": np.asarray(self.table[tokens], dtype=np.float32)[:, None],
            "position_ids": state["position"].reshape(-1, 1),
        }
        logits = self._run_step(state, feed)
        state["position"] = state["position"] + 1
        return logits


RUNNERS = {"cross": OnnxCrossModel, "embeds": OnnxEmbedsModel}
