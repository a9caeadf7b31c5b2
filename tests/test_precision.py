"""Reduced precision: bf16 and int8 models caption; agreement with float32 is measured, and a
rate below the floor warns or refuses."""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import make_images

from captioner.engine import Captioner
from captioner.errors import CaptionerError
from captioner.models import precision
from captioner.models.build import load_model


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return make_images(tmp_path_factory.mktemp("prec"), 8)


def caption_with(model_dir, images, **mode):
    model, processor = load_model(model_dir)
    model = precision.prepare(model, **mode)
    return model, Captioner(model, processor, device="cpu").caption(images, max_new_tokens=12)


def test_bf16_and_int8_caption_and_agreement_is_measured(chatty_model_dir, images):
    _, reference = caption_with(chatty_model_dir, images)
    bf16, bf16_captions = caption_with(chatty_model_dir, images, dtype="bfloat16")
    int8, int8_captions = caption_with(chatty_model_dir, images, int8=True)
    quantized = torch.ao.nn.quantized.dynamic.Linear
    assert any(isinstance(m, quantized) for m in int8.modules())
    assert not any(type(m) is torch.nn.Linear for m in int8.modules())
    for captions in (bf16_captions, int8_captions):
        assert len(captions) == len(images) and all(isinstance(c, str) for c in captions)
        assert sum(bool(c) for c in captions) >= len(images) // 2
        rate = precision.agreement(reference, captions)
        assert 0.0 <= rate <= 1.0
    assert precision.agreement(reference, reference) == 1.0


def test_bf16_is_mixed_precision_with_float32_norms_and_logits(chatty_model_dir, images):
    """--dtype bfloat16 runs the linear layers in bfloat16 (autocast) but keeps layer norms, the
    residual stream they feed and the logits in float32: not a whole-model cast."""
    model, processor = load_model(chatty_model_dir)
    model = precision.prepare(model, dtype="bfloat16")
    head = model.get_output_embeddings()
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not head]
    assert linears and all(m.weight.dtype == torch.bfloat16 for m in linears)
    assert head.weight.dtype == torch.float32
    seen: dict[str, set] = {"norm": set(), "head": set(), "linear": set()}
    for name, module in (("norm", next(m for m in model.modules()
                                       if isinstance(m, torch.nn.LayerNorm))),
                         ("head", head), ("linear", linears[-1])):  # fmt: skip
        module.register_forward_hook(lambda m, i, out, n=name: seen[n].add(out.dtype))
    captions = Captioner(model, processor, device="cpu").caption(images[:2], max_new_tokens=4)
    assert len(captions) == 2
    assert seen == {"norm": {torch.float32}, "head": {torch.float32}, "linear": {torch.bfloat16}}


def test_agreement_is_the_exact_match_rate():
    assert precision.agreement(["a b", "c"], ["a  b", "d"]) == 0.5  # whitespace is not a change
    assert precision.agreement([["a", "b"]], [["a", "b"]]) == 1.0
    assert precision.agreement([["a", "b"]], [["a", "c"]]) == 0.0
    with pytest.raises(CaptionerError, match="same images"):
        precision.agreement(["a"], ["a", "b"])
    with pytest.raises(CaptionerError, match="undefined"):
        precision.agreement([], [])


def test_below_the_floor_warns_or_refuses(caplog):
    assert precision.AGREEMENT_FLOOR == 0.95
    with caplog.at_level(logging.WARNING, logger="captioner.models.precision"):
        assert precision.check_agreement(0.97, "int8") == 0.97
        assert not caplog.records
        assert precision.check_agreement(0.80, "int8") == 0.80
    assert "int8: only 80.0% of greedy captions" in caplog.text
    with pytest.raises(CaptionerError, match="floor 95%"):
        precision.check_agreement(0.80, "bfloat16", refuse=True)


def test_bad_modes_are_one_clear_error(tiny_model_dir):
    model, _ = load_model(tiny_model_dir)
    with pytest.raises(CaptionerError, match="--dtype must be one of float32, bfloat16"):
        precision.prepare(model, dtype="float16")
    with pytest.raises(CaptionerError, match="--int8 .* --dtype float32"):
        precision.prepare(model, dtype="bfloat16", int8=True)
    assert precision.prepare(model) is model  # float32: unchanged
    assert precision.describe("float32", int8=True) == "int8"
