"""VisionEncoderDecoder (`VisionEncoderDecoderModel`): any vision tower + a decoder that
cross-attends to it (compose.py builds them from pretrained parts). The model builds its decoder
inputs by shifting the labels right after `decoder_start_token_id`, so a batch carries labels
alone, without the tokenizer's own start token ([CLS] would be learned as a first word). A prompt
continues the decoder start token and is the start of the caption.

The frozen tower's outputs can come from the feature cache: the forward takes
`encoder_outputs` instead of `pixel_values` and computes the same loss."""

from __future__ import annotations

import torch

from captioner.models.families.base import PixelFamily
from captioner.models.families.onnx_parts import EncoderStates, OnnxParts


class VisionEncoderDecoderFamily(PixelFamily):
    name = "vision-encoder-decoder"
    hub_examples = ("nlpconnect/vit-gpt2-image-captioning",)
    model_types = ("vision-encoder-decoder",)
    model_class = "VisionEncoderDecoderModel"
    prompting = "encoder reads the image; decoder starts at its start token (+ caption prefix)"
    vision_tower_paths = ("encoder",)
    random_parts = ("crossattention", "enc_to_dec_proj")
    feature_cache = True
    patch_dropout = True
    onnx_export = True

    def text_inputs(self, processor, captions, prompt, max_length, image_size):
        labels = super().text_inputs(processor, captions, prompt, max_length, image_size)["labels"]
        tokenizer = processor.tokenizer
        start = tokenizer.cls_token_id
        start = tokenizer.bos_token_id if start is None else start
        if start is not None and labels.shape[1] > 1 and bool((labels[:, 0] == start).all()):
            labels = labels[:, 1:]
        return {"labels": labels}

    def prompt_inputs(self, processor, model_config, prompt, n, image_size):
        if not prompt:
            return {}, 0
        ids = processor.tokenizer(prompt, add_special_tokens=False).input_ids
        ids = [model_config.decoder_start_token_id, *ids]
        return {"decoder_input_ids": torch.tensor([ids] * n)}, len(ids)

    def onnx_parts(self, model) -> OnnxParts:
        return OnnxParts("cross", EncoderStates(model), model.decoder)

    def cached_inputs(self, features: torch.Tensor) -> dict:
        return {"encoder_outputs": (features,)}
