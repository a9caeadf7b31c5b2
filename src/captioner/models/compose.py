"""Captioners composed from a pretrained vision tower and a text model, in transformers' own
composite classes, so every result loads with plain `from_pretrained`.

A composition is written as a spec: `vision=NAME,text=NAME[,key=value...]` on the command line
(`captioner train --model vision=dinov2-small,text=scratch,vision_layers=6`), or a preset JSON
file in `presets/` (`dinov2-tiny`, `dinov2-drawings`, `dinov2-smollm2`, `dinov2-smollm2-full`).
The parts:

- `vision`: a part name (`captioner parts list`: converted once from a registry package), a
  local folder or a Hub id of any AutoModel vision tower (DINOv2, ViT, SigLIP/CLIP vision...).
  `vision_layers=N` keeps its first N layers: DINOv2's self-supervised features lose colour in
  the last layers (a linear probe reads colour at 1.00 from layers 2-4, 0.94 at layer 12), and a
  shorter tower is faster. `image_size=N` resizes inputs to N x N pixels.
- `text`: `scratch` (a small BERT decoder with cross-attention and a lossless byte-level BPE
  tokenizer trained on the training captions: `decoder_*` keys size it), a folder / Hub id of a
  decoder that takes cross-attention (BERT/MiniLM, GPT-2, ...), loaded with
  `add_cross_attention=True`, or a decoder-only LM without cross-attention (Llama/SmolLM2,
  Qwen2, Gemma, ...). `text_layers=N` keeps N of a pretrained text model's layers, the first
  N // 4 and the last N - N // 4 (`0+1+28+29` names them), with its embeddings, final norm and
  head: on a CPU the LM is most of a LLaVA step, and LoRA adapts what is left (`dinov2-smollm2`
  keeps 6 of SmolLM2's 30: bench/RESULTS.md).

Two families (`family=`; unset, it follows from `text`):

- `vision-encoder-decoder`: `VisionEncoderDecoderModel`, the decoder cross-attends to the tower
  (`text=scratch` and decoders with cross-attention).
- `llava`: `LlavaForConditionalGeneration`, for decoder-only LMs, which cannot cross-attend: the
  tower's hidden states (`vision_feature_layer`, default the last kept layer; `full` keeps
  DINOv2's CLS token) go through a 2-layer MLP projector (the only part that starts random) into
  the LM's input sequence, at the positions of an added `<image>` token. Several layers
  (`vision_feature_layer=3+6`, a list in a preset) are concatenated on the feature axis, as
  transformers' LLaVA does (the projector input widens; plain `from_pretrained` loads it).
  VisionEncoderDecoder takes the last kept layer only: for it the layer choice is the cut
  (`vision_layers`; 6 for the scenes, 9 for real drawings: bench/RESULTS.md). Pretrained
  tower and LM weights are loaded whole (every key must match).

The LLaVA caption prompt is saved with the model as the processor's chat template
(`chat_template.jinja`): a user turn renders as its images (`<image>`, which the processor
expands to one token per image feature: 65 for DINOv2 at 112 px with 14 px patches, CLS kept)
then its text, and a user turn without text gets the saved caption prompt (`prompt=`, default
"Caption:"). Training teaches `<prompt ids> + " " + caption + eos`, with loss on the caption and
eos only. Plain transformers reproduces a caption with:

    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}]}], add_generation_prompt=True
    )  # "<image>Caption:"
    inputs = processor(images=image, text=prompt, return_tensors="pt")
    ids = model.generate(**inputs, max_new_tokens=30)[:, inputs.input_ids.shape[1]:]
    caption = processor.batch_decode(ids, skip_special_tokens=True)[0].strip()

The vision tower is frozen by default (`--freeze vision`), and its outputs are computed once per
image and cached (features.py): VisionEncoderDecoder's decoder then cross-attends to the cached
encoder outputs, and LLaVA's projector reads the cached hidden states it selects
(families/llava.py), so only the decoder side runs in a training step. That is what makes
fine-tuning a small decoder on a CPU fast; for SmolLM2-135M the LM itself dominates a step
(bench/RESULTS.md).
"""

from __future__ import annotations

import inspect
import logging
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForCausalLM,
    AutoTokenizer,
    BertConfig,
    BertLMHeadModel,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    VisionEncoderDecoderModel,
    VisionTextDualEncoderProcessor,
)
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING
from transformers.utils import logging as hf_logging

from captioner.errors import CaptionerError
from captioner.models.families.llava import DEFAULT_PROMPT, IMAGE_TOKEN, caption_template
from captioner.models.parts import get_part, is_part
from captioner.models.tokenizer import train_caption_tokenizer

