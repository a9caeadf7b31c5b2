"""What a model family is: everything that differs between families, in one object.

A family answers every question the rest of captioner has about a model: which transformers
class loads it, how images + prompt + caption become a training batch (labels -100 everywhere
but on the caption and its end token), how images + prompt become generation inputs and how the
prompt is taken off the output, which module is the vision tower, what LoRA adapts, whether
ONNX export and the feature cache apply, and the snippet on the model card. The engine, the
collator, the trainer, evaluation, export, the card and the server ask the family; none of them
tests `model_type`.

Two kinds of families share this base:

- *processor families* (the default here): the model's own processor turns images + text into
  inputs in one call (image tokens expanded to however many the image needs). Training renders
  the prompt, then prompt + caption + end token, runs the processor on both with the same images,
  and masks the labels up to the prompt's length. This covers chat models (chat.py), PaliGemma,
  BLIP-2 and Florence-2 with a few overrides each.
- *pixel families* (`fixed_pixels = True`: GIT, BLIP, VisionEncoderDecoder, LLaVA compositions):
  the image processor alone makes fixed-size pixels and the prompt's ids do not depend on the
  image, so batches can reuse cached pixels or cached encoder outputs; they override
  `text_inputs` and `prompt_inputs` instead.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Any, ClassVar

import torch
import transformers

from captioner.errors import CaptionerError
from captioner.models.families.onnx_parts import OnnxParts
from captioner.models.families.processors import load_processor

log = logging.getLogger(__name__)

IMAGE_TEXT_TO_TEXT = "AutoModelForImageTextToText"
# Why BLIP is not exported: its exporter is optimum-onnx's.
OPTIMUM_ONLY = (
    "its ONNX export lives in optimum-onnx, which needs transformers < 4.58 (captioner runs "
    "transformers 5)"
)


class Family:
    """A model family. Subclasses set the class attributes and override what differs."""

    name: ClassVar[str] = "base"
    # config.model_type values this family owns (the chat family owns the rest of the
    # AutoModelForImageTextToText mapping: see families/__init__.py).
    model_types: ClassVar[tuple[str, ...]] = ()
    model_class: ClassVar[str] = IMAGE_TEXT_TO_TEXT
    # Real checkpoints of the family (what a user with the Hub passes as --model).
    hub_examples: ClassVar[tuple[str, ...]] = ()
    # One line for `captioner models`: how the family is prompted.
    prompting: ClassVar[str] = ""
    # The caption prompt when the user gives none (None: the model's own or no prompt).
    default_prompt: ClassVar[str | None] = None
    # A prompt that is the start of the caption (GIT, BLIP, VED) rather than an instruction.
    prompt_in_caption: ClassVar[bool] = False
    fixed_pixels: ClassVar[bool] = False
    # Dotted paths tried in order to find the vision tower (freezing, the feature cache).
    vision_tower_paths: ClassVar[tuple[str, ...]] = (
        "model.vision_tower",
        "vision_tower",
        "model.vision_model",
        "vision_model",
        "model.visual",  # Qwen-VL
        "visual",
    )
    # Leaf names of the language model's linear layers LoRA adapts by default.
    lora_targets: ClassVar[tuple[str, ...]] = ("q_proj", "k_proj", "v_proj", "o_proj", "out_proj")
    # Modules that start random in a captioner-built model: trained whole next to LoRA.
    random_parts: ClassVar[tuple[str, ...]] = ()
    feature_cache: ClassVar[bool] = False
    # Cached encoder outputs a training batch may thin to a random subset of patch tokens
    # (`--patch_dropout`): true where the decoder cross-attends to any number of them (not LLaVA,
    # whose prompt holds one placeholder per image token).
    patch_dropout: ClassVar[bool] = False
    onnx_export: ClassVar[bool] = False
    onnx_refusal: ClassVar[str] = (
        "captioner's ONNX exporter covers GIT, VisionEncoderDecoder, LLaVA and chat models"
    )
    # The guide's teacher-forced WER (input_ids as labels) applies.
    teacher_forced: ClassVar[bool] = False

    # ---- loading ----

    def load_model(self, name: str, **kwargs: Any):
        """The model through its transformers class (safetensors only)."""
        cls = getattr(transformers, self.model_class)
        return cls.from_pretrained(name, use_safetensors=True, **kwargs)

    def load_processor(self, name: str, **kwargs: Any):
        """The processor; chat families whose processor also builds a video processor (which
        needs torchvision) are assembled from their image processor and tokenizer instead."""
        return load_processor(name, **kwargs)

    # ---- questions about a loaded model ----

    def vision_tower(self, model: torch.nn.Module) -> torch.nn.Module | None:
        for path in self.vision_tower_paths:
            module: Any = model
            for attr in path.split("."):
                module = getattr(module, attr, None)
                if module is None:
                    break
            if module is not None:
                return module
        return None

    def feature_encoder(self, model: torch.nn.Module) -> torch.nn.Module | None:
        """What the feature cache runs once per image (its output's last_hidden_state is
        stored); the vision tower unless the family says otherwise."""
        return self.vision_tower(model)

    def use_cached_features(self, model: torch.nn.Module) -> None:
        """Make `model` accept `cached_inputs(...)` in its forward (most already do)."""

    def vision_prefixes(self) -> tuple[str, ...]:
        """Parameter-name prefixes of the vision tower (LoRA leaves it alone unless asked)."""
        return tuple(f"{p}." for p in self.vision_tower_paths)

    def max_new_tokens_limit(self, config) -> int | None:
        """How many new tokens fit the model's text positions (None: no fixed limit)."""
        return None

    def cached_inputs(self, features: torch.Tensor) -> dict[str, Any]:
        """The forward keyword that takes cached vision-tower outputs instead of pixels."""
        raise CaptionerError(f"cached vision features do not apply to {self.name} models")

    def prompt(self, prompt: str | None) -> str | None:
        return prompt if prompt is not None else self.default_prompt

    def onnx_parts(self, model: torch.nn.Module) -> OnnxParts:
        """The modules the ONNX exporter turns into graphs (onnx_parts.py); GIT has its own
        exporter, a family that cannot be exported refuses in one line."""
        raise CaptionerError(f"cannot export a {self.name} model to ONNX: {self.onnx_refusal}")

    # ---- processor families: training and generation inputs ----

    def prompt_text(self, processor, prompt: str | None) -> str:
        """The text that comes before the caption (image placeholders included)."""
        return prompt or ""

    def completion_text(self, processor, caption: str, prompt_text: str = "") -> str:
        """The text the model learns to write after `prompt_text`: the caption (after a space
        when the prompt ends in a word) and the end token."""
        space = " " if prompt_text and not prompt_text[-1].isspace() else ""
        return f"{space}{caption}{processor.tokenizer.eos_token or ''}"

    def generate_kwargs(self, processor, model) -> dict[str, Any]:
        """Keyword arguments this family adds to every `generate` call."""
        return {}

    def processor_inputs(self, processor, images: list, texts: list[str]) -> dict[str, Any]:
        """One processor call over a batch (one image per row)."""
        return dict(processor(images=images, text=texts, padding=True, return_tensors="pt"))

    def training_inputs(
        self, processor, images: list, captions: list[str], prompt: str | None,
        max_length: int | None = None,
    ) -> dict[str, Any]:  # fmt: skip
        """Images + prompt + caption -> a training batch. The prompt is run through the
        processor with the same images, so its length counts the expanded image tokens exactly;
        every label up to it, after the end token and on padding is -100."""
        prompt_text = self.prompt_text(processor, prompt)
        full = [
            prompt_text + self.completion_text(processor, c.strip(), prompt_text) for c in captions
        ]
        with padding_side(processor, "right"):
            batch = self.processor_inputs(processor, images, full)
            prompt_batch = self.processor_inputs(processor, images, [prompt_text] * len(images))
        self.keep_prompt_only_inputs(batch, prompt_batch)
        ids, mask = batch["input_ids"], batch["attention_mask"]
        labels = ids.masked_fill(mask == 0, -100)
        prompt_lengths = prompt_batch["attention_mask"].sum(1)
        is_end = torch.isin(ids, torch.tensor(sorted(end_token_ids(processor))))
        for row, start in enumerate(prompt_lengths.tolist()):
            labels[row, :start] = -100
            done = is_end[row, start:].nonzero()
            if len(done):  # the end token carries loss; what the template adds after it does not
                labels[row, start + int(done[0]) + 1 :] = -100
        batch["labels"] = labels
        return batch

    def keep_prompt_only_inputs(self, batch: dict[str, Any], prompt_batch: dict[str, Any]) -> None:
        """Replace inputs that must not see the caption with the prompt-only call's (a family
        whose image encoder also reads the text: InstructBLIP's Q-Former)."""

    def generation_inputs(
        self, processor, images: list, prompt: str | None, model_config=None
    ) -> tuple[dict[str, Any], int]:
        """Images + prompt -> generate's inputs and how many leading output tokens are prompt
        (left padding, so every row's prompt ends at the same column)."""
        text = self.prompt_text(processor, prompt)
        with padding_side(processor, "left"):
            inputs = self.processor_inputs(processor, images, [text] * len(images))
        return inputs, inputs["input_ids"].shape[1]

    def generated_ids(
        self, ids: torch.Tensor, inputs: dict[str, Any], prompt_tokens: int
    ) -> torch.Tensor:
        """What the model wrote. A decoder-only model returns its prompt first: it is cut off
        when the output starts with the input ids (some generate()s return new tokens only, an
        encoder-decoder returns its decoder's tokens)."""
        prompt_ids = inputs.get("input_ids")
        if (
            prompt_ids is not None
            and ids.shape[1] >= prompt_ids.shape[1]
            and torch.equal(ids[:, : prompt_ids.shape[1]].cpu(), prompt_ids.cpu())
        ):
            return ids[:, prompt_ids.shape[1] :]
        return ids

    def decode(
        self, processor, ids: torch.Tensor, inputs: dict[str, Any], prompt_tokens: int,
        keep_prompt: bool = True,
    ) -> list[str]:  # fmt: skip
        """Generated ids -> caption texts (the prompt is an instruction: never part of them)."""
        new = self.generated_ids(ids, inputs, prompt_tokens)
        return processor.tokenizer.batch_decode(new, skip_special_tokens=True)

    # ---- the model card ----

    def usage_snippet(self, model_class: str, ref: str, prompt: str | None) -> str:
        """How plain transformers captions an image with this model (the card's snippet)."""
        text = repr(self.prompt(prompt) or "")
        return "\n".join(
            [
                f'model = {model_class}.from_pretrained("{ref}")',
                f'processor = AutoProcessor.from_pretrained("{ref}")',
                'image = Image.open("photo.jpg").convert("RGB")',
                f'inputs = processor(images=image, text={text}, return_tensors="pt")',
                "ids = model.generate(**inputs, max_new_tokens=30)",
                "ids = ids[:, inputs.input_ids.shape[1]:]  # the prompt comes back first",
                "print(processor.batch_decode(ids, skip_special_tokens=True)[0].strip())",
            ]
        )

    def describe(self) -> dict[str, Any]:
        """The row of `captioner models`."""
        return {
            "family": self.name,
            "class": self.model_class,
            "prompting": self.prompting,
            "lora": True,
            "feature_cache": self.feature_cache,
            "onnx": self.onnx_export,
        }


