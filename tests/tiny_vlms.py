"""Tiny random checkpoints of real transformers vision-language families, built offline.

Each kind is saved with `save_pretrained` (model, processor, tokenizer, chat template) so that it
loads back like a Hub checkpoint; the sizes are small enough that a forward + backward pass on a
batch of 8 takes a few milliseconds on one CPU thread, which lets tests train them to memorise a
handful of captions. Tokenizers are byte-level BPE trained on the captions, so decoding is exact.

Two families' processors (SmolVLM, Qwen2-VL / Qwen2.5-VL) take a video processor that imports
torchvision, which has no CPU build here: they are built and loaded image-only (`load_processor`).
This module imports only transformers, tokenizers, torch and PIL, never `captioner`: the merged
models are reloaded by it in a process that must not import captioner, so `image_only` and
`load_processor` repeat what `captioner.models.families.processors` does, on purpose.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoImageProcessor,
    AutoProcessor,
    AutoTokenizer,
    GenerationConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    ProcessorMixin,
)

# Prompts the tokenizers see at training time, so that a caption prompt costs few tokens.
PROMPT_WORDS = (
    "Caption: Describe the image. Describe this image. What does the image describe? "
    "caption en You are a helpful assistant. User: Assistant: user assistant model system"
)
SEED = 0
N_QUERIES = 8  # BLIP-2 / InstructBLIP Q-Former queries = image tokens


def _byte_level_tokenizer(
    texts: Sequence[str],
    special_tokens: Sequence[str],
    *,
    bos: str | None = None,
    eos: str,
    pad: str,
    unk: str | None = None,
    extra_special_tokens: dict[str, str] | None = None,
    template: str | None = None,
    chat_template: str | None = None,
    vocab_size: int = 400,
) -> PreTrainedTokenizerFast:
    """A byte-level BPE, so `decode(encode(x)) == x` for any caption. `template` is the
    post-processor's single-sequence template (e.g. "<s> $A") for families whose tokenizer adds
    BOS/EOS itself; chat families get none, their template writes every special token."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        [*texts, PROMPT_WORDS],
        trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=list(special_tokens),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    if template is not None:
        used = [t for t in special_tokens if t in template]
        tok.post_processor = processors.TemplateProcessing(
            single=template, special_tokens=[(t, tok.token_to_id(t)) for t in used]
        )
    kwargs: dict[str, Any] = {"eos_token": eos, "pad_token": pad}
    if bos is not None:
        kwargs["bos_token"] = bos
    if unk is not None:
        kwargs["unk_token"] = unk
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, extra_special_tokens=extra_special_tokens or {}, **kwargs
    )
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    return tokenizer


def image_only(processor_class: type[ProcessorMixin]) -> type[ProcessorMixin]:
    """`processor_class` without its video processor, under the same name (so the saved
    `processor_class` still names the real one). Needed because constructing or loading a video
    processor imports torchvision, and ProcessorMixin requires every sub-processor in `__init__`'s
    signature; the subclass's signature drops `video_processor`, and the parent's positional
    `super().__init__(image_processor, tokenizer, video_processor)` is truncated to match.
    SmolVLM's `apply_chat_template` override only reads video sampling defaults (from the video
    processor), so the image-only class uses the base one."""
    if "video_processor" not in inspect.signature(processor_class.__init__).parameters:
        return processor_class

    def __init__(self: ProcessorMixin, image_processor: Any, tokenizer: Any, **kwargs: Any) -> None:
        processor_class.__init__(
            self,
            image_processor=image_processor,
            tokenizer=tokenizer,
            video_processor=None,
            **kwargs,
        )

    sig = inspect.signature(processor_class.__init__)
    # to_dict() saves the __init__ arguments it finds in the signature (image_seq_len, ...).
    __init__.__signature__ = sig.replace(  # type: ignore[attr-defined]
        parameters=[p for name, p in sig.parameters.items() if name != "video_processor"]
    )
    return type(
        processor_class.__name__,
        (processor_class,),
        {
            "__init__": __init__,
            "__module__": processor_class.__module__,
            "apply_chat_template": ProcessorMixin.apply_chat_template,
        },
    )


