"""LLaVA (`LlavaForConditionalGeneration`): a vision tower, a projector and a decoder-only LM
that reads one token per image feature at the positions of an `<image>` token. compose.py
builds them from pretrained parts; llava-hf checkpoints load the same way.

The caption prompt is saved with the model as the processor's chat template: a user turn renders
as its images, then its text; a user turn without text gets the saved prompt ("Caption:").
Training teaches `<prompt ids> + " " + caption + eos` with loss on the caption and eos only; the
prompt's ids do not depend on the image (a fixed number of image tokens), so they are computed
once per image size, by the processor itself on a blank image, exactly as a plain-transformers
caller gets them. Generation returns the prompt first; it is always cut off."""

from __future__ import annotations

import json
import weakref

import torch
from PIL import Image

from captioner.models.families.base import PixelFamily

IMAGE_TOKEN = "<image>"
DEFAULT_PROMPT = "Caption:"


class LlavaFamily(PixelFamily):
    name = "llava"
    hub_examples = ("llava-hf/llava-1.5-7b-hf",)
    model_types = ("llava",)
    model_class = "LlavaForConditionalGeneration"
    prompting = "chat template: <image> x N + saved prompt; the caption follows after a space"
    prompt_in_caption = False
    vision_tower_paths = ("model.vision_tower", "vision_tower")
    lora_targets = ("q_proj", "v_proj")
    random_parts = ("multi_modal_projector",)
    onnx_refusal = "a decoder-only LM over image tokens: captioner's exporter covers GIT only"

    def text_inputs(self, processor, captions, prompt, max_length, image_size):
        """prompt + " " + caption + eos per row, right-padded; labels on caption and eos only."""
        tokenizer = processor.tokenizer
        head = prompt_ids(processor, prompt, *image_size)
        # The leading space: a byte-level BPE LM spells a word after "Caption:" with its space.
        words = tokenizer(
            [" " + c.strip() for c in captions],
            add_special_tokens=False,
            truncation=max_length is not None,
            max_length=max_length,
        ).input_ids
        rows = [[*head, *ids, tokenizer.eos_token_id] for ids in words]
        length = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), length), tokenizer.pad_token_id)
        attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
        labels = torch.full((len(rows), length), -100)
        for i, row in enumerate(rows):
            input_ids[i, : len(row)] = torch.tensor(row)
            attention_mask[i, : len(row)] = 1
            labels[i, len(head) : len(row)] = input_ids[i, len(head) : len(row)]
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}

    def prompt_inputs(self, processor, model_config, prompt, n, image_size):
        ids = torch.tensor([prompt_ids(processor, prompt, *image_size)] * n)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, ids.shape[1]

    def max_new_tokens_limit(self, config) -> int | None:
        return None

    def usage_snippet(self, model_class: str, ref: str, prompt: str | None) -> str:
        return "\n".join(
            [
                f'model = {model_class}.from_pretrained("{ref}")',
                f'processor = AutoProcessor.from_pretrained("{ref}")',
                'image = Image.open("photo.jpg").convert("RGB")',
                "prompt = processor.apply_chat_template(",
                '    [{"role": "user", "content": [{"type": "image"}]}],',
                "    add_generation_prompt=True,",
                ")",
                'inputs = processor(images=image, text=prompt, return_tensors="pt")',
                "ids = model.generate(**inputs, max_new_tokens=30)[:, inputs.input_ids.shape[1]:]",
                "print(processor.batch_decode(ids, skip_special_tokens=True)[0].strip())",
            ]
        )


def caption_template(prompt: str) -> str:
    """The processor's chat template: a turn renders as its images, then its text; a user turn
    without text asks for a caption with `prompt`; an assistant turn (a caption) follows after a
    space, as in training."""
    return (
        "{%- for message in messages -%}"
        "{%- if message['role'] == 'assistant' %} {% endif -%}"
        "{%- if message['content'] is string -%}{{- message['content'] -}}"
        "{%- else -%}"
        "{%- set ns = namespace(text=false) -%}"
        "{%- for item in message['content'] -%}"
        f"{{%- if item['type'] == 'image' -%}}{IMAGE_TOKEN}"
        "{%- elif item['type'] == 'text' -%}{{- item['text'] -}}{%- set ns.text = true -%}"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{%- if message['role'] == 'user' and not ns.text -%}"
        f"{{{{- {json.dumps(prompt)} -}}}}"
        "{%- endif -%}"
        "{%- endif -%}"
        "{%- endfor -%}"
    )


def caption_prompt(processor, text: str | None = None) -> str:
    """The prompt text of a LLaVA captioner, `<image>` placeholder included: its saved caption
    prompt, or `text` in its place. A processor without a chat template gets `<image>text`."""
    content: list[dict[str, str]] = [{"type": "image"}]
    if text:
        content.append({"type": "text", "text": text})
    if not getattr(processor, "chat_template", None):
        return processor.image_token + (text or "")
    return processor.apply_chat_template(
        [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
    )


# processor -> {(prompt, height, width): ids}: the processor is run once per prompt and size.
_PROMPT_IDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def prompt_ids(processor, text: str | None, height: int, width: int) -> list[int]:
    """Token ids of the caption prompt for images preprocessed to `height` x `width`, with the
    image token repeated as the model needs. The processor itself expands it (on a blank image
    of that size), so the ids are those a plain-transformers caller gets."""
    cache = _PROMPT_IDS.setdefault(processor, {})
    key = (text, height, width)
    if key not in cache:
        blank = Image.new("RGB", (width, height))
        inputs = processor(
            images=[blank], text=[caption_prompt(processor, text)], return_tensors="pt"
        )
        cache[key] = inputs["input_ids"][0].tolist()
    return cache[key]
