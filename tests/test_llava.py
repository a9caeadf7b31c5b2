"""LLaVA compositions: a vision tower + a decoder-only LM in LlavaForConditionalGeneration, with
the caption prompt saved in the processor's chat template; built, batched, trained, reloaded with
plain transformers. Tiny random parts, except the slow test with the real ones."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import TINY_CAPTIONS, make_images
from PIL import Image
from transformers import TrainerCallback

from captioner.engine import Captioner
from captioner.errors import CaptionerError
from captioner.models.build import build_preset, load_model
from captioner.models.compose import (
    LLAVA,
    VED,
    CompositeSpec,
    composite_family,
    is_decoder_only,
    kept_text_layers,
)
from captioner.models.families import family_named, family_of
from captioner.models.families.llava import caption_prompt, prompt_ids
from captioner.models.lora import add_lora
from captioner.training.arguments import parse_train_args
from captioner.training.collate import CaptionCollator
from captioner.training.features import FeatureCache
from captioner.training.trainer import train

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
N_IMAGE_TOKENS = 17  # 32 px / 8 px patches = 16, + CLS ("full")


def _byte_level_tokenizer():
    """A SmolLM2-shaped tokenizer: byte-level BPE trained on the tiny captions, BOS prepended,
    no token_type_ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        TINY_CAPTIONS + ["Caption:"],
        trainers.BpeTrainer(
            vocab_size=300,
            special_tokens=["<pad>", "<s>", "</s>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory) -> Path:
    """A tiny random Llama with large weights (so greedy captions are long and differ per
    image) and its tokenizer, saved like a Hub model."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = _byte_level_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, tie_word_embeddings=True,
    )  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.3)
    out = tmp_path_factory.mktemp("tiny_llama")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def spec_for(tiny_dinov2_dir: Path, lm_dir: Path, **extra: object) -> str:
    items = {"vision": tiny_dinov2_dir, "text": lm_dir, "vision_layers": 2, **extra}
    return ",".join(f"{k}={v}" for k, v in items.items())


@pytest.fixture(scope="module")
def llava_dir(tiny_dinov2_dir, lm_dir, tmp_path_factory) -> Path:
    return build_preset(spec_for(tiny_dinov2_dir, lm_dir), [], tmp_path_factory.mktemp("llava"))


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[Path]:
    return make_images(tmp_path_factory.mktemp("llava_images"), 6)


def test_decoder_only_lm_picks_llava_and_cross_attention_decoders_stay_ved(tiny_dinov2_dir, lm_dir):
    from transformers import BertConfig, GPT2Config, LlamaConfig, Qwen2Config

    assert is_decoder_only(LlamaConfig()) and is_decoder_only(Qwen2Config())
    assert not is_decoder_only(BertConfig()) and not is_decoder_only(GPT2Config())
    assert composite_family(CompositeSpec.parse(spec_for(tiny_dinov2_dir, lm_dir))) == LLAVA
    assert composite_family(CompositeSpec.parse(f"vision={tiny_dinov2_dir},text=scratch")) == VED
    with pytest.raises(CaptionerError, match="no cross-attention.*family=llava"):
        composite_family(CompositeSpec.parse(spec_for(tiny_dinov2_dir, lm_dir, family=VED)))
    with pytest.raises(CaptionerError, match="needs text=a decoder-only LM"):
        composite_family(CompositeSpec.parse(f"vision={tiny_dinov2_dir},text=scratch,family=llava"))
    with pytest.raises(CaptionerError, match="unknown composite family"):
        composite_family(CompositeSpec.parse(spec_for(tiny_dinov2_dir, lm_dir, family="blip")))
    spec = CompositeSpec.parse(spec_for(tiny_dinov2_dir, lm_dir, vision_feature_layer=-2))
    assert spec.vision_feature_layer == -2 and spec.prompt == "Caption:"


def test_compose_loads_both_parts_whole_and_saves_the_prompt(llava_dir, tiny_dinov2_dir, lm_dir):
    from transformers import AutoModel, AutoModelForCausalLM

    model, processor = load_model(llava_dir)
    tok = processor.tokenizer
    assert model.config.model_type == "llava" and type(processor).__name__ == "LlavaProcessor"
    assert model.config.vision_config.num_hidden_layers == 2  # cut from 3
    assert model.config.image_token_id == tok.convert_tokens_to_ids("<image>")
    assert model.get_input_embeddings().weight.shape[0] == len(tok)  # resized for <image>
    assert model.lm_head.weight is model.get_input_embeddings().weight  # still tied
    assert family_of(model).vision_tower(model) is model.model.vision_tower
    # every pretrained weight arrived (the tower's first 2 layers; the LM plus one new row)
    lm = AutoModelForCausalLM.from_pretrained(lm_dir)
    for name, before in lm.model.state_dict().items():
        after = model.model.language_model.state_dict()[name]
        assert torch.equal(after[: before.shape[0]], before), name
    tower = AutoModel.from_pretrained(tiny_dinov2_dir).state_dict()
    for name, after in model.model.vision_tower.state_dict().items():
        assert torch.equal(tower[name], after), name
    # the caption prompt travels in the processor: what plain transformers renders and expands
    assert caption_prompt(processor) == "<image>Caption:"
    assert caption_prompt(processor, "Colour?") == "<image>Colour?"
    ids = prompt_ids(processor, None, 32, 32)
    assert ids[0] == tok.bos_token_id
    assert ids.count(model.config.image_token_id) == N_IMAGE_TOKENS == model.config.image_seq_length
    assert tok.decode(ids, skip_special_tokens=True) == "Caption:"
    assert model.generation_config.eos_token_id == tok.eos_token_id


def test_text_layers_keeps_the_last_layers_and_loads_plainly(tiny_dinov2_dir, lm_dir, tmp_path):
    from transformers import AutoModelForCausalLM, LlavaForConditionalGeneration

    assert kept_text_layers(8, 30, "lm") == [0, 1, 24, 25, 26, 27, 28, 29]  # a quarter, the end
    assert kept_text_layers([0, 5], 30, "lm") == [0, 5]
    lm = AutoModelForCausalLM.from_pretrained(lm_dir).model.state_dict()
    # 1 layer of 2 keeps the last (1 // 4 = 0 first + 1 last), renumbered as layer 0
    out = build_preset(spec_for(tiny_dinov2_dir, lm_dir, text_layers=1), [], tmp_path / "cut")
    model = LlavaForConditionalGeneration.from_pretrained(out)  # plain transformers
    assert model.config.text_config.num_hidden_layers == 1
    kept = model.model.language_model.state_dict()
    for name, after in kept.items():  # the kept layer, embeddings (+ <image>), final norm
        before = lm[name.replace("layers.0.", "layers.1.")]
        assert torch.equal(after[: before.shape[0]], before), name
    assert set(kept) == {k.replace("layers.1.", "layers.0.") for k in lm
                         if not k.startswith("layers.0.")}  # fmt: skip
    captioner = Captioner.from_pretrained(out, device="cpu")  # the cut model captions
    assert isinstance(captioner.caption([make_images(tmp_path / "im", 1)[0]])[0], str)
    with pytest.raises(CaptionerError, match="text_layers=3: .* has 1 to 2 layers"):
        build_preset(spec_for(tiny_dinov2_dir, lm_dir, text_layers=3), [], tmp_path / "x")
    both = build_preset(spec_for(tiny_dinov2_dir, lm_dir, text_layers="0+1"), [], tmp_path / "b")
    assert load_model(both)[0].config.text_config.num_hidden_layers == 2  # named: both
    with pytest.raises(CaptionerError, match="text_layers=1\\+0: name distinct layers"):
        build_preset(spec_for(tiny_dinov2_dir, lm_dir, text_layers="1+0"), [], tmp_path / "x")
    with pytest.raises(CaptionerError, match="decoder_layers"):
        build_preset(f"vision={tiny_dinov2_dir},text=scratch,text_layers=1", ["a"], tmp_path / "y")


def test_collator_masks_image_prompt_and_pad_positions(llava_dir, images):
    model, processor = load_model(llava_dir)
    tok = processor.tokenizer
    rows = [
        {"image": str(images[0]), "captions": ["a red circle on a black background"]},
        {"image": str(images[1]), "captions": ["a blue square"]},
    ]
    collator = CaptionCollator(processor, family_of(model), seed=0, cache_dir=None)
    assert collator.family is family_named("llava")
    batch = collator(rows)
    assert set(batch) == {"pixel_values", "input_ids", "attention_mask", "labels", "logits_to_keep"}
    ids, mask = batch["input_ids"], batch["attention_mask"]
    prompt = prompt_ids(processor, None, 32, 32)
    n = len(prompt)
    # the LM head runs from the prompt's last position on; the labels are cut to match
    keep = batch["logits_to_keep"]
    assert keep == ids.shape[1] - n + 1 and batch["labels"].shape == (2, keep)
    labels = torch.cat([torch.full((2, ids.shape[1] - keep), -100), batch["labels"]], dim=1)
    for i, caption in enumerate(r["captions"][0] for r in rows):
        words = tok(" " + caption, add_special_tokens=False).input_ids
        length = n + len(words) + 1
        assert ids[i, :length].tolist() == [*prompt, *words, tok.eos_token_id]
        assert mask[i].tolist() == [1] * length + [0] * (ids.shape[1] - length)
        expected = [-100] * n + [*words, tok.eos_token_id] + [-100] * (ids.shape[1] - length)
        assert labels[i].tolist() == expected  # image tokens, prompt and pads: -100
    assert (labels[ids == model.config.image_token_id] == -100).all()
    longest = tok(" " + rows[0]["captions"][0], add_special_tokens=False).input_ids
    assert ids.shape[1] == n + len(longest) + 1  # padded to the longest row, on the right
    with torch.no_grad():
        loss = model(**batch).loss
        full = {**batch, "labels": labels, "logits_to_keep": 0}  # every position's logits
        assert torch.isfinite(loss) and torch.allclose(loss, model(**full).loss, atol=1e-6)


@pytest.mark.parametrize(
    "extra", [{}, {"vision_feature_layer": -2, "vision_feature_select_strategy": "default"}]
)
def test_cached_features_give_the_same_loss_as_pixels(
    extra, llava_dir, tiny_dinov2_dir, lm_dir, images, tmp_path
):
    folder = build_preset(spec_for(tiny_dinov2_dir, lm_dir, **extra), [], tmp_path / "m") if (
        extra) else llava_dir  # fmt: skip
    model, processor = load_model(folder)
    model.eval()
    family = family_of(model)
    assert family.feature_cache
    pairs = zip(images[:4], TINY_CAPTIONS[:4], strict=True)
    rows = [{"image": str(p), "captions": [c]} for p, c in pairs]
    encoder = family.feature_encoder(model)
    cache = FeatureCache(tmp_path / "cache", encoder, processor.image_processor, max_bytes=2**30)
    assert cache.fill([r["image"] for r in rows]) == 4
    from_pixels = CaptionCollator(processor, family)(rows)
    from_cache = CaptionCollator(processor, family, features=cache)(rows)
    tokens = model.config.image_seq_length
    assert "pixel_values" not in from_cache
    assert from_cache["mm_encoder_outputs"]["image"].shape == (4, tokens, 32)
    for key in ("input_ids", "attention_mask", "labels"):
        assert torch.equal(from_pixels[key], from_cache[key]), key
    with pytest.raises(AttributeError, match="pooler_output"):  # no projector hook: loud
        model(**from_cache)
    family.use_cached_features(model)
    family.use_cached_features(model)  # once is enough; twice changes nothing
    projector = model.model.multi_modal_projector.linear_1.weight
    grads = []
    for batch in (from_pixels, from_cache):
        model.zero_grad()
        loss = model(**batch).loss
        loss.backward()
        grads.append((loss.detach(), projector.grad.clone()))
    (loss_pixels, grad_pixels), (loss_cached, grad_cached) = grads
    assert torch.allclose(loss_pixels, loss_cached, atol=1e-6)
    assert torch.allclose(grad_pixels, grad_cached, atol=1e-6)  # the projector trains the same
    # the feature setting is part of the fingerprint: another selection, another folder
    other = family.feature_encoder(model)
    other.cache_settings = {**other.cache_settings, "vision_feature_layer": -3}
    assert FeatureCache(tmp_path / "cache", other, processor.image_processor, max_bytes=1).dir != (
        cache.dir)  # fmt: skip
    # with LoRA (peft wraps the model) the hook still runs, inside the forward
    wrapped = add_lora(model, r=2, alpha=4, dropout=0.0)
    family.use_cached_features(wrapped)
    with torch.no_grad():
        assert torch.allclose(wrapped(**from_cache).loss, wrapped(**from_pixels).loss, atol=1e-6)


@pytest.fixture(scope="module")
def captioner(llava_dir) -> Captioner:
    return Captioner.from_pretrained(llava_dir, device="cpu")


def test_llava_captions_batch_like_one_at_a_time(captioner, images):
    for prompt in (None, "Colour?"):
        kw = dict(max_new_tokens=8, prompt=prompt)
        batched = captioner.caption(images, batch_size=4, **kw)  # 4 + 2: ragged end
        assert batched == [captioner.caption(p, batch_size=1, **kw)[0] for p in images]
        assert all(batched) and len(set(batched)) > 1  # non-trivial, and the image matters
        assert not any(c.startswith(("Caption", "Colour")) for c in batched)  # prompt stripped
    assert captioner.caption(images[:3], max_new_tokens=8) != captioner.caption(
        images[:3], max_new_tokens=8, prompt="Colour?"
    )  # the prompt replaced the saved one
    beams = captioner.caption(images[:2], num_beams=2, num_return_sequences=2, max_new_tokens=5)
    assert [len(b) for b in beams] == [2, 2]
    sampled = captioner.caption(images[:2], do_sample=True, top_p=0.9, num_return_sequences=2)
    assert [len(s) for s in sampled] == [2, 2]


def test_llava_bad_words_are_never_generated(captioner, images, monkeypatch):
    tok = captioner.tokenizer
    skip = len(prompt_ids(captioner.processor, None, 32, 32))
    outputs: list[torch.Tensor] = []
    generate = captioner.model.generate

    def spy(*args, **kwargs):
        outputs.append(out := generate(*args, **kwargs))
        return out

    monkeypatch.setattr(captioner.model, "generate", spy)
    captioner.caption(images, max_new_tokens=12)
    said = {i for o in outputs for i in o[:, skip:].flatten().tolist()}
    # a caption word the random model does say, as the one token " word"
    words = {w for c in TINY_CAPTIONS for w in c.split()}
    spelled = {w: tok(" " + w, add_special_tokens=False).input_ids for w in words}
    word = next(w for w, ids in sorted(spelled.items()) if len(ids) == 1 and ids[0] in said)
    outputs.clear()
    captioner.caption(images, max_new_tokens=12, bad_words=[word])
    assert not any(spelled[word][0] in o[:, skip:] for o in outputs)


def test_trains_saves_and_loads_with_plain_transformers(tiny_dinov2_dir, lm_dir, tmp_path):
    from captioner.data.scenes import generate_scenes

    scenes = generate_scenes(tmp_path / "scenes", n=8, seed=3)
    out = tmp_path / "run"
    model_args, data_args, decoding, training_args = parse_train_args([
        "--model", spec_for(tiny_dinov2_dir, lm_dir), "--data", str(scenes),
        "--output_dir", str(out),
        "--max_steps", "2", "--eval_strategy", "no", "--feature_cache", "off", "--freeze",
        "vision", "--pixel_cache", "off", "--test_size", "0", "--per_device_train_batch_size",
        "4", "--dataloader_num_workers", "0", "--logging_steps", "1", "--save_strategy", "no",
    ])  # fmt: skip
    train(model_args, data_args, training_args, decoding)
    trained, _ = load_model(out)
    built, _ = load_model(out / "preset")
    projector = trained.model.multi_modal_projector.linear_1.weight
    assert not torch.equal(projector, built.model.multi_modal_projector.linear_1.weight)
    for (name, before), after in zip(
        built.model.vision_tower.state_dict().items(),
        trained.model.vision_tower.state_dict().values(),
        strict=True,
    ):
        assert torch.equal(before, after), name  # frozen
    image = str(scenes / "00000.png")
    ours = Captioner.from_pretrained(out).caption([image], max_new_tokens=8)[0]
    plain = subprocess.run([sys.executable, "-c", PLAIN_LLAVA, str(out), image], env=ENV,
                           capture_output=True, text=True, timeout=120)  # fmt: skip
    assert plain.returncode == 0, plain.stderr[-2000:]
    assert plain.stdout.strip().splitlines()[-1] == repr(ours)
    assert ours


def test_trains_on_cached_features_with_lora(tiny_dinov2_dir, lm_dir, tmp_path):
    """The trainer fills the feature cache for LLaVA and trains from it (LoRA on the LM, the
    projector whole): the tower never runs in a training step."""
    from safetensors import safe_open

    from captioner.data.scenes import generate_scenes

    scenes = generate_scenes(tmp_path / "scenes", n=8, seed=3)
    out = tmp_path / "run"
    model_args, data_args, decoding, training_args = parse_train_args([
        "--model", spec_for(tiny_dinov2_dir, lm_dir), "--data", str(scenes),
        "--output_dir", str(out), "--max_steps", "3", "--eval_strategy", "no",
        "--feature_cache", str(tmp_path / "features"), "--lora_r", "2", "--test_size", "0",
        "--per_device_train_batch_size", "4", "--logging_steps", "1", "--save_strategy", "no",
    ])  # fmt: skip
    calls = []
    tower_forward = None

    class Spy(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            nonlocal tower_forward
            tower = family_named("llava").vision_tower(model.get_base_model())  # peft inside
            tower_forward = tower.register_forward_hook(lambda *a: calls.append(1))

    train(model_args, data_args, training_args, decoding, callbacks=[Spy()])
    tower_forward.remove()
    assert calls == []  # every step read the cache
    shards = list((tmp_path / "features").rglob("shard-*.safetensors"))
    assert len(shards) == 1
    with safe_open(str(shards[0]), framework="pt") as f:
        assert len(list(f.keys())) == 8 and f.metadata()["fingerprint"] == shards[0].parent.name
    losses = [e["loss"] for e in json.loads((out / "trainer_state.json").read_text())[
        "log_history"] if "loss" in e]  # fmt: skip
    assert len(losses) == 3 and all(loss == loss for loss in losses)  # finite, not NaN
    trained, _ = load_model(out)
    built, _ = load_model(out / "preset")
    projector = trained.model.multi_modal_projector.linear_1.weight
    assert not torch.equal(projector, built.model.multi_modal_projector.linear_1.weight)
    assert Captioner.from_pretrained(out).caption([scenes / "00000.png"], max_new_tokens=4)[0]


PLAIN_LLAVA = """
import sys
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration
model = LlavaForConditionalGeneration.from_pretrained(sys.argv[1]).eval()
processor = AutoProcessor.from_pretrained(sys.argv[1])
prompt = processor.apply_chat_template(
    [{"role": "user", "content": [{"type": "image"}]}], add_generation_prompt=True
)
image = Image.open(sys.argv[2]).convert("RGB")
inputs = processor(images=image, text=prompt, return_tensors="pt")
ids = model.generate(**inputs, max_new_tokens=8)[:, inputs["input_ids"].shape[1]:]
assert not any(m.startswith("captioner") for m in sys.modules)
print(repr(" ".join(processor.batch_decode(ids, skip_special_tokens=True)[0].split())))
"""


@pytest.mark.slow
def test_real_parts_dinov2_smollm2_trains_and_captions(tmp_path):
    from captioner.data.scenes import generate_scenes

    scenes = generate_scenes(tmp_path / "scenes", n=8, seed=4, image_size=112)
    out = tmp_path / "run"
    start = time.perf_counter()
    model_args, data_args, decoding, training_args = parse_train_args([
        "--model", "dinov2-smollm2", "--data", str(scenes), "--output_dir", str(out),
        "--max_steps", "2", "--eval_strategy", "no", "--feature_cache", "off", "--freeze",
        "vision", "--pixel_cache", "off", "--test_size", "0", "--per_device_train_batch_size",
        "4", "--dataloader_num_workers", "0", "--logging_steps", "1", "--save_strategy", "no",
    ])  # fmt: skip
    train(model_args, data_args, training_args, decoding)
    trained = time.perf_counter()
    captioner = Captioner.from_pretrained(out, device="cpu")
    config = captioner.model.config
    assert config.image_seq_length == 17  # 4 x 4 patches + CLS at 56 px
    assert config.text_config.num_hidden_layers == 6  # SmolLM2's first and last 5 of 30
    loaded = time.perf_counter()
    caption = captioner.caption([scenes / "00000.png"], max_new_tokens=16)[0]
    done = time.perf_counter()
    print(
        f"dinov2-smollm2: build + 2 steps + save {trained - start:.1f} s, load "
        f"{loaded - trained:.1f} s, one caption {done - loaded:.1f} s: {caption!r}"
    )
    assert isinstance(caption, str)
    assert Image.open(scenes / "00000.png").size == (112, 112)