def load_processor(path: str | Path) -> ProcessorMixin:
    """AutoProcessor, or, where the family's processor wants a video processor (and so
    torchvision), the same processor class built image-only from the saved parts."""
    try:
        return AutoProcessor.from_pretrained(path)
    except (ImportError, OSError, AttributeError):
        path = Path(path)
        config = json.loads((path / "processor_config.json").read_text())
        processor_class = getattr(__import__("transformers"), config["processor_class"])
        extra = {
            k: v
            for k, v in config.items()
            if k not in ("processor_class", "auto_map", "image_processor", "video_processor")
        }
        template = path / "chat_template.jinja"
        if template.exists():
            extra["chat_template"] = template.read_text()
        return image_only(processor_class)(
            image_processor=AutoImageProcessor.from_pretrained(path),
            tokenizer=AutoTokenizer.from_pretrained(path),
            **extra,
        )


def _save(
    model: PreTrainedModel, processor: ProcessorMixin, out_dir: Path, eos_token_id: int
) -> Path:
    """Save like a Hub checkpoint, with greedy generation stopping at the end-of-turn token."""
    tokenizer = processor.tokenizer
    model.generation_config = GenerationConfig(
        eos_token_id=eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        decoder_start_token_id=getattr(model.config, "decoder_start_token_id", None),
        max_new_tokens=32,
        do_sample=False,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return out_dir


def _llama(vocab_size: int, tok: PreTrainedTokenizerFast, **kwargs: Any) -> dict[str, Any]:
    """A tiny Llama-shaped text config (as a dict, so each family can pick its own class)."""
    return {
        "vocab_size": vocab_size,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "max_position_embeddings": 256,
        "pad_token_id": tok.pad_token_id,
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        **kwargs,
    }


def _siglip(image_size: int, patch_size: int, **kwargs: Any) -> dict[str, Any]:
    return {
        "model_type": "siglip_vision_model",
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "image_size": image_size,
        "patch_size": patch_size,
        **kwargs,
    }


# --- SmolVLM / Idefics3 ------------------------------------------------------------------------

# The real SmolVLM-Instruct / Idefics3 template ("User:<image>...<end_of_utterance>\nAssistant:").
IDEFICS3_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}"
    "<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


