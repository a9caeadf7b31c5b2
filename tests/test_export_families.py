"""ONNX export beyond GIT: each family that declares `OnnxParts` (VisionEncoderDecoder, LLaVA,
BLIP-2 / InstructBLIP, a chat model) exported from a tiny model and captioning a handful of
images with the same greedy captions as the torch model; int8 exports that still caption; what
cannot be exported (or decoded) says so in one line."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

pytest.importorskip("onnxruntime")
import torch  # noqa: E402
from conftest import TINY_CAPTIONS, make_images  # noqa: E402
from tiny_vlms import _byte_level_tokenizer, _llama, build_tiny_vlm  # noqa: E402

from captioner.engine import Captioner  # noqa: E402
from captioner.errors import CaptionerError  # noqa: E402
from captioner.models import export  # noqa: E402
from captioner.models.build import build_preset, load_model  # noqa: E402
from captioner.models.export import export_onnx, load_onnx  # noqa: E402
from captioner.models.export.quantize import logits_matmuls  # noqa: E402
from captioner.models.families import family_named  # noqa: E402

KINDS = ("ved", "llava", "blip-2", "instructblip", "gemma3")


def _tiny_llama(out: Path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = _byte_level_tokenizer(
        [*TINY_CAPTIONS, "Caption:"], ["<pad>", "<s>", "</s>"], bos="<s>", eos="</s>",
        pad="<pad>", template="<s> $A", vocab_size=300,
    )  # fmt: skip
    LlamaForCausalLM(LlamaConfig(**_llama(len(tok), tok))).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def _build(kind: str, root: Path, tiny_dinov2_dir: Path) -> Path:
    if kind == "ved":
        spec = (f"vision={tiny_dinov2_dir},text=scratch,vision_layers=2,decoder_hidden_size=32,"
                "decoder_layers=1,decoder_heads=2")  # fmt: skip
        return build_preset(spec, TINY_CAPTIONS, root / "base")
    if kind == "llava":
        spec = f"vision={tiny_dinov2_dir},text={_tiny_llama(root / 'lm')},vision_layers=2"
        return build_preset(spec, [], root / "base")
    return build_tiny_vlm(kind, root / "base", TINY_CAPTIONS)


def _loud(model_dir: Path, out: Path) -> Path:
    """Large random weights (embeddings excepted), so that greedy captions are long and differ
    per image: at their init scale tiny models repeat one token, and equal captions of a
    repeated token would prove nothing."""
    model, processor = load_model(model_dir)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1 and "embed" not in name:
                p.normal_(0, 0.5)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[Path]:
    return make_images(tmp_path_factory.mktemp("export_images"), 6)


@pytest.fixture(scope="module")
def models(tiny_dinov2_dir, tmp_path_factory):
    """kind -> (torch folder, ONNX folder), built on first use."""
    root = tmp_path_factory.mktemp("export_families")
    made: dict[str, tuple[Path, Path]] = {}

    def get(kind: str) -> tuple[Path, Path]:
        if kind not in made:
            loud = _loud(_build(kind, root / kind, tiny_dinov2_dir), root / kind / "loud")
            made[kind] = (loud, export_onnx(loud, root / kind / "onnx"))
        return made[kind]

    return get


@pytest.mark.parametrize("kind", KINDS)
def test_export_captions_like_the_torch_model(kind, models, images):
    model_dir, onnx_dir = models(kind)
    meta = json.loads((onnx_dir / export.FORMAT_FILE).read_text())
    assert meta["kind"] == ("cross" if kind == "ved" else "embeds")
    assert not any(p.suffix == ".safetensors" for p in onnx_dir.iterdir())
    expected = Captioner.from_pretrained(model_dir, device="cpu").caption(images, max_new_tokens=10)
    onnx = Captioner.from_pretrained(onnx_dir)
    assert onnx.caption(images, max_new_tokens=10, batch_size=4) == expected
    assert len(set(expected)) >= 3  # captions differ per image: not trivially equal


@pytest.mark.parametrize("kind", ["llava", "gemma3"])
def test_prompt_logits_match_the_torch_model(kind, models, images):
    """The first next-token scores after the prompt (image features merged into the embeddings,
    the image tokens' attention as the model has it: Gemma 3's see each other both ways) agree
    with the torch forward's to float32 rounding, not only in their argmax."""
    from PIL import Image

    model_dir, onnx_dir = models(kind)
    model, processor = load_model(model_dir)
    family = family_named("llava" if kind == "llava" else "chat")
    pil = [Image.open(p).convert("RGB") for p in images[:3]]
    inputs, _ = family.generation_inputs(processor, pil, None, model.config)
    with torch.no_grad():
        expected = model(**inputs).logits[:, -1]
    runner, _ = load_onnx(onnx_dir)
    _, _, logits = runner._start({k: v for k, v in inputs.items() if torch.is_tensor(v)})
    assert torch.allclose(torch.from_numpy(logits), expected, atol=1e-4)


