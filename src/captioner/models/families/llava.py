"""LLaVA (`LlavaForConditionalGeneration`): a vision tower, a projector and a decoder-only LM
that reads one token per image feature at the positions of an `<image>` token. compose.py
builds them from pretrained parts; llava-hf checkpoints load the same way.

The caption prompt is saved with the model as the processor's chat template: a user turn renders
as its images, then its text; a user turn without text gets the saved prompt ("Caption:").
Training teaches `<prompt ids> + " " + caption + eos` with loss on the caption and eos only; the
prompt's ids do not depend on the image (a fixed number of image tokens), so they are computed
once per image size, by the processor itself on a blank image, exactly as a plain-transformers
caller gets them. Generation returns the prompt first; it is always cut off.

The frozen tower's outputs can come from the feature cache, as VisionEncoderDecoder's do. What
is cached is what the projector reads (`LlavaVisionFeatures`: the hidden state(s)
`vision_feature_layer` selects, without CLS under the `default` strategy), and a batch carries
it as `mm_encoder_outputs={"image": tensor}`. transformers' own `mm_encoder_outputs` takes image
features *after* the projector, which is trained, so `use_cached_features(model)` puts a forward
pre-hook on the `LlavaModel` that runs the projector on the cached tensor and hands the forward
its usual `BaseModelOutputWithPooling`; only the projector and the LM run, and the loss is the
pixel path's. Without the hook a cached batch fails loudly (a tensor has no `pooler_output`)
rather than training blind. The hook is not saved: the saved model is a plain LLaVA.

Fewer image tokens by pooling the patch grid (2x2 average or pixel shuffle, as nanoVLM/SmolVLM
do) cannot be expressed in `LlavaForConditionalGeneration`, whose projector is per-token; the
stock classes that pool (InternVL, AyaVision, Gemma 3, Idefics3) bring their own processors
and tower constraints, so compositions do not pool (the `default` strategy drops the CLS token)."""

from __future__ import annotations

import json
import weakref
from typing import Any

import torch
from PIL import Image
from transformers.modeling_outputs import BaseModelOutput, BaseModelOutputWithPooling

from captioner.models.families.base import PixelFamily
from captioner.models.families.onnx_parts import OnnxParts, ProjectedFeatures, image_token_id

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
    feature_cache = True
    onnx_export = True

    def onnx_parts(self, model) -> OnnxParts:
        projector = _unwrapped(model).model.multi_modal_projector
        vision = ProjectedFeatures(self.feature_encoder(model), projector)
        return OnnxParts("embeds", vision, model, image_token_id=image_token_id(model.config))

    def feature_encoder(self, model) -> torch.nn.Module:
        """What the feature cache runs once per image: the tower up to what the projector
        reads (the selected hidden state(s), CLS dropped under the `default` strategy)."""
        model = _unwrapped(model)
        config = model.config
        return LlavaVisionFeatures(
            self.vision_tower(model),
            config.vision_feature_layer,
            config.vision_feature_select_strategy,
        )

    def cached_inputs(self, features: torch.Tensor) -> dict[str, Any]:
        return {"mm_encoder_outputs": {"image": features}}

    def use_cached_features(self, model) -> None:
        """Let `model` (plain or peft-wrapped) take `cached_inputs`: the projector then runs on
        the cached features inside the forward (once per model; not saved with it)."""
        for module in model.modules():
            if hasattr(module, "multi_modal_projector") and hasattr(module, "get_image_features"):
                if not getattr(module, "_captioner_cached_features", False):
                    module.register_forward_pre_hook(_project_cached, with_kwargs=True)
                    module._captioner_cached_features = True
                return
        raise ValueError(f"{type(model).__name__}: no LLaVA model with a projector inside")

    def text_inputs(self, processor, captions, prompt, max_length, image_size):
        """prompt + " " + caption + eos per row, right-padded; labels on caption and eos only.

        The LM head runs only where a label is predicted: `logits_to_keep` (the forward's own
        argument) keeps the positions from the prompt's last token on, and the labels are cut
        to the same columns, so the loss is unchanged while the head (576 x 49,152 for SmolLM2:
        a fifth of a training step's FLOPs over all ~90 positions) skips the image tokens."""
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
        keep = length - len(head) + 1  # logits at position t predict the label at t + 1
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels[:, -keep:],
            "logits_to_keep": keep,
        }

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


class LlavaVisionFeatures(torch.nn.Module):
    """The vision tower as LLaVA's `get_image_features` runs it, minus the projector: pixels ->
    the hidden state(s) `vision_feature_layer` selects (several are concatenated on the feature
    axis), CLS dropped under the `default` strategy. Its output's `last_hidden_state` is what
    the feature cache stores; `cache_settings` enters the cache's fingerprint."""

    def __init__(self, tower: torch.nn.Module, layer: int | list[int], strategy: str) -> None:
        super().__init__()
        self.tower = tower
        self.layer = layer
        self.strategy = strategy
        self.config = tower.config
        self.cache_settings = {"vision_feature_layer": layer, "select_strategy": strategy}

    def forward(self, pixel_values: torch.Tensor) -> BaseModelOutput:
        # output_hidden_states=<the selection>, as LLaVA's select_hidden_states decorator passes
        out = self.tower(pixel_values, return_dict=True, output_hidden_states=self.layer)
        layers = [self.layer] if isinstance(self.layer, int) else list(self.layer)
        states = [out.hidden_states[i] for i in layers]
        if self.strategy == "default":
            states = [s[:, 1:] for s in states]
        return BaseModelOutput(last_hidden_state=torch.cat(states, dim=-1))


def _project_cached(module, args, kwargs):
    """Forward pre-hook of a LlavaModel: cached vision features (a tensor under
    `mm_encoder_outputs["image"]`) -> the projector's output, as `get_image_features` returns
    it."""
    outputs = kwargs.get("mm_encoder_outputs")
    if outputs is not None and isinstance(outputs.get("image"), torch.Tensor):
        projector = module.multi_modal_projector
        weight = next(projector.parameters())
        features = projector(outputs["image"].to(weight.device, weight.dtype))
        image = BaseModelOutputWithPooling(pooler_output=list(features))
        kwargs = {**kwargs, "mm_encoder_outputs": {**outputs, "image": image}}
    return args, kwargs


def _unwrapped(model):
    """The transformers model inside a peft wrapper (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model