def _idefics3_like(kind: str, out_dir: Path, captions: list[str]) -> Path:
    """One 32 px image, no splitting: 16 patches of 8 px, pixel-shuffled (scale 2) to 4 tokens."""
    import transformers

    prefix = "SmolVLM" if kind == "smolvlm" else "Idefics3"
    specials = ["<|endoftext|>", "<|im_start|>", "<end_of_utterance>", "<image>",
                "<fake_token_around_image>", "<global-img>"]  # fmt: skip
    tok = _byte_level_tokenizer(
        captions, specials, eos="<end_of_utterance>", pad="<|endoftext|>",
        extra_special_tokens={
            "image_token": "<image>", "fake_image_token": "<fake_token_around_image>",
            "end_of_utterance_token": "<end_of_utterance>", "global_image_token": "<global-img>",
        },
    )  # fmt: skip
    image_processor = getattr(transformers, f"{prefix}ImageProcessorPil")(
        do_image_splitting=False,
        size={"longest_edge": 32},
        max_image_size={"longest_edge": 32},
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    processor = image_only(getattr(transformers, f"{prefix}Processor"))(
        image_processor=image_processor, tokenizer=tok, image_seq_len=4,
        chat_template=IDEFICS3_TEMPLATE,
    )  # fmt: skip
    config = getattr(transformers, f"{prefix}Config")(
        vision_config={
            "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
            "num_attention_heads": 2, "image_size": 32, "patch_size": 8,
        },
        text_config={"model_type": "llama", **_llama(len(tok), tok)},
        scale_factor=2,
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        pad_token_id=tok.pad_token_id,
    )  # fmt: skip
    torch.manual_seed(SEED)
    model = getattr(transformers, f"{prefix}ForConditionalGeneration")(config)
    return _save(model, processor, out_dir, tok.convert_tokens_to_ids("<end_of_utterance>"))


# --- Qwen2-VL / Qwen2.5-VL ---------------------------------------------------------------------

# The real Qwen2-VL-Instruct template (also Qwen2.5-VL's).
QWEN2_VL_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _qwen2_vl_like(kind: str, out_dir: Path, captions: list[str]) -> Path:
    """Images resized to exactly 32x32 px (min_pixels = max_pixels): 4x4 patches of 8 px, merged
    2x2 into 4 tokens. The text model's M-RoPE sections must sum to head_dim / 2 (16 / 2)."""
    import transformers

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>",
                "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]  # fmt: skip
    tok = _byte_level_tokenizer(
        captions, specials, eos="<|im_end|>", pad="<|endoftext|>",
        extra_special_tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"},
    )  # fmt: skip
    image_processor = transformers.Qwen2VLImageProcessorPil(
        patch_size=8, merge_size=2, temporal_patch_size=2,
        min_pixels=32 * 32, max_pixels=32 * 32,
        size={"shortest_edge": 32 * 32, "longest_edge": 32 * 32},
    )  # fmt: skip
    processor_class = (
        transformers.Qwen2VLProcessor if kind == "qwen2_vl" else transformers.Qwen2_5_VLProcessor
    )
    processor = image_only(processor_class)(
        image_processor=image_processor, tokenizer=tok, chat_template=QWEN2_VL_TEMPLATE
    )
    text = _llama(
        len(tok), tok,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
    )  # fmt: skip
    ids = {
        "image_token_id": tok.convert_tokens_to_ids("<|image_pad|>"),
        "video_token_id": tok.convert_tokens_to_ids("<|video_pad|>"),
        "vision_start_token_id": tok.convert_tokens_to_ids("<|vision_start|>"),
        "vision_end_token_id": tok.convert_tokens_to_ids("<|vision_end|>"),
    }
    if kind == "qwen2_vl":
        vision = {"depth": 1, "embed_dim": 32, "hidden_size": 32, "num_heads": 2,
                  "patch_size": 8, "spatial_merge_size": 2, "temporal_patch_size": 2}  # fmt: skip
        config = transformers.Qwen2VLConfig(text_config=text, vision_config=vision, **ids)
        model_class: type[PreTrainedModel] = transformers.Qwen2VLForConditionalGeneration
    else:
        vision = {"depth": 1, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2,
                  "out_hidden_size": 32, "patch_size": 8, "spatial_merge_size": 2,
                  "temporal_patch_size": 2, "window_size": 32,
                  "fullatt_block_indexes": [0]}  # fmt: skip
        config = transformers.Qwen2_5_VLConfig(text_config=text, vision_config=vision, **ids)
        model_class = transformers.Qwen2_5_VLForConditionalGeneration
    torch.manual_seed(SEED)
    model = model_class(config)
    return _save(model, processor, out_dir, tok.convert_tokens_to_ids("<|im_end|>"))


# --- PaliGemma / Gemma 3 -----------------------------------------------------------------------


def _paligemma(kind: str, out_dir: Path, captions: list[str]) -> Path:
    """No chat template: the processor writes `<image>*n<bos>prompt\\n` and, given `suffix=`,
    appends the caption + <eos> and returns labels and token_type_ids itself."""
    import transformers

    tok = _byte_level_tokenizer(
        captions, ["<pad>", "<eos>", "<bos>", "<unk>", "<image>"],
        bos="<bos>", eos="<eos>", pad="<pad>", unk="<unk>",
        extra_special_tokens={"image_token": "<image>"},
    )  # fmt: skip
    image_processor = transformers.SiglipImageProcessorPil(
        size={"height": 32, "width": 32}, image_seq_length=16
    )
    # The processor adds PaliGemma's 1,152 <loc>/<seg> tokens: size the vocabulary after it.
    processor = transformers.PaliGemmaProcessor(image_processor=image_processor, tokenizer=tok)
    config = transformers.PaliGemmaConfig(
        vision_config=_siglip(32, 8, projection_dim=32),
        text_config={"model_type": "gemma", **_llama(len(tok), tok, head_dim=16)},
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        projection_dim=32,
        hidden_size=32,
        vocab_size=len(tok),
    )
    torch.manual_seed(SEED)
    model = transformers.PaliGemmaForConditionalGeneration(config)
    return _save(model, processor, out_dir, tok.eos_token_id)


# The real Gemma 3 template (system prompt folded into the first user turn).
GEMMA3_TEMPLATE = (
    "{{ bos_token }}{%- if messages[0]['role'] == 'system' -%}"
    "{%- if messages[0]['content'] is string -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}{%- else -%}"
    "{%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}{%- endif -%}"
    '{%- set loop_messages = messages[1:] -%}{%- else -%}{%- set first_user_prefix = "" -%}'
    "{%- set loop_messages = messages -%}{%- endif -%}{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'assistant') -%}{%- set role = \"model\" -%}{%- else -%}"
    "{%- set role = message['role'] -%}{%- endif -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else \"\") }}"
    "{%- if message['content'] is string -%}{{ message['content'] | trim }}"
    "{%- elif message['content'] is iterable -%}{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{{ '<start_of_image>' }}"
    "{%- elif item['type'] == 'text' -%}{{ item['text'] | trim }}{%- endif -%}{%- endfor -%}"
    "{%- endif -%}{{ '<end_of_turn>\n' }}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{'<start_of_turn>model\n'}}{%- endif -%}"
)


def _gemma3(kind: str, out_dir: Path, captions: list[str]) -> Path:
    """SigLIP at 32 px (16 patches) average-pooled to 4 tokens per image. The processor reads
    boi/eoi/image tokens from tokenizer attributes, hence `extra_special_tokens`."""
    import transformers

    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>",
                "<start_of_image>", "<end_of_image>", "<image_soft_token>"]  # fmt: skip
    tok = _byte_level_tokenizer(
        captions, specials, bos="<bos>", eos="<eos>", pad="<pad>", unk="<unk>",
        extra_special_tokens={
            "boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
            "image_token": "<image_soft_token>",
        },
    )  # fmt: skip
    image_processor = transformers.Gemma3ImageProcessorPil(
        size={"height": 32, "width": 32}, do_pan_and_scan=False
    )
    processor = transformers.Gemma3Processor(
        image_processor=image_processor, tokenizer=tok, chat_template=GEMMA3_TEMPLATE,
        image_seq_length=4,
    )  # fmt: skip
    text = _llama(
        len(tok), tok, head_dim=16, query_pre_attn_scalar=16, sliding_window=64,
        layer_types=["sliding_attention", "full_attention"],
    )  # fmt: skip
    config = transformers.Gemma3Config(
        text_config=text,
        vision_config=_siglip(32, 8),
        mm_tokens_per_image=4,
        boi_token_index=tok.convert_tokens_to_ids("<start_of_image>"),
        eoi_token_index=tok.convert_tokens_to_ids("<end_of_image>"),
        image_token_index=tok.convert_tokens_to_ids("<image_soft_token>"),
    )
    torch.manual_seed(SEED)
    model = transformers.Gemma3ForConditionalGeneration(config)
    return _save(model, processor, out_dir, tok.convert_tokens_to_ids("<end_of_turn>"))