log = logging.getLogger(__name__)

SCRATCH = "scratch"
VED = "vision-encoder-decoder"
LLAVA = "llava"
FAMILIES = (VED, LLAVA)
# Backbone bookkeeping that goes stale when layers are dropped (VED's config check then fails).
_BACKBONE_KEYS = ("stage_names", "out_features", "out_indices", "architectures")


@dataclass
class CompositeSpec:
    """How to build a composed captioner (see the module docstring)."""

    vision: str
    text: str = SCRATCH
    vision_layers: int | None = None
    image_size: int | None = None
    # A pretrained LM/decoder's layers to keep (its embeddings, final norm and head stay): N
    # keeps the first N // 4 and the last N - N // 4 (the last layers turn the hidden state
    # into words: SmolLM2's first 8 alone heal far slower under LoRA than 2 + 6,
    # bench/RESULTS.md); `0+1+28+29` names them. On a CPU the LM is most of a LLaVA step; LoRA
    # adapts what is left.
    text_layers: int | list[int] | None = None
    decoder_hidden_size: int = 256
    decoder_layers: int = 2
    decoder_heads: int = 4
    max_caption_tokens: int = 32
    tokenizer_vocab_size: int = 1000
    family: str | None = None  # vision-encoder-decoder | llava; unset: follows from `text`
    prompt: str = DEFAULT_PROMPT  # llava: the text after the image tokens
    # llava: which hidden state(s) of the (cut) tower feed the LM; several (`3+6` on the command
    # line, a list in a preset) are concatenated on the feature axis, as transformers' LLaVA
    # does: early layers keep colour, later ones meaning (the projector input widens).
    vision_feature_layer: int | list[int] = -1
    vision_feature_select_strategy: str = "full"  # llava: full keeps CLS, default drops it
    extra: dict[str, Any] = field(default_factory=dict)  # unknown keys: reported, not used

    @classmethod
    def parse(cls, text: str) -> CompositeSpec:
        """`vision=dinov2-small,text=scratch,vision_layers=6` -> a spec; errors name the key."""
        values: dict[str, Any] = {}
        for item in text.split(","):
            key, sep, value = item.partition("=")
            if not sep or not value.strip():
                raise CaptionerError(f"--model {text!r}: expected key=value items, got {item!r}")
            values[key.strip()] = value.strip()
        return cls.from_dict(values, where=f"--model {text!r}")

    @classmethod
    def from_dict(cls, values: dict[str, Any], where: str = "spec") -> CompositeSpec:
        known = {f.name: f for f in fields(cls) if f.name != "extra"}
        unknown = sorted(set(values) - set(known) - {"_comment"})
        if unknown:
            raise CaptionerError(f"{where}: unknown key(s) {', '.join(unknown)}")
        if "vision" not in values:
            raise CaptionerError(f"{where}: needs vision=NAME (a part, folder or Hub id)")
        typed: dict[str, Any] = {}
        for key, value in values.items():
            if key == "_comment":
                continue
            if known[key].type in ("int | list[int]", "int | list[int] | None"):
                typed[key] = _layers(value, key, where)
                continue
            kind = int if known[key].type in ("int", "int | None") else str
            try:
                typed[key] = kind(value)
            except ValueError:
                raise CaptionerError(f"{where}: {key} must be a whole number") from None
        return cls(**typed)


def _layers(value: Any, key: str, where: str) -> int | list[int]:
    """`-1`, `3+6` or [3, 6] -> an int or a list of ints (one layer stays an int)."""
    items = value if isinstance(value, list) else str(value).split("+")
    try:
        layers = [int(v) for v in items]
    except (TypeError, ValueError):
        raise CaptionerError(
            f"{where}: {key} must be a layer number or several joined by +"
        ) from None
    if not layers:
        raise CaptionerError(f"{where}: {key} names no layer")
    return layers[0] if len(layers) == 1 else layers


def is_spec(name: str) -> bool:
    """A composition written on the command line (`vision=...,text=...`)."""
    return "vision=" in str(name)


def build_composite(
    spec: CompositeSpec, captions: list[str], out_dir: str | Path, *, seed: int = 0
) -> Path:
    """Build the composite `spec.family` names (unset: the one `spec.text` fits) and save it to
    `out_dir`."""
    family = composite_family(spec)
    if family == LLAVA:
        return build_llava(spec, out_dir, seed=seed)
    return build_vision_encoder_decoder(spec, captions, out_dir, seed=seed)


