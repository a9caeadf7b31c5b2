"""The generic chat family: any `AutoModelForImageTextToText` model whose processor has a chat
template (SmolVLM/Idefics3, Qwen2-VL/Qwen2.5-VL, Gemma 3, LLaVA-NeXT/OneVision, Mistral 3,
InternVL, LFM2-VL, ...), with no code of its own.

The user turn is the image plus the caption prompt (`--prompt`, default "Describe this image in
one sentence."); the assistant turn is the caption. Training renders the conversation with the
model's own template and puts loss on the assistant's caption and its end-of-turn token only;
captioning renders the user turn with `add_generation_prompt=True` and returns only the new
text. This is what TRL's VLM SFT recipe does, with the template's own tokens."""

from __future__ import annotations

import inspect
from typing import Any

from captioner.errors import CaptionerError
from captioner.models.families.base import Family, end_token_ids
from captioner.models.families.onnx_parts import ImageFeatures, OnnxParts, image_token_id

DEFAULT_PROMPT = "Describe this image in one sentence."
# Processor outputs besides the pixels that a model's get_image_features may take.
VISION_EXTRAS = ("pixel_attention_mask", "image_sizes")


class ChatFamily(Family):
    name = "chat"
    hub_examples = (
        "HuggingFaceTB/SmolVLM-256M-Instruct",
        "Qwen/Qwen2-VL-2B-Instruct",
        "Qwen/Qwen2.5-VL-3B-Instruct",
        "google/gemma-3-4b-it",
        "llava-hf/llava-v1.6-mistral-7b-hf",
    )
    prompting = "chat template: user turn = image + prompt, assistant turn = caption"
    default_prompt = DEFAULT_PROMPT
    onnx_export = True

    def onnx_parts(self, model) -> OnnxParts:
        """The model's `get_image_features` and the whole model on `inputs_embeds`; refused where
        the model computes something the embeddings cannot carry."""
        why = None
        inner = getattr(model, "model", None)
        if hasattr(model, "get_rope_index") or hasattr(inner, "get_rope_index"):
            why = "its 3-D rotary positions (M-RoPE) come from the image grid inside the model"
        elif image_token_id(model.config) is None or not hasattr(model, "get_image_features"):
            why = "it has no image token or no get_image_features to export"
        if why:
            raise CaptionerError(f"cannot export a {model.config.model_type} model to ONNX: {why}")
        accepted = inspect.signature(model.get_image_features).parameters
        names = ("pixel_values", *(n for n in VISION_EXTRAS if n in accepted))
        blocks = "token_type_ids" in inspect.signature(model.forward).parameters
        return OnnxParts("embeds", ImageFeatures(model, names), model, names,
                         image_token_id(model.config), image_blocks=blocks)  # fmt: skip

    def prompt_text(self, processor, prompt: str | None) -> str:
        return processor.apply_chat_template(
            [_user_turn(prompt)], add_generation_prompt=True, tokenize=False
        )

    def completion_text(self, processor, caption: str, prompt_text: str = "") -> str:
        """What the template writes after the generation prompt for an assistant turn holding
        `caption`: the caption and the template's end of turn (`<|im_end|>\\n`, ...)."""
        messages = [_user_turn(None), _assistant_turn(caption)]
        full = processor.apply_chat_template(messages, tokenize=False)
        head = processor.apply_chat_template(
            messages[:1], add_generation_prompt=True, tokenize=False
        )
        if full.startswith(head) and caption in full[len(head) :]:
            return full[len(head) :]
        return caption + (processor.tokenizer.eos_token or "")

    def processor_inputs(self, processor, images: list, texts: list[str]) -> dict[str, Any]:
        return dict(
            processor(images=[[im] for im in images], text=texts, padding=True,
                      return_tensors="pt")
        )  # fmt: skip

    def generate_kwargs(self, processor, model) -> dict[str, Any]:
        # Stop at the template's end of turn as well as the model's eos.
        ends = set(end_token_ids(processor))
        eos = model.generation_config.eos_token_id
        ends |= set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        return {"eos_token_id": sorted(ends)}

    def usage_snippet(self, model_class: str, ref: str, prompt: str | None) -> str:
        text = prompt or self.default_prompt
        return "\n".join(
            [
                f'model = {model_class}.from_pretrained("{ref}")',
                f'processor = AutoProcessor.from_pretrained("{ref}")',
                'image = Image.open("photo.jpg").convert("RGB")',
                "messages = [{",
                '    "role": "user",',
                f'    "content": [{{"type": "image"}}, {{"type": "text", "text": {text!r}}}],',
                "}]",
                "prompt = processor.apply_chat_template(messages, add_generation_prompt=True)",
                'inputs = processor(images=[[image]], text=[prompt], return_tensors="pt")',
                "ids = model.generate(**inputs, max_new_tokens=30)[:, inputs.input_ids.shape[1]:]",
                "print(processor.batch_decode(ids, skip_special_tokens=True)[0].strip())",
            ]
        )


def _user_turn(prompt: str | None) -> dict[str, Any]:
    content: list[dict[str, str]] = [{"type": "image"}]
    content.append({"type": "text", "text": prompt or DEFAULT_PROMPT})
    return {"role": "user", "content": content}


def _assistant_turn(caption: str) -> dict[str, Any]:
    return {"role": "assistant", "content": [{"type": "text", "text": caption}]}