# --- Florence-2 --------------------------------------------------------------------------------


def _florence2(kind: str, out_dir: Path, captions: list[str]) -> Path:
    """Encoder-decoder (DaViT + BART). The processor turns the task token `<CAPTION>` into its
    question and writes `<image>*n<s>question</s>`; labels are `tokenizer(caption)` =
    `<s>caption</s>`. Stage strides of 2 (not 4, 2, 2, 2) leave a 2x2 map of a 32 px image: with
    the pooled token, 5 image tokens (a 1x1 map was too little to tell 8 colours apart).
    At the default 0.02 init a random BART is deaf to its image: its residual stream is
    LayerNorm-ed to unit scale, while cross-attention adds ~0.02 * 0.02 * d_model, so the logits
    barely depend on the image and training settles at "any colour" (loss ~ ln(8) / 9). Wider
    inits (text 0.2, vision 0.5) make it memorise in ~30-45 steps. The top-level config needs
    `decoder_start_token_id` (`</s>`, as in the real checkpoints): without it, `generate` starts
    from `<s>`, not the `</s>` the labels are shifted behind."""
    import transformers

    tok = _byte_level_tokenizer(
        captions, ["<s>", "<pad>", "</s>", "<unk>", "<image>"],
        bos="<s>", eos="</s>", pad="<pad>", unk="<unk>",
        extra_special_tokens={"image_token": "<image>"}, template="<s> $A </s>",
    )  # fmt: skip
    image_processor = transformers.CLIPImageProcessorPil(
        size={"height": 32, "width": 32}, crop_size={"height": 32, "width": 32},
        do_center_crop=False, image_seq_length=5,
    )  # fmt: skip
    processor = transformers.Florence2Processor(image_processor=image_processor, tokenizer=tok)
    vision = {"depths": [1, 1, 1, 1], "patch_size": [3, 3, 3, 3], "patch_stride": [2, 2, 2, 2],
              "patch_padding": [1, 1, 1, 1], "embed_dim": [16, 16, 32, 32],
              "num_heads": [1, 1, 2, 2], "num_groups": [1, 1, 2, 2], "window_size": 2,
              "projection_dim": 32, "drop_path_rate": 0.0, "initializer_range": 0.5}  # fmt: skip
    text = {"vocab_size": len(tok), "d_model": 32, "encoder_layers": 1, "decoder_layers": 1,
            "encoder_attention_heads": 2, "decoder_attention_heads": 2, "encoder_ffn_dim": 64,
            "decoder_ffn_dim": 64, "max_position_embeddings": 128, "dropout": 0.0,
            "pad_token_id": tok.pad_token_id, "bos_token_id": tok.bos_token_id,
            "eos_token_id": tok.eos_token_id, "decoder_start_token_id": tok.eos_token_id,
            "forced_bos_token_id": None, "forced_eos_token_id": None, "init_std": 0.2}  # fmt: skip
    config = transformers.Florence2Config(
        text_config=text, vision_config=vision,
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        decoder_start_token_id=tok.eos_token_id,
    )  # fmt: skip
    torch.manual_seed(SEED)
    model = transformers.Florence2ForConditionalGeneration(config)
    return _save(model, processor, out_dir, tok.eos_token_id)


