"""Feature reuse at captioning time: a model whose frozen tower has a filled feature cache
captions from the cached outputs (engine `features=`; jobs/executors/features.py finds the
cache), with the pixel path's captions, without running the tower."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import TINY_CAPTIONS, make_images

from captioner.decoding import DecodingOptions
from captioner.engine import Captioner
from captioner.jobs.executors.features import reuse_features
from captioner.models.build import build_preset, load_model
from captioner.models.families import family_of
from captioner.training.features import FeatureCache

MAX = dict(max_new_tokens=8)


def _chatty(model_dir: Path, out: Path) -> Path:
    """The model with large random weights outside the tower, so greedy captions are long and
    differ per image (identical empty captions would prove nothing)."""
    model, processor = load_model(model_dir)
    tower = family_of(model).vision_tower(model)
    frozen = {id(p) for p in tower.parameters()}
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1 and id(p) not in frozen:
                p.normal_(0, 0.3)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def ved_dir(tiny_dinov2_dir, tmp_path_factory) -> Path:
    spec = (f"vision={tiny_dinov2_dir},text=scratch,vision_layers=2,decoder_hidden_size=32,"
            "decoder_layers=1,decoder_heads=2")  # fmt: skip
    built = build_preset(spec, TINY_CAPTIONS, tmp_path_factory.mktemp("ved"))
    return _chatty(built, tmp_path_factory.mktemp("ved_chatty"))


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[str]:
    return [str(p) for p in make_images(tmp_path_factory.mktemp("reuse_images"), 6)]


def fill(model_dir: Path, root: Path, images: list[str]) -> FeatureCache:
    """What `captioner train` does with a frozen tower: the cache of a separately loaded copy."""
    model, processor = load_model(model_dir)
    family = family_of(model)
    cache = FeatureCache(
        root, family.feature_encoder(model), processor.image_processor, max_bytes=2**30
    )
    cache.fill(images)
    return cache


def tower_calls(captioner: Captioner) -> list[int]:
    """Counts the vision tower's forward calls (one per batch that runs pixels)."""
    calls: list[int] = []
    tower = captioner.family.vision_tower(captioner.model)
    tower.register_forward_hook(lambda *_: calls.append(1))
    return calls