def composite_family(spec: CompositeSpec) -> str:
    """`spec.family`, checked against the text model; unset, llava for a decoder-only LM (it has
    no cross-attention to put into a VisionEncoderDecoder) and vision-encoder-decoder otherwise."""
    if spec.family is not None and spec.family not in FAMILIES:
        raise CaptionerError(
            f"unknown composite family {spec.family!r} (choose from {', '.join(FAMILIES)})"
        )
    if spec.text == SCRATCH:
        if spec.text_layers is not None:
            raise CaptionerError(
                "text_layers cuts a pretrained text model; size scratch with decoder_layers"
            )
        if spec.family == LLAVA:
            raise CaptionerError(
                "family=llava needs text=a decoder-only LM (a part, folder or Hub id), not scratch"
            )
        return VED
    config = _quietly(AutoConfig.from_pretrained, _resolve(spec.text))
    decoder_only = is_decoder_only(config)
    if spec.family == VED and decoder_only:
        raise CaptionerError(
            f"text={spec.text} ({config.model_type}) has no cross-attention for a "
            "VisionEncoderDecoder: use family=llava"
        )
    if spec.family == LLAVA and not decoder_only:
        raise CaptionerError(
            f"text={spec.text} ({config.model_type}) is not a decoder-only LM: "
            "use family=vision-encoder-decoder"
        )
    return spec.family or (LLAVA if decoder_only else VED)


def is_decoder_only(config) -> bool:
    """A causal LM that cannot take cross-attention (Llama, Qwen2, Gemma...): its class's forward
    has no `encoder_hidden_states` (BERT's and GPT-2's have)."""
    causal = MODEL_FOR_CAUSAL_LM_MAPPING
    if getattr(config, "is_encoder_decoder", False) or type(config) not in causal:
        return False
    forward = causal[type(config)].forward
    return "encoder_hidden_states" not in inspect.signature(forward).parameters