# --- BLIP-2 / InstructBLIP ---------------------------------------------------------------------


def _blip2_like(kind: str, out_dir: Path, captions: list[str]) -> Path:
    """ViT at 32 px + a 1-layer Q-Former with 4 queries + an OPT (BLIP-2) or Llama
    (InstructBLIP, as the Vicuna checkpoints) decoder. The processor prefixes `<image>` * 4 and
    the tokenizer adds BOS, as OPT's does. Both vision configs default to initializer_range=1e-10,
    which makes every image look the same to a random model: reset to 0.02. The Q-Former is
    post-LayerNorm like BART, so at 0.02 its cross-attention barely reads the image (see
    `_florence2`): its init of 0.2 cuts the steps to memorise 8 captions from ~370-400 to ~100-120
    (lr 3e-3). The tokenizer must
    not have an `image_token` attribute: the processors then take it as a str and fail on
    `.content` (transformers 5.25); without it they add `<image>` (already in the vocabulary)."""
    import transformers

    tok = _byte_level_tokenizer(
        captions, ["<pad>", "<s>", "</s>", "<image>"], bos="<s>", eos="</s>", pad="<pad>",
        template="<s> $A",
    )  # fmt: skip
    image_processor = transformers.BlipImageProcessorPil(size={"height": 32, "width": 32})
    vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
              "num_attention_heads": 2, "image_size": 32, "patch_size": 8,
              "initializer_range": 0.02}  # fmt: skip
    qformer = {"vocab_size": len(tok), "hidden_size": 32, "num_hidden_layers": 1,
               "num_attention_heads": 2, "intermediate_size": 64, "hidden_dropout_prob": 0.0,
               "attention_probs_dropout_prob": 0.0, "encoder_hidden_size": 32,
               "max_position_embeddings": 128, "cross_attention_frequency": 1,
               "initializer_range": 0.2}  # fmt: skip
    image_token_index = tok.convert_tokens_to_ids("<image>")
    if kind == "blip-2":
        processor: ProcessorMixin = transformers.Blip2Processor(
            image_processor=image_processor, tokenizer=tok, num_query_tokens=N_QUERIES
        )
        text = {"model_type": "opt", "vocab_size": len(tok), "hidden_size": 32,
                "ffn_dim": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                "word_embed_proj_dim": 32, "max_position_embeddings": 256, "dropout": 0.0,
                "pad_token_id": tok.pad_token_id, "bos_token_id": tok.bos_token_id,
                "eos_token_id": tok.eos_token_id}  # fmt: skip
        config: Any = transformers.Blip2Config(
            vision_config=vision, qformer_config=qformer, text_config=text,
            num_query_tokens=N_QUERIES, image_token_index=image_token_index,
        )  # fmt: skip
        model_class: type[PreTrainedModel] = transformers.Blip2ForConditionalGeneration
    else:
        # The Q-Former reads the prompt too, through its own tokenizer (BERT's in the real ones).
        qformer_tok = _byte_level_tokenizer(
            captions, ["[PAD]", "[CLS]", "[SEP]"], bos="[CLS]", eos="[SEP]", pad="[PAD]",
            template="[CLS] $A [SEP]", vocab_size=300,
        )  # fmt: skip
        processor = transformers.InstructBlipProcessor(
            image_processor=image_processor, tokenizer=tok, qformer_tokenizer=qformer_tok,
            num_query_tokens=N_QUERIES,
        )  # fmt: skip
        qformer["vocab_size"] = len(qformer_tok)
        qformer["pad_token_id"] = qformer_tok.pad_token_id
        config = transformers.InstructBlipConfig(
            vision_config=vision, qformer_config=qformer,
            text_config={"model_type": "llama", **_llama(len(tok), tok)},
            num_query_tokens=N_QUERIES, image_token_index=image_token_index,
        )  # fmt: skip
        model_class = transformers.InstructBlipForConditionalGeneration
    torch.manual_seed(SEED)
    model = model_class(config)
    return _save(model, processor, out_dir, tok.eos_token_id)