@pytest.fixture(scope="module")
def cached_ved(ved_dir, images, tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("features")
    fill(ved_dir, root, images)
    return ved_dir, root


@pytest.fixture(scope="module")
def pixel_captions(ved_dir, images) -> dict[str, list]:
    captioner = Captioner.from_pretrained(ved_dir, device="cpu")
    return {
        "greedy": captioner.caption(images, batch_size=3, **MAX),
        "beams": captioner.caption(
            images, batch_size=3, num_beams=2, num_return_sequences=2, **MAX
        ),  # fmt: skip
    }


@pytest.mark.parametrize("mode", ["greedy", "beams"])
def test_cached_features_give_the_pixel_captions_without_running_the_tower(
    cached_ved, images, pixel_captions, mode
):
    model_dir, root = cached_ved
    captioner = Captioner.from_pretrained(model_dir, device="cpu")
    cache = reuse_features(captioner, model_dir, str(root))
    assert cache is not None and len(cache.index()) == len(images)
    calls = tower_calls(captioner)
    extra = {"num_beams": 2, "num_return_sequences": 2} if mode == "beams" else {}
    got = captioner.caption(images, batch_size=3, **extra, **MAX)
    assert got == pixel_captions[mode]
    assert len(set(map(str, got))) > 1 and all(got)  # long, distinct captions
    assert calls == []  # every image cached: the tower never ran


def test_the_loader_worker_reads_the_cache_too(cached_ved, images, pixel_captions):
    """A worker process gets the cache pickled (without the encoder) and reads the shards."""
    model_dir, root = cached_ved
    captioner = Captioner.from_pretrained(model_dir, device="cpu")
    reuse_features(captioner, model_dir, str(root))
    calls = tower_calls(captioner)
    got = captioner.caption(images, batch_size=2, num_workers=1, **MAX)
    assert got == pixel_captions["greedy"] and calls == []


def test_a_batch_with_a_miss_runs_pixels_for_all_its_images(
    cached_ved, images, pixel_captions, tmp_path
):
    model_dir, root = cached_ved
    captioner = Captioner.from_pretrained(model_dir, device="cpu")
    new = make_images(tmp_path, 9)[-1]  # not cached
    reference = Captioner.from_pretrained(model_dir, device="cpu").caption([str(new)], **MAX)
    reuse_features(captioner, model_dir, str(root))
    calls = tower_calls(captioner)
    # batches [0 1 2] (all cached) and [3 4 new] (one miss)
    got = captioner.caption([*images[:5], str(new)], batch_size=3, **MAX)
    assert got == [*pixel_captions["greedy"][:5], *reference]
    assert len(calls) == 1  # only the batch with the miss ran the tower


def test_a_cache_of_another_tower_is_never_used(ved_dir, tiny_dinov2_dir, images, tmp_path):
    other_dir = tmp_path / "other"
    model, processor = load_model(ved_dir)
    with torch.no_grad():  # another tower: same shapes, other weights
        for p in family_of(model).vision_tower(model).parameters():
            p.add_(0.01)
    model.save_pretrained(other_dir)
    processor.save_pretrained(other_dir)
    root = tmp_path / "features"
    fill(other_dir, root, images)
    captioner = Captioner.from_pretrained(ved_dir, device="cpu")
    assert reuse_features(captioner, ved_dir, str(root)) is None
    assert captioner.features is None
    calls = tower_calls(captioner)
    captioner.caption(images[:2], **MAX)
    assert len(calls) == 1
    # and an empty or missing root, or "off", finds nothing
    assert reuse_features(captioner, ved_dir, str(tmp_path / "none")) is None
    assert reuse_features(captioner, ved_dir, "off") is None


def test_families_without_cached_inputs_ignore_a_feature_source(tiny_model_dir, images):
    """GIT takes no cached features: a source is ignored (never asked), pixels run."""
    captioner = Captioner.from_pretrained(tiny_model_dir, device="cpu")
    asked: list = []
    got = captioner.caption(images[:2], features=lambda src: asked.append(src), **MAX)
    assert asked == [] and len(got) == 2
    assert reuse_features(captioner, tiny_model_dir, "auto") is None


def test_eval_and_caption_jobs_find_the_cache_the_model_was_trained_with(
    cached_ved, images, pixel_captions, tmp_path, monkeypatch
):
    """`auto`: the folder in the model's captioner_config.json (training's --feature_cache)."""
    from captioner.evaluation import metrics
    from captioner.jobs import evaluate as eval_job
    from captioner.jobs.caption import caption_files
    from captioner.jobs.evaluate import EvalJob, run_eval
    from captioner.jobs.executors import features as features_module

    ved_dir, root = cached_ved
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    for f in ved_dir.iterdir():
        (model_dir / f.name).symlink_to(f)
    (model_dir / "captioner_config.json").write_text(json.dumps({"feature_cache": str(root)}))
    monkeypatch.setenv("CAPTIONER_CACHE", str(tmp_path / "empty"))  # not the standard root
    monkeypatch.setattr(metrics, "java_available", lambda: False)  # scores are not the point
    used: list = []

    def recorded(*args, **kwargs):
        used.append(reuse_features(*args, **kwargs))
        return used[-1]

    monkeypatch.setattr(eval_job, "reuse_features", recorded)
    monkeypatch.setattr(features_module, "reuse_features", recorded)  # the local executor's
    data = tmp_path / "data"
    data.mkdir()
    rows = [{"file_name": Path(p).name, "captions": [TINY_CAPTIONS[i]]} for i, p in
            enumerate(images)]  # fmt: skip
    for p in images:
        (data / Path(p).name).symlink_to(p)
    (data / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    decoding = DecodingOptions(**MAX)
    results = {}
    for setting in ("auto", "off"):
        job = EvalJob(model=str(model_dir), data=str(data), split="all", decoding=decoding,
                      feature_cache=setting)  # fmt: skip
        (result,), _ = run_eval(job)
        results[setting] = [row["prediction"] for row in result.samples]
    assert used[0] is not None and used[1] is None
    assert results["auto"] == results["off"] == pixel_captions["greedy"]

    out = tmp_path / "captions.jsonl"
    summary = caption_files(str(model_dir), images, output=out, decoding=decoding)
    assert summary.captioned == len(images) and used[2] is not None
    by_image = {r["image"]: r["caption"] for r in map(json.loads, out.read_text().splitlines())}
    assert [by_image[p] for p in images] == pixel_captions["greedy"]


@pytest.fixture(scope="module")
def llava_dir(tiny_dinov2_dir, tmp_path_factory) -> Path:
    """test_llava.py's tiny LLaVA: the tiny DINOv2 + a tiny Llama with large weights."""
    from test_llava import _byte_level_tokenizer, spec_for
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = _byte_level_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, tie_word_embeddings=True,
    )  # fmt: skip
    torch.manual_seed(0)
    lm_dir = tmp_path_factory.mktemp("reuse_llama")
    LlamaForCausalLM(config).save_pretrained(lm_dir)
    tok.save_pretrained(lm_dir)
    built = build_preset(spec_for(tiny_dinov2_dir, lm_dir), [], tmp_path_factory.mktemp("llava"))
    return _chatty(built, tmp_path_factory.mktemp("llava_chatty"))


@pytest.mark.parametrize("mode", ["greedy", "beams"])
def test_llava_captions_from_cached_projector_inputs(llava_dir, images, tmp_path, mode):
    """LLaVA caches what its projector reads; the family's hook projects it inside generate.
    With several sequences per image it runs pixels (generate would not repeat the features)."""
    extra = {"num_beams": 2, "num_return_sequences": 2} if mode == "beams" else {}
    expected = Captioner.from_pretrained(llava_dir, device="cpu").caption(
        images, batch_size=3, **extra, **MAX
    )
    fill(llava_dir, tmp_path, images)
    captioner = Captioner.from_pretrained(llava_dir, device="cpu")
    assert reuse_features(captioner, llava_dir, str(tmp_path)) is not None
    calls = tower_calls(captioner)
    got = captioner.caption(images, batch_size=3, **extra, **MAX)
    assert got == expected and len(set(map(str, got))) > 1 and all(got)
    # generate repeats no projector input per beam: beams run pixels (two batches)
    assert len(calls) == (2 if mode == "beams" else 0)