def end_token_ids(processor) -> set[int]:
    """Ids that end a caption: the tokenizer's eos and the chat template's end-of-turn tokens."""
    tokenizer = processor.tokenizer
    ends = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    for token in ("<end_of_utterance>", "<|im_end|>", "<end_of_turn>", "<|eot_id|>", "</s>"):
        # A token the vocabulary lacks converts to the unknown token (or None); no get_vocab():
        # it copies the whole vocabulary, and this runs for every training batch.
        found = tokenizer.convert_tokens_to_ids(token)
        if found is not None and (found != tokenizer.unk_token_id or token == tokenizer.unk_token):
            ends.add(found)
    return ends


@contextmanager
def padding_side(processor, side: str):
    """Pad on `side` for one call (training pads right, decoder-only generation pads left)."""
    tokenizer = processor.tokenizer
    before = tokenizer.padding_side
    tokenizer.padding_side = side
    try:
        yield
    finally:
        tokenizer.padding_side = before


class PixelFamily(Family):
    """A family whose image processor alone makes fixed-size pixels and whose prompt ids do not
    depend on the image: batches can come from the pixel cache or the feature cache, and the
    prompt is tokenised once per batch (GIT, BLIP, VisionEncoderDecoder, LLaVA compositions)."""

    fixed_pixels = True
    prompt_in_caption = True
    lora_targets = ("query", "value", "q_proj", "v_proj", "c_attn")

    def text_inputs(
        self, processor, captions: list[str], prompt: str | None, max_length: int | None,
        image_size: tuple[int, int],
    ) -> dict[str, torch.Tensor]:  # fmt: skip
        """Captions (each after the prompt, if any) -> input_ids, attention_mask and labels,
        padded to the longest; labels are -100 on padding and on the prompt."""
        if prompt:
            captions = [f"{prompt.strip()} {c}" for c in captions]
        text = processor.tokenizer(
            captions, padding="longest", truncation=True, max_length=max_length,
            return_tensors="pt",
        )  # fmt: skip
        labels = text["input_ids"].masked_fill(text["attention_mask"] == 0, -100)
        if prompt:  # no loss on the prompt: positions 1..n, after the start token
            n = len(processor.tokenizer(prompt.strip(), add_special_tokens=False).input_ids)
            labels[:, 1 : 1 + n] = -100
        return {
            "input_ids": text["input_ids"],
            "attention_mask": text["attention_mask"],
            "labels": labels,
        }

    def prompt_inputs(
        self, processor, model_config, prompt: str | None, n: int, image_size: tuple[int, int]
    ) -> tuple[dict[str, torch.Tensor], int]:
        """Generation's prompt ids for `n` images (all share the prompt, so nothing is padded)
        and how many leading output tokens they are."""
        return {}, 0

    def pixel_values(self, processor, images: list) -> torch.Tensor:
        return processor.image_processor(images=images, return_tensors="pt")["pixel_values"]

    def generation_inputs(
        self, processor, images: list, prompt: str | None, model_config=None
    ) -> tuple[dict[str, Any], int]:
        pixels = self.pixel_values(processor, images)
        inputs, shown = self.prompt_inputs(
            processor, model_config, prompt, len(pixels), tuple(pixels.shape[-2:])
        )
        return {"pixel_values": pixels, **inputs}, shown

    def generated_ids(self, ids, inputs, prompt_tokens: int) -> torch.Tensor:
        return ids[:, prompt_tokens:]

    def decode(
        self, processor, ids: torch.Tensor, inputs: dict[str, Any], prompt_tokens: int,
        keep_prompt: bool = True,
    ) -> list[str]:  # fmt: skip
        # A prompt that starts the caption stays in it unless the user drops it.
        if not (self.prompt_in_caption and keep_prompt):
            ids = self.generated_ids(ids, inputs, prompt_tokens)
        return processor.tokenizer.batch_decode(ids, skip_special_tokens=True)

    def max_new_tokens_limit(self, config) -> int | None:
        # GIT, BLIP and BERT decoders have a fixed number of text positions; the start token and
        # a prompt token need room.
        positions = getattr(config.get_text_config(decoder=True), "max_position_embeddings", None)
        return None if positions is None else max(1, positions - 2)

    def usage_snippet(self, model_class: str, ref: str, prompt: str | None) -> str:
        return "\n".join(
            [
                f'model = {model_class}.from_pretrained("{ref}")',
                f'processor = AutoProcessor.from_pretrained("{ref}")',
                'image = Image.open("photo.jpg").convert("RGB")',
                'pixel_values = processor(images=image, return_tensors="pt").pixel_values',
                "ids = model.generate(pixel_values=pixel_values, max_new_tokens=30)",
                "print(processor.batch_decode(ids, skip_special_tokens=True)[0].strip())",
            ]
        )