# --- LLaVA-NeXT --------------------------------------------------------------------------------

# llava-v1.6-mistral's template, its assistant turn ending in the real EOS (the Hub's says '<\s>').
LLAVA_NEXT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' %}"
    "{{ '<<SYS>>\n' + message['content'][0]['text'] + '\n<</SYS>>\n\n' }}"
    "{% elif message['role'] == 'user' %}{{ '[INST] ' }}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] }}{% endfor %}{{' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{{ ' ' + message['content'][0]['text'] + eos_token }}{% endif %}{% endfor %}"
)


def _llava_next(kind: str, out_dir: Path, captions: list[str]) -> Path:
    """CLIP at 32 px (4x4 patches of 8 px) with a single 32x32 grid pinpoint: every image becomes
    the base view + one tile, 16 + 16 features, plus one image_newline per row of the tile."""
    import transformers

    tok = _byte_level_tokenizer(
        captions, ["<unk>", "<s>", "</s>", "<image>"], bos="<s>", eos="</s>", pad="<unk>",
        unk="<unk>", extra_special_tokens={"image_token": "<image>"}, template="<s> $A",
    )  # fmt: skip
    image_processor = transformers.LlavaNextImageProcessorPil(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
        image_grid_pinpoints=[[32, 32]],
    )  # fmt: skip
    processor = transformers.LlavaNextProcessor(
        image_processor=image_processor, tokenizer=tok, patch_size=8,
        vision_feature_select_strategy="default", num_additional_image_tokens=1,
        chat_template=LLAVA_NEXT_TEMPLATE,
    )  # fmt: skip
    vision = {"model_type": "clip_vision_model", "hidden_size": 32, "intermediate_size": 64,
              "num_hidden_layers": 1, "num_attention_heads": 2, "image_size": 32,
              "patch_size": 8, "projection_dim": 32}  # fmt: skip
    config = transformers.LlavaNextConfig(
        vision_config=vision,
        text_config={"model_type": "llama", **_llama(len(tok), tok)},
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        image_grid_pinpoints=[[32, 32]],
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
    )
    torch.manual_seed(SEED)
    model = transformers.LlavaNextForConditionalGeneration(config)
    return _save(model, processor, out_dir, tok.eos_token_id)


_BUILDERS: dict[str, Callable[[str, Path, list[str]], Path]] = {
    "smolvlm": _idefics3_like,
    "idefics3": _idefics3_like,
    "qwen2_vl": _qwen2_vl_like,
    "qwen2_5_vl": _qwen2_vl_like,
    "paligemma": _paligemma,
    "gemma3": _gemma3,
    "florence2": _florence2,
    "blip-2": _blip2_like,
    "instructblip": _blip2_like,
    "llava_next": _llava_next,
}
TINY_VLM_KINDS: tuple[str, ...] = tuple(_BUILDERS)

# Training steps (AdamW, constant lr 3e-3, no warmup, batch 8) after which greedy generation
# reproduces test_families' 8 captions: about 2x the step from which they stayed exact (the
# comments; measured every 10 steps).
MEMORISE_STEPS: dict[str, int] = {
    "smolvlm": 140,  # 70
    "idefics3": 140,  # 70
    "qwen2_vl": 200,  # 100
    "qwen2_5_vl": 160,  # 80
    "paligemma": 280,  # 140
    "gemma3": 220,  # 110
    "florence2": 100,  # 50
    "blip-2": 180,  # 90
    "instructblip": 160,  # 80
    "llava_next": 150,  # 70 (the simpler captions: first exact at 75, lost again at 80-95)
}


def build_tiny_vlm(kind: str, out_dir: Path, captions: list[str]) -> Path:
    """Build and save a tiny random `kind` model (one of TINY_VLM_KINDS) whose tokenizer was
    trained on `captions`; returns `out_dir`."""
    if kind not in _BUILDERS:
        raise ValueError(f"unknown kind {kind!r}; expected one of {', '.join(TINY_VLM_KINDS)}")
    return _BUILDERS[kind](kind, Path(out_dir), list(captions))
