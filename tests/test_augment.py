"""Caption-preserving augmentation: colour captions are never grayscaled, left/right captions
never mirrored, K views are cached once and drawn per epoch, evaluation sees the image itself."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_images
from PIL import Image
from transformers import AutoImageProcessor, AutoModel

from captioner.errors import CaptionerError
from captioner.models.families import family_named
from captioner.models.tokenizer import train_caption_tokenizer
from captioner.training.arguments import CaptionTrainingArguments
from captioner.training.augment import Augmenter, augment, draw_view
from captioner.training.collate import INDEX_COLUMN, CaptionCollator, content_hash
from captioner.training.features import FeatureCache

ALL = Augmenter(("crop", "blur", "posterize", "grayscale", "flip"))


def _half_red(size: int = 32) -> Image.Image:
    """Red on the left, blue on the right: a mirror or a grayscale view would show."""
    image = Image.new("RGB", (size, size), (30, 30, 220))
    image.paste((220, 30, 30), (0, 0, size // 2, size))
    return image


def test_a_colour_caption_is_never_grayscaled_nor_a_left_caption_mirrored():
    assert ALL.allowed(["a red star"]) == ("crop", "blur", "posterize", "flip")
    assert ALL.allowed(["go previous", "arrow"]) == ("crop", "blur", "posterize", "grayscale")
    assert "grayscale" in ALL.allowed(["media playback start"])
    image = _half_red()
    for view in range(1, 40):  # with every op allowed, some of these views would be gray/flipped
        out = np.asarray(ALL.apply(image, "ab" * 20, view, ["a red arrow pointing left"]), int)
        left, right = out[:, :8].mean((0, 1)), out[:, -8:].mean((0, 1))
        assert left[0] > left[2] + 60, view  # still red on the left...
        assert right[2] > right[0] + 60, view  # ...and blue on the right: in colour, unmirrored


def test_views_are_reproducible_and_view_zero_is_the_image():
    image = _half_red()
    a = ALL.apply(image, "12" * 20, 3, ["shape"])
    b = ALL.apply(image, "12" * 20, 3, ["shape"])
    assert np.array_equal(np.asarray(a), np.asarray(b))
    assert ALL.apply(image, "12" * 20, 0, ["shape"]) is image
    assert augment(image, (), np.random.default_rng(0)).size == image.size


def test_shrink_keeps_the_whole_drawing_smaller_somewhere_on_its_border_colour():
    image = Image.new("RGB", (64, 64), (255, 255, 255))
    image.paste((200, 20, 20), (8, 8, 56, 56))  # a red square with a white margin
    places, sides = set(), set()
    for view in range(1, 30):
        out = np.asarray(Augmenter(("shrink",)).apply(image, "cd" * 20, view, ["stop"]), int)
        red = np.argwhere((out[..., 0] > 150) & (out[..., 1] < 90))
        (top, left), (bottom, right) = red.min(0), red.max(0)
        side = bottom - top + 1
        assert 48 * 0.6 <= side <= 48 * 0.97 and abs(side - (right - left + 1)) <= 1, view
        assert (out[0] == 255).all() and (out[-1] == 255).all()  # the margin stays white
        places.add((int(top), int(left)))
        sides.add(int(side))
    assert len(places) > 5 and len(sides) > 3  # moved and scaled, not one fixed layout
    both = Augmenter(("crop", "shrink"))  # each view zooms in or out: both kinds are drawn
    smaller = set()
    for view in range(1, 20):
        out = np.asarray(both.apply(image, "ef" * 20, view, ["stop"]), int)
        rows = np.flatnonzero(((out[..., 0] > 150) & (out[..., 1] < 90)).any(1))
        smaller.add(bool(rows[-1] - rows[0] + 1 < 47))  # a crop only enlarges the square
    assert smaller == {True, False}


def test_draw_view_covers_the_image_and_every_view():
    drawn = {draw_view(3, 0, epoch, 5) for epoch in range(60)}
    assert drawn == {0, 1, 2, 3}
    assert draw_view(0, 0, 4, 5) == 0


def test_unknown_ops_and_negative_views_are_refused(tmp_path):
    with pytest.raises(CaptionerError, match="unknown op"):
        Augmenter.parse("crop,rotate")
    with pytest.raises(CaptionerError, match="augment_views"):
        CaptionTrainingArguments(output_dir=str(tmp_path), augment_views=-1)
    with pytest.raises(CaptionerError, match="unknown op"):
        CaptionTrainingArguments(output_dir=str(tmp_path), augment_views=2, augment="spin")


def test_k_views_are_cached_once_and_drawn_by_the_collator(tiny_dinov2_dir, tmp_path):
    encoder = AutoModel.from_pretrained(tiny_dinov2_dir).eval()
    processor_ip = AutoImageProcessor.from_pretrained(tiny_dinov2_dir)
    paths = [str(p) for p in make_images(tmp_path / "img", 3)]
    captions = [["a red square"], ["go next"], ["a square"]]
    cache = FeatureCache(tmp_path / "cache", encoder, processor_ip, max_bytes=2**26)
    augmenter = Augmenter()
    assert cache.fill(paths, views=2, augmenter=augmenter, captions=captions) == 3 * 3
    assert cache.fill(paths, views=2, augmenter=augmenter, captions=captions) == 0  # reused
    digest = content_hash(paths[0])
    clean = cache.get(paths[0])
    views = [cache.get(paths[0], v, augmenter, captions[0]) for v in (1, 2)]
    assert all(v is not None and not torch.equal(v, clean) for v in views)
    assert augmenter.view_key(digest, 1, captions[0]) in cache.index()

    tokenizer = train_caption_tokenizer([c for caps in captions for c in caps])
    processor = type("P", (), {"tokenizer": tokenizer, "image_processor": processor_ip})()
    collator = CaptionCollator(
        processor, family_named("vision-encoder-decoder"), features=cache, augmenter=augmenter,
        views=2,
    )  # fmt: skip
    rows = [{"image": {"bytes": None, "path": paths[0]}, "captions": captions[0], INDEX_COLUMN: 0}]
    seen = set()
    for epoch in range(12):
        collator.epoch = epoch
        hidden = collator(rows)["encoder_outputs"][0][0]
        seen.add(next(i for i, f in enumerate([clean, *views]) if torch.equal(f, hidden)))
    assert seen == {0, 1, 2}  # the image itself and both views, across epochs
    collator.training = False  # evaluation: always the image itself
    assert torch.equal(collator(rows)["encoder_outputs"][0][0], clean)


def test_train_with_augment_views_caches_them_and_trains(tiny_dinov2_dir, tmp_path):
    from captioner.data.scenes import generate_scenes
    from captioner.training.arguments import parse_train_args
    from captioner.training.trainer import train

    scenes = generate_scenes(tmp_path / "scenes", n=8, seed=1)
    spec = (f"vision={tiny_dinov2_dir},text=scratch,vision_layers=2,decoder_hidden_size=32,"
            "decoder_layers=1,decoder_heads=2")  # fmt: skip
    args = parse_train_args([
        "--model", spec, "--data", str(scenes), "--output_dir", str(tmp_path / "run"),
        "--max_steps", "2", "--eval_strategy", "no", "--test_size", "0",
        "--per_device_train_batch_size", "4", "--augment_views", "2",
        "--feature_cache", str(tmp_path / "features"), "--dataloader_num_workers", "0",
    ])  # fmt: skip
    train(*args[:2], args[3], args[2])
    keys = set()
    for shard in (tmp_path / "features").rglob("shard-*.safetensors"):
        from safetensors import safe_open

        with safe_open(str(shard), framework="pt") as f:
            keys |= set(f.keys())
    assert len(keys) == 8 * 3  # each scene, and two views of it
    assert sum("~v" in k for k in keys) == 16
