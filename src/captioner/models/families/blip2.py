"""BLIP-2 and InstructBLIP (`Blip2ForConditionalGeneration`,
`InstructBlipForConditionalGeneration`): a Q-Former turns the image into a fixed number of query
tokens in front of the language model's text. Captioning is plain continuation: an optional text
prompt ("a photo of", or InstructBLIP's instruction, which its Q-Former reads too), then the
caption and the LM's eos, with loss on the caption and eos only."""

from __future__ import annotations

from typing import Any

from captioner.models.families.base import Family


class Blip2Family(Family):
    name = "blip-2"
    model_types = ("blip-2", "instructblip")
    prompting = "query tokens from the Q-Former, then an optional text prompt; caption follows"
    vision_tower_paths = ("vision_model", "model.vision_model")

    def processor_inputs(self, processor, images: list, texts: list[str]) -> dict[str, Any]:
        return dict(processor(images=images, text=texts, padding=True, return_tensors="pt"))
