"""GIT's two graphs and the runner that decodes with them.

- `image_encoder.onnx`: pixel_values -> the key/value cache of the image positions, every layer;
- `text_decoder.onnx`: one token per sequence, its position and the cache -> next-token logits
  and the cache grown by that token.

In GIT the image tokens attend only to each other, so their per-layer keys and values do not
depend on the text: the encoder graph computes them once per image, and each decoding step runs
one token per sequence against that cache (a KV cache, not a re-run of the whole prefix).
The graphs are traced from wrappers that call the model's own modules (embeddings, projections,
layer norms, MLPs); only the attention product is written out, because the cache is passed as
plain tensors (GIT predates transformers' Cache objects, so the generic exporter in graphs.py,
which drives the model's own forward, does not apply).
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from captioner.models.export.runtime import OnnxModel, State, cache_names, session

ENCODER_FILE = "image_encoder.onnx"
DECODER_FILE = "text_decoder.onnx"
OPSET = 17


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(batch, tokens, hidden) -> (batch, heads, tokens, head_size)."""
    return x.reshape(x.shape[0], x.shape[1], heads, -1).transpose(1, 2)


def _finish_layer(layer: nn.Module, hidden, q, k, v) -> torch.Tensor:
    """The rest of a GitLayer after its query/key/value: attention, output, MLP (no mask: image
    tokens see every image token, and a new text token sees everything before it)."""
    scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    context = torch.matmul(torch.softmax(scores, dim=-1), v)
    context = context.transpose(1, 2).reshape(hidden.shape)
    attended = layer.attention.output(context, hidden)
    return layer.output(layer.intermediate(attended), attended)


def _qkv(layer: nn.Module, hidden: torch.Tensor, heads: int):
    attn = layer.attention.self
    return tuple(_heads(proj(hidden), heads) for proj in (attn.query, attn.key, attn.value))


class _GitImageCache(nn.Module):
    """pixel_values -> (key, value) of the image positions for every decoder layer."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.git = model.git
        self.heads = model.config.num_attention_heads

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        git = self.git
        hidden = git.visual_projection(git.image_encoder(pixel_values).last_hidden_state)
        cache: list[torch.Tensor] = []
        layers = list(git.encoder.layer)
        for i, layer in enumerate(layers):
            q, k, v = _qkv(layer, hidden, self.heads)
            cache += [k, v]
            if i < len(layers) - 1:  # the last layer's image outputs feed nothing
                hidden = _finish_layer(layer, hidden, q, k, v)
        return tuple(cache)


class _GitTextStep(nn.Module):
    """One new token per sequence, at `position_ids`, with the cache -> (logits, new cache)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.git = model.git
        self.lm_head = model.output
        self.heads = model.config.num_attention_heads

    def forward(self, input_ids, position_ids, *past: torch.Tensor) -> tuple[torch.Tensor, ...]:
        hidden = self.git.embeddings(input_ids=input_ids, position_ids=position_ids)
        present: list[torch.Tensor] = []
        for i, layer in enumerate(self.git.encoder.layer):
            q, k, v = _qkv(layer, hidden, self.heads)
            k = torch.cat([past[2 * i], k], dim=2)
            v = torch.cat([past[2 * i + 1], v], dim=2)
            hidden = _finish_layer(layer, hidden, q, k, v)
            present += [k, v]
        return (self.lm_head(hidden[:, -1]), *present)


def export_git(model: nn.Module, encoder_path: Path, decoder_path: Path) -> None:
    """The two GIT graphs (the module docstring), traced with torch.onnx's legacy exporter."""
    cfg = model.config
    layers = cfg.num_hidden_layers
    size = cfg.vision_config.image_size
    # batch 2 and a past longer than one, so that no size is traced as a constant
    pixels = torch.randn(2, 3, size, size)
    past_names, present_names = cache_names("past", layers), cache_names("present", layers)
    cache_axes = {0: "batch", 2: "cached"}
    with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about python ints are expected here
        image_cache = _GitImageCache(model)
        past = image_cache(pixels)
        torch.onnx.export(
            image_cache,
            (pixels,),
            str(encoder_path),
            input_names=["pixel_values"],
            output_names=present_names,
            dynamic_axes={"pixel_values": {0: "batch"}, **dict.fromkeys(present_names, cache_axes)},
            opset_version=OPSET,
            dynamo=False,
        )
        ids = torch.tensor([[cfg.bos_token_id or 0], [1]], dtype=torch.long)
        positions = torch.tensor([[0], [0]], dtype=torch.long)
        text_axes = {0: "batch"}
        torch.onnx.export(
            _GitTextStep(model),
            (ids, positions, *past),
            str(decoder_path),
            input_names=["input_ids", "position_ids", *past_names],
            output_names=["logits", *present_names],
            dynamic_axes={
                "input_ids": text_axes,
                "position_ids": text_axes,
                "logits": text_axes,
                **dict.fromkeys(past_names, cache_axes),
                **dict.fromkeys(present_names, {0: "batch", 2: "total"}),
            },
            opset_version=OPSET,
            dynamo=False,
        )


class OnnxGitModel(OnnxModel):
    """An exported GIT: the image graph fills the cache, the text graph runs one token a step."""

    def __init__(self, path: str | Path) -> None:
        super().__init__(path)
        self.encoder = session(self.path / self.meta["encoder"])
        self.decoder = session(self.path / self.meta["decoder"])
        self._past_names = cache_names("past", self.meta["layers"])

    def _start(self, inputs: dict[str, torch.Tensor]):
        pixels = inputs["pixel_values"].to(torch.float32).numpy()
        cache = self.encoder.run(None, {"pixel_values": pixels})
        ids = inputs.get("input_ids")
        if ids is None:
            gen = self.generation_config
            start = gen.bos_token_id if gen.bos_token_id is not None else self.config.bos_token_id
            ids = torch.full((len(pixels), 1), start, dtype=torch.long)
        state: State = dict(zip(self._past_names, cache, strict=True))
        state["position"] = np.zeros(len(pixels), dtype=np.int64)
        logits = None
        for t in range(ids.shape[1]):  # the start token and any prompt, one step each
            logits = self._next(state, ids[:, t].numpy().astype(np.int64))
        return ids, state, logits

    def _next(self, state: State, tokens: np.ndarray) -> np.ndarray:
        feed = {
            "input_ids": tokens.reshape(-1, 1),
            "position_ids": state["position"].reshape(-1, 1),
            **{name: state[name] for name in self._past_names},
        }
        logits, *present = self.decoder.run(None, feed)
        state.update(zip(self._past_names, present, strict=True))
        state["position"] = state["position"] + 1
        return logits
