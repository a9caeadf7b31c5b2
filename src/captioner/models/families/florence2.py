"""Florence-2 (`Florence2ForConditionalGeneration`): an encoder-decoder that reads the image and
a task token (`<CAPTION>`, `<DETAILED_CAPTION>`, `<MORE_DETAILED_CAPTION>`; the processor turns
it into its question). The caption is the decoder's target: labels are the tokenised caption
(start and end tokens included, pads -100) and the model shifts them right after its decoder
start token. Generation returns the decoder's text only."""

from __future__ import annotations

from typing import Any

import torch

from captioner.models.families.base import Family, padding_side


class Florence2Family(Family):
    name = "florence2"
    hub_examples = ("florence-community/Florence-2-base",)
    model_types = ("florence2",)
    model_class = "Florence2ForConditionalGeneration"
    prompting = "task token (<CAPTION>, <DETAILED_CAPTION>) to the encoder; caption = decoder"
    default_prompt = "<CAPTION>"
    lora_targets = ("q_proj", "k_proj", "v_proj", "out_proj")

    def prompt_text(self, processor, prompt: str | None) -> str:
        return prompt or self.default_prompt

    def processor_inputs(self, processor, images: list, texts: list[str]) -> dict[str, Any]:
        return dict(processor(images=images, text=texts, padding=True, return_tensors="pt"))

    def training_inputs(self, processor, images, captions, prompt, max_length=None):
        text = self.prompt_text(processor, prompt)
        with padding_side(processor, "right"):
            batch = self.processor_inputs(processor, images, [text] * len(images))
            target = processor.tokenizer(
                [c.strip() for c in captions], padding=True, truncation=max_length is not None,
                max_length=max_length, return_tensors="pt",
            )  # fmt: skip
        batch["labels"] = target["input_ids"].masked_fill(target["attention_mask"] == 0, -100)
        return batch

    def generation_inputs(self, processor, images, prompt, model_config=None):
        text = self.prompt_text(processor, prompt)
        return self.processor_inputs(processor, images, [text] * len(images)), 0

    def generated_ids(self, ids, inputs, prompt_tokens: int):
        return ids  # the decoder's own tokens: the task token went to the encoder

    def vision_tower(self, model: torch.nn.Module):
        found = super().vision_tower(model)
        return found if found is not None else getattr(model.model, "vision_tower", None)

    def usage_snippet(self, model_class: str, ref: str, prompt: str | None) -> str:
        return "\n".join(
            [
                f'model = {model_class}.from_pretrained("{ref}")',
                f'processor = AutoProcessor.from_pretrained("{ref}")',
                'image = Image.open("photo.jpg").convert("RGB")',
                f"inputs = processor(images=image, text={self.prompt(prompt)!r}, "
                'return_tensors="pt")',
                "ids = model.generate(**inputs, max_new_tokens=30)",
                "print(processor.batch_decode(ids, skip_special_tokens=True)[0].strip())",
            ]
        )
