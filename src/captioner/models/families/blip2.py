"""BLIP-2 and InstructBLIP (`Blip2ForConditionalGeneration`,
`InstructBlipForConditionalGeneration`): a Q-Former turns the image into a fixed number of query
tokens in front of the language model's text. Captioning is plain continuation: an optional text
prompt ("a photo of", or InstructBLIP's instruction, which its Q-Former reads too), then the
caption and the LM's eos, with loss on the caption and eos only."""

from __future__ import annotations

import inspect
from typing import Any

from captioner.errors import CaptionerError
from captioner.models.families.base import Family
from captioner.models.families.onnx_parts import ImageFeatures, OnnxParts, image_token_id

# What the Q-Former reads besides the pixels (InstructBLIP: the instruction).
QFORMER_INPUTS = ("qformer_input_ids", "qformer_attention_mask")


class Blip2Family(Family):
    name = "blip-2"
    hub_examples = ("Salesforce/blip2-opt-2.7b", "Salesforce/instructblip-vicuna-7b")
    model_types = ("blip-2", "instructblip")
    prompting = "query tokens from the Q-Former, then an optional text prompt; caption follows"
    vision_tower_paths = ("vision_model", "model.vision_model")
    onnx_export = True

    def onnx_parts(self, model) -> OnnxParts:
        """The Q-Former's projected query tokens are the image features; the language model
        (a decoder-only `*ForCausalLM`) runs on the embeddings."""
        accepted = inspect.signature(model.get_image_features).parameters
        names = ("pixel_values", *(n for n in QFORMER_INPUTS if n in accepted))
        return OnnxParts("embeds", ImageFeatures(model, names), model.language_model, names,
                         image_token_id(model.config))  # fmt: skip

    def load_model(self, name: str, **kwargs: Any):
        model = super().load_model(name, **kwargs)
        if getattr(model.config.text_config, "is_encoder_decoder", False):
            # Its caption would be the T5 decoder's target, not a continuation of the prompt.
            raise CaptionerError(
                f"{name}: BLIP-2/InstructBLIP with an encoder-decoder language model (Flan-T5) "
                "is not supported yet; the OPT and Vicuna ones are"
            )
        return model

    def keep_prompt_only_inputs(self, batch, prompt_batch) -> None:
        # InstructBLIP's Q-Former reads the instruction: in training it must not read the
        # caption it is learning to write.
        for key in ("qformer_input_ids", "qformer_attention_mask"):
            if key in prompt_batch:
                batch[key] = prompt_batch[key]

    def processor_inputs(self, processor, images: list, texts: list[str]) -> dict[str, Any]:
        return dict(processor(images=images, text=texts, padding=True, return_tensors="pt"))
