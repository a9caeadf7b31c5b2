"""GIT (`GitForCausalLM`): the image tokens sit in front of the text inside the model, which
slices them off the logits and shifts the labels itself, so labels are the input ids with pads
(and a prompt) masked. A prompt is the start of the caption: `[CLS] + prompt`, as GIT's docs.

The from-scratch presets (`tiny`, `small`) are GIT configs plus a caption-trained, lossless
byte-level BPE tokenizer (models/tokenizer.py; `[CLS]`/`[SEP]` start and end a caption):
`build` makes one."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from transformers import GitConfig, GitForCausalLM, GitProcessor

from captioner.models.families.base import PixelFamily

log = logging.getLogger(__name__)


class GitFamily(PixelFamily):
    name = "git"
    hub_examples = ("microsoft/git-base", "microsoft/git-large-coco")
    model_types = ("git",)
    model_class = "AutoModelForCausalLM"
    prompting = "image tokens, then [CLS] + an optional caption prefix"
    vision_tower_paths = ("git.image_encoder",)
    lora_targets = ("query", "value")
    onnx_export = True
    teacher_forced = True

    def prompt_inputs(self, processor, model_config, prompt, n, image_size):
        if not prompt:
            return {}, 0
        tok = processor.tokenizer
        start = getattr(model_config, "bos_token_id", None)
        start = tok.cls_token_id if start is None else start
        # As GIT's docs: [CLS] + prompt, without the trailing [SEP] (that would end it).
        ids = [start, *tok(prompt, add_special_tokens=False).input_ids]
        return {"input_ids": torch.tensor([ids] * n)}, len(ids)

    def build(self, spec: dict, tokenizer, out_dir: str | Path, *, seed: int = 0) -> Path:
        """Save a randomly initialised GIT shaped by a preset `spec`, with `tokenizer`'s
        vocabulary and special ids, plus its `GitProcessor`, to `out_dir`. `seed` fixes the
        initial weights (a local generator: the caller's global RNG is untouched)."""
        # Imported here: without torchvision, importing it logs a fallback warning that commands
        # which never build a model (`captioner show`) should not print.
        from transformers import CLIPImageProcessor

        size = spec["image_size"]
        image_processor = CLIPImageProcessor(
            size={"shortest_edge": size}, crop_size={"height": size, "width": size}
        )
        config = GitConfig(
            vision_config=spec["vision_config"],
            vocab_size=len(tokenizer),
            hidden_size=spec["hidden_size"],
            intermediate_size=spec["intermediate_size"],
            num_hidden_layers=spec["num_hidden_layers"],
            num_attention_heads=spec["num_attention_heads"],
            max_position_embeddings=spec["max_position_embeddings"],
            bos_token_id=tokenizer.cls_token_id,
            eos_token_id=tokenizer.sep_token_id,
            pad_token_id=tokenizer.pad_token_id,
            tie_word_embeddings=True,
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = GitForCausalLM(config)
        model.generation_config.bos_token_id = tokenizer.cls_token_id
        model.generation_config.eos_token_id = tokenizer.sep_token_id
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(out)
        GitProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(out)
        n_params = sum(p.numel() for p in model.parameters())
        log.info("built GIT: %.2fM parameters, vocab %d -> %s", n_params / 1e6, len(tokenizer), out)
        return out