def test_options_reach_the_onnx_decoder(models, images):
    """A caption prefix (VED: decoder input ids), a repetition penalty, banned words and
    min_new_tokens decode as the torch model decodes them; beam search is refused."""
    model_dir, onnx_dir = models("ved")
    torch_captioner = Captioner.from_pretrained(model_dir, device="cpu")
    onnx = Captioner.from_pretrained(onnx_dir)
    options = {"prompt": "a red", "repetition_penalty": 1.3, "bad_words": ["on"],
               "min_new_tokens": 4, "max_new_tokens": 8}  # fmt: skip
    assert onnx.caption(images, **options) == torch_captioner.caption(images, **options)
    with pytest.raises(CaptionerError, match="num_beams > 1 needs the torch model") as info:
        onnx.caption(images[:1], num_beams=2)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("kind", ["ved", "llava"])
def test_int8_export_quantizes_all_but_the_head_and_captions(kind, models, images, tmp_path):
    import onnx

    model_dir, _ = models(kind)
    out = export_onnx(model_dir, tmp_path / "int8", int8=True)
    assert json.loads((out / export.FORMAT_FILE).read_text())["int8"] is True
    for graph in ("vision.onnx", "text_decoder.onnx"):
        ops = [n.op_type for n in onnx.load(str(out / graph)).graph.node]
        assert "MatMulInteger" in ops and "DynamicQuantizeLinear" in ops
    # the MatMul that makes the logits is still a float MatMul (kept out of quantization)
    assert logits_matmuls(out / "text_decoder.onnx")
    captions = Captioner(*load_onnx(out), device="cpu").caption(images, max_new_tokens=10)
    assert len(captions) == len(images) and all(isinstance(c, str) for c in captions)


def test_families_that_cannot_be_exported_say_why_in_one_line(tmp_path, monkeypatch):
    for name in ("blip", "paligemma", "florence2"):
        fake = SimpleNamespace(config=SimpleNamespace(model_type=name))
        monkeypatch.setattr(export, "load_model", lambda *a, **k: (fake, None))  # noqa: B023
        with pytest.raises(CaptionerError) as info:
            export_onnx("some-model", tmp_path / name)
        assert str(info.value).startswith(f"cannot export a {name} model to ONNX: ")
        assert "\n" not in str(info.value)
    # a model whose vision code the tracer cannot express (SmolVLM's patch mask: Unfold / |=)
    smolvlm = build_tiny_vlm("smolvlm", tmp_path / "smolvlm", TINY_CAPTIONS)
    monkeypatch.undo()
    with pytest.raises(CaptionerError, match=r"^cannot export this model to ONNX: ") as info:
        export_onnx(smolvlm, tmp_path / "smolvlm-onnx")
    assert "\n" not in str(info.value)
    # a chat model whose rotary positions come from the image grid (Qwen2-VL) is refused too
    qwen = SimpleNamespace(config=SimpleNamespace(model_type="qwen2_vl"), get_rope_index=None)
    with pytest.raises(CaptionerError, match=r"^cannot export a qwen2_vl model .*M-RoPE"):
        family_named("chat").onnx_parts(qwen)