def build_vision_encoder_decoder(
    spec: CompositeSpec, captions: list[str], out_dir: str | Path, *, seed: int = 0
) -> Path:
    """Build the composite and save model + processor to `out_dir` (loads with plain
    `VisionEncoderDecoderModel` / `AutoProcessor.from_pretrained`)."""
    vision_dir = _resolve(spec.vision)
    encoder = _vision_tower(vision_dir, spec.vision_layers)
    image_processor = _image_processor(vision_dir, spec.image_size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        decoder, tokenizer = _text_decoder(spec, captions)
    model = VisionEncoderDecoderModel(encoder=encoder, decoder=decoder)
    _set_special_tokens(model, tokenizer, spec.max_caption_tokens)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    # VED has no processor class of its own; this stock one pairs any image processor with any
    # tokenizer, and AutoProcessor loads it back.
    VisionTextDualEncoderProcessor(
        image_processor=image_processor, tokenizer=tokenizer
    ).save_pretrained(out)
    trainable = sum(p.numel() for p in decoder.parameters())
    log.info(
        "built %s + %s: %.1fM vision, %.2fM text parameters -> %s",
        spec.vision,
        spec.text,
        sum(p.numel() for p in encoder.parameters()) / 1e6,
        trainable / 1e6,
        out,
    )
    return out


def build_llava(spec: CompositeSpec, out_dir: str | Path, *, seed: int = 0) -> Path:
    """Build a LLaVA captioner (pretrained tower + pretrained decoder-only LM + a random MLP
    projector) and save model + processor to `out_dir` (loads with plain
    `LlavaForConditionalGeneration` / `AutoProcessor.from_pretrained`)."""
    if spec.text == SCRATCH:
        raise CaptionerError("family=llava needs text=a decoder-only LM, not scratch")
    if spec.vision_feature_select_strategy not in ("full", "default"):
        raise CaptionerError("vision_feature_select_strategy must be full or default")
    vision_dir, text_dir = _resolve(spec.vision), _resolve(spec.text)
    encoder = _vision_tower(vision_dir, spec.vision_layers)
    image_processor = _image_processor(vision_dir, spec.image_size)
    tokenizer = _quietly(AutoTokenizer.from_pretrained, text_dir)
    lm = _quietly(AutoModelForCausalLM.from_pretrained, text_dir, dtype=torch.float32)
    lm = _keep_layers(lm, spec.text_layers, spec.text)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.eos_token_id is None:
        raise CaptionerError(f"text={spec.text}: its tokenizer has no eos token to end captions")
    tokenizer.add_tokens([IMAGE_TOKEN], special_tokens=True)
    # BERT-style tokenizers also return token_type_ids, which LLaVA's forward rejects.
    tokenizer.model_input_names = ["input_ids", "attention_mask"]
    patch = encoder.config.patch_size
    height, width = _processed_size(image_processor, encoder.config)
    patches = (height // patch) * (width // patch)
    # Tokens besides the patches (CLS, registers), counted rather than assumed per tower type.
    with torch.no_grad():
        sequence = encoder(torch.zeros(1, 3, height, width)).last_hidden_state.shape[1]
    additional = sequence - patches
    image_tokens = sequence - (1 if spec.vision_feature_select_strategy == "default" else 0)
    config = LlavaConfig(
        vision_config=encoder.config,
        text_config=lm.config,
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        image_seq_length=image_tokens,
        vision_feature_layer=spec.vision_feature_layer,
        vision_feature_select_strategy=spec.vision_feature_select_strategy,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(config)
        _load_whole(model.model.vision_tower, encoder, spec.vision)
        _load_whole(model.model.language_model, lm.base_model, spec.text)
        if model.lm_head.weight is not model.get_input_embeddings().weight:  # untied LM head
            _load_whole(model.lm_head, lm.get_output_embeddings(), spec.text)
        with _hf_errors_only():  # not the notice that new rows start at the embeddings' mean
            model.resize_token_embeddings(len(tokenizer))
    del lm
    generation = model.generation_config
    generation.bos_token_id = tokenizer.bos_token_id
    generation.eos_token_id = tokenizer.eos_token_id
    generation.pad_token_id = tokenizer.pad_token_id
    generation.do_sample = False
    generation.max_length = None
    generation.max_new_tokens = spec.max_caption_tokens
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch,
        vision_feature_select_strategy=spec.vision_feature_select_strategy,
        num_additional_image_tokens=additional,
        chat_template=caption_template(spec.prompt),
        image_token=IMAGE_TOKEN,
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    log.info(
        "built LLaVA %s + %s: %d image tokens, %.1fM vision, %.1fM text, %.2fM projector "
        "parameters -> %s",
        spec.vision,
        spec.text,
        image_tokens,
        _millions(model.model.vision_tower),
        _millions(model.model.language_model),
        _millions(model.model.multi_modal_projector),
        out,
    )
    return out


def freeze(module: torch.nn.Module) -> int:
    """Stop training `module`; returns how many parameters were frozen."""
    count = 0
    for p in module.parameters():
        p.requires_grad_(False)
        count += p.numel()
    return count


def _millions(module: torch.nn.Module) -> float:
    return sum(p.numel() for p in module.parameters()) / 1e6


def _load_whole(target: torch.nn.Module, source: torch.nn.Module, name: str) -> None:
    """Copy every weight of `source` into `target`; any missing or unexpected key is an error
    (a part that only half loads would train from a silently random start)."""
    try:
        target.load_state_dict(source.state_dict(), strict=True)
    except RuntimeError as err:
        raise CaptionerError(f"{name}: its weights do not fit the composite: {err}") from None


def _processed_size(image_processor, vision_config) -> tuple[int, int]:
    """(height, width) of the images the processor produces."""
    crop = getattr(image_processor, "crop_size", None)
    if getattr(image_processor, "do_center_crop", False) and crop:
        return crop["height"], crop["width"]
    size = getattr(image_processor, "size", None) or {}
    if "height" in size:
        return size["height"], size["width"]
    side = size.get("shortest_edge", vision_config.image_size)
    return side, side


def _resolve(name: str) -> str:
    """A part name becomes its converted folder; a folder or Hub id stays as it is."""
    return str(get_part(name)) if is_part(name) else name


@contextmanager
def _hf_errors_only():
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)


def _quietly(load, *args, **kwargs):
    """Load without transformers' report of the weights it drops (the layers cut off)."""
    try:
        with _hf_errors_only():
            return load(*args, **kwargs)
    except (OSError, ValueError) as err:
        raise CaptionerError(f"cannot load {args[0]}: {err}") from None


def _vision_tower(name: str, layers: int | None) -> torch.nn.Module:
    config = _quietly(AutoConfig.from_pretrained, name)
    config = getattr(config, "vision_config", config)  # CLIP/SigLIP: the vision half only
    if layers is not None:
        total = config.num_hidden_layers
        if not 1 <= layers <= total:
            raise CaptionerError(f"vision_layers={layers}: {name} has 1 to {total} layers")
        values = {k: v for k, v in config.to_dict().items() if k not in _BACKBONE_KEYS}
        config = type(config)(**{**values, "num_hidden_layers": layers})
    return _quietly(AutoModel.from_pretrained, name, config=config).eval()


def kept_text_layers(layers: int | list[int], total: int, name: str) -> list[int]:
    """`text_layers` as layer indices: N -> the first N // 4 and the last N - N // 4."""
    if isinstance(layers, int):
        if not 1 <= layers <= total:
            raise CaptionerError(f"text_layers={layers}: {name} has 1 to {total} layers")
        return list(range(layers // 4)) + list(range(total - (layers - layers // 4), total))
    if sorted(set(layers)) != layers or not all(0 <= i < total for i in layers):
        raise CaptionerError(
            f"text_layers={'+'.join(map(str, layers))}: name distinct layers of {name} in "
            f"order, 0 to {total - 1}"
        )
    return layers


def _keep_layers(model: torch.nn.Module, layers: int | list[int] | None, name: str):
    """`model` rebuilt with only the `text_layers` it keeps, renumbered 0..N-1 (so caches and
    plain `from_pretrained` see an ordinary N-layer model of the same class)."""
    if layers is None:
        return model
    config = model.config
    total = config.num_hidden_layers
    keep = kept_text_layers(layers, total, name)
    prefix = next(  # the stack of blocks: `model.layers` (Llama), `bert.encoder.layer`, `h`...
        (path for path, m in model.named_modules()
         if isinstance(m, torch.nn.ModuleList) and len(m) == total),
        None,
    )  # fmt: skip
    if prefix is None:
        raise CaptionerError(f"text_layers: cannot find {name}'s {total} layers")
    renumber = {old: new for new, old in enumerate(keep)}
    state = {}
    for key, value in model.state_dict().items():
        if key.startswith(prefix + "."):
            index, _, rest = key[len(prefix) + 1 :].partition(".")
            if int(index) not in renumber:
                continue
            key = f"{prefix}.{renumber[int(index)]}.{rest}"
        state[key] = value
    values = config.to_dict()
    values["num_hidden_layers"] = len(keep)
    if isinstance(values.get("layer_types"), list):  # per-layer attention kinds (Qwen2, Gemma)
        values["layer_types"] = [values["layer_types"][i] for i in keep]
    cut = type(model)(type(config)(**values))
    cut.load_state_dict(state, strict=True)
    return cut.to(next(model.parameters()).dtype)


def _image_processor(name: str, image_size: int | None):
    processor = _quietly(AutoImageProcessor.from_pretrained, name)
    if image_size is not None:  # square inputs of this size (a resize, then a centre crop)
        processor.size = {"shortest_edge": image_size}
        processor.crop_size = {"height": image_size, "width": image_size}
    return processor


def _text_decoder(spec: CompositeSpec, captions: list[str]):
    """A from-scratch BERT decoder + caption tokenizer, or a pretrained decoder with added
    cross-attention (its cross-attention starts random)."""
    if spec.text != SCRATCH:
        tokenizer = _quietly(AutoTokenizer.from_pretrained, spec.text)
        decoder = _quietly(
            AutoModelForCausalLM.from_pretrained,
            spec.text,
            is_decoder=True,
            add_cross_attention=True,
        )
        decoder = _keep_layers(decoder, spec.text_layers, spec.text)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        return decoder, tokenizer
    captions = [c for c in captions if c and c.strip()]
    if not captions:
        raise CaptionerError("cannot build a caption tokenizer: no training captions")
    tokenizer = train_caption_tokenizer(
        captions,
        vocab_size=spec.tokenizer_vocab_size,
        model_max_length=spec.max_caption_tokens,
    )
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.decoder_hidden_size,
        num_hidden_layers=spec.decoder_layers,
        num_attention_heads=spec.decoder_heads,
        intermediate_size=4 * spec.decoder_hidden_size,
        max_position_embeddings=spec.max_caption_tokens,
        is_decoder=True,
        add_cross_attention=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.cls_token_id,
        eos_token_id=tokenizer.sep_token_id,
        tie_word_embeddings=True,
    )
    return BertLMHeadModel(config), tokenizer


def _set_special_tokens(model: VisionEncoderDecoderModel, tokenizer, max_tokens: int) -> None:
    """Generation starts at the tokenizer's start token ([CLS], or BOS/EOS for GPT-style ones)
    and stops at its end token ([SEP] or EOS)."""
    start = tokenizer.cls_token_id
    start = tokenizer.bos_token_id if start is None else start
    end = tokenizer.sep_token_id
    end = tokenizer.eos_token_id if end is None else end
    for config in (model.config, model.generation_config):
        config.decoder_start_token_id = start
        config.pad_token_id = tokenizer.pad_token_id
        config.eos_token_id = end
    model.generation_config.bos_token_id = start
    model.generation_config.max_length = None
    model.generation_config.max_new_tokens = max_tokens - 2
