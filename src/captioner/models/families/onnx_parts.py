"""What a family declares so that `captioner export --format onnx` can export it: `OnnxParts`.

The exporter (models/export/) turns the parts into two graphs and one runner; a family only
says which modules they are and which of the processor's outputs reach the vision graph. Two
shapes of captioner cover every exportable family:

- `cross`: a vision tower whose output a text decoder cross-attends to (VisionEncoderDecoder).
  `vision` maps pixels to `encoder_hidden_states`; `text` is the decoder (a `*ForCausalLM` with
  cross-attention, called with a transformers `EncoderDecoderCache`).
- `embeds`: image features that replace the embeddings of the image tokens in a decoder-only LM
  (LLaVA, the chat family). `vision` maps the processor's image inputs to those features (what
  the model's own `get_image_features` returns, projector included); `text` is the whole model,
  called with `inputs_embeds` (no pixels: the features are already in the embeddings).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class OnnxParts:
    kind: str  # "cross" or "embeds" (above)
    vision: nn.Module
    text: nn.Module
    # Processor outputs the vision graph takes, in order (pixel_values first).
    vision_inputs: tuple[str, ...] = ("pixel_values",)
    image_token_id: int | None = None  # embeds: the token whose embeddings are the features
    # embeds: the image tokens of a prompt attend to each other both ways (Gemma 3, whose
    # forward takes token_type_ids for that), not only causally
    image_blocks: bool = False


class EncoderStates(nn.Module):
    """VisionEncoderDecoder's encoder as its forward runs it: pixels -> the states the decoder
    cross-attends to (through `enc_to_dec_proj` when the hidden sizes differ)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.encoder = model.encoder
        self.proj = getattr(model, "enc_to_dec_proj", None)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        states = self.encoder(pixel_values=pixel_values).last_hidden_state
        return states if self.proj is None else self.proj(states)


class ProjectedFeatures(nn.Module):
    """Tower features (a module whose output has `last_hidden_state`) through a projector, as
    one tensor: what a model's `get_image_features` computes before it splits the batch into a
    list per image (a split the tracer would freeze to the example's batch size)."""

    def __init__(self, features: nn.Module, projector: nn.Module) -> None:
        super().__init__()
        self.features, self.projector = features, projector

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.projector(self.features(pixel_values).last_hidden_state)


class ImageFeatures(nn.Module):
    """The model's own `get_image_features` (tower + projector / connector), flattened to
    (batch, image tokens, hidden): one image per row, as captioner batches them."""

    def __init__(self, model: nn.Module, input_names: tuple[str, ...]) -> None:
        super().__init__()
        self.model = model
        self.input_names = input_names

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        out = self.model.get_image_features(**dict(zip(self.input_names, inputs, strict=True)))
        if not isinstance(out, torch.Tensor):
            pooled = getattr(out, "pooler_output", None)
            out = pooled if pooled is not None else out[0]
        if isinstance(out, (list, tuple)):
            out = torch.cat([o.reshape(-1, o.shape[-1]) for o in out])
        return out.reshape(inputs[0].shape[0], -1, out.shape[-1])


def image_token_id(config) -> int | None:
    """The image placeholder's id (configs name it either way)."""
    found = getattr(config, "image_token_id", None)
    return found if found is not None else getattr(config, "image_token_index", None)
