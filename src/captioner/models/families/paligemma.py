"""PaliGemma (`PaliGemmaForConditionalGeneration`): a task prefix ("caption en") after the
image tokens, and the caption as the processor's `suffix=`, from which the processor itself
builds labels with the prefix and image tokens at -100 and the eos appended (the recipe of
PaliGemma's fine-tuning notebooks). Generation returns the prefix first; it is cut off."""

from __future__ import annotations

from typing import Any

from captioner.models.families.base import Family, padding_side


class PaliGemmaFamily(Family):
    name = "paligemma"
    hub_examples = ("google/paligemma2-3b-pt-224",)
    model_types = ("paligemma",)
    prompting = 'task prefix ("caption en") after the image tokens; caption as `suffix=`'
    default_prompt = "caption en"

    def prompt_text(self, processor, prompt: str | None) -> str:
        # The image placeholder written out: without it the processor warns on every call.
        return getattr(processor, "image_token", "<image>") + (prompt or self.default_prompt)

    def training_inputs(self, processor, images, captions, prompt, max_length=None):
        text = self.prompt_text(processor, prompt)
        with padding_side(processor, "right"):
            batch = processor(
                images=images,
                text=[text] * len(images),
                suffix=[c.strip() for c in captions],
                padding=True,
                return_tensors="pt",
            )
        return dict(batch)

    def processor_inputs(self, processor, images: list, texts: list[str]) -> dict[str, Any]:
        return dict(processor(images=images, text=texts, padding=True, return_tensors="pt"))
