"""BLIP (`BlipForConditionalGeneration`): the text decoder shifts the labels itself, so labels
are the input ids with pads masked. A prompt is the start of the caption (conditional
captioning): BLIP's generate swaps the first id for BOS and drops the last ([SEP])."""

from __future__ import annotations

import torch

from captioner.models.families.base import OPTIMUM_ONLY, PixelFamily


class BlipFamily(PixelFamily):
    name = "blip"
    hub_examples = ("Salesforce/blip-image-captioning-base",)
    model_types = ("blip",)
    model_class = "BlipForConditionalGeneration"
    prompting = "image, then an optional caption prefix (conditional captioning)"
    vision_tower_paths = ("vision_model",)
    lora_targets = ("query", "value")
    teacher_forced = True
    onnx_refusal = OPTIMUM_ONLY

    def prompt_inputs(self, processor, model_config, prompt, n, image_size):
        if not prompt:
            return {}, 0
        ids = processor.tokenizer(prompt).input_ids
        return {"input_ids": torch.tensor([ids] * n)}, len(ids) - 1
