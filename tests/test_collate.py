"""Batches: dynamic padding, -100 on pads, one seeded caption per epoch, the pixel cache."""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import TINY_CAPTIONS, make_images
from transformers import CLIPImageProcessor, GitProcessor

import captioner.training.collate as collate_mod
from captioner.errors import CaptionerError
from captioner.models.families import family_named
from captioner.models.tokenizer import train_caption_tokenizer
from captioner.training.collate import INDEX_COLUMN, CaptionCollator, draw_caption

GIT, VED = family_named("git"), family_named("vision-encoder-decoder")


def _processor(size: int = 32) -> GitProcessor:
    tok = train_caption_tokenizer(TINY_CAPTIONS + ["a very long caption with many many more words"])
    ip = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    return GitProcessor(image_processor=ip, tokenizer=tok)


def _rows(paths, captions):
    return [
        {"image": {"bytes": None, "path": str(p)}, "captions": c, INDEX_COLUMN: i}
        for i, (p, c) in enumerate(zip(paths, captions, strict=True))
    ]


def test_pads_to_longest_caption_and_masks_pads(tmp_path):
    paths = make_images(tmp_path, 3)
    rows = _rows(
        paths, [["a red circle"], ["a very long caption with many many more words"], ["a"]]
    )
    batch = CaptionCollator(_processor(), GIT)(rows)
    assert set(batch) == {"pixel_values", "input_ids", "attention_mask", "labels"}
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    # [CLS] + 9 words + [SEP]: the batch is as long as its longest caption, not model_max_length.
    assert ids.shape == (3, 11)
    assert mask[1].all() and not mask[2].all()
    assert (labels[mask == 0] == -100).all()
    assert torch.equal(labels[mask == 1], ids[mask == 1])
    assert batch["pixel_values"].shape == (3, 3, 32, 32)


def test_labels_only_for_encoder_decoder(tmp_path):
    rows = _rows(make_images(tmp_path, 2), [["a red circle"], ["a"]])
    batch = CaptionCollator(_processor(), VED)(rows)
    assert set(batch) == {"pixel_values", "labels"}
    assert (batch["labels"] == -100).sum() == 2  # "[CLS] a [SEP]" padded to 5


def test_caption_draw_is_seeded_and_changes_with_epoch():
    caps = [f"caption {k}" for k in range(5)]
    epoch0 = [draw_caption(caps, seed=0, epoch=0, index=i) for i in range(50)]
    assert epoch0 == [draw_caption(caps, seed=0, epoch=0, index=i) for i in range(50)]
    epoch1 = [draw_caption(caps, seed=0, epoch=1, index=i) for i in range(50)]
    other_seed = [draw_caption(caps, seed=1, epoch=0, index=i) for i in range(50)]
    assert epoch0 != epoch1 and epoch0 != other_seed
    assert set(epoch0) == set(caps)  # every paraphrase gets used


def test_collator_draws_per_epoch(tmp_path):
    paths = make_images(tmp_path, 8)
    caps = [["a red circle", "a blue square", "a green triangle", "a white circle"]] * 8
    collator = CaptionCollator(_processor(), GIT, seed=3)
    first = collator(_rows(paths, caps))["input_ids"]
    assert torch.equal(first, collator(_rows(paths, caps))["input_ids"])
    collator.epoch = 1
    assert not torch.equal(first, collator(_rows(paths, caps))["input_ids"])


def test_pixel_cache_skips_decoding(tmp_path, monkeypatch):
    paths = make_images(tmp_path / "img", 4)
    rows = _rows(paths, [["a red circle"]] * 4)
    calls = []
    real = collate_mod.load_image
    monkeypatch.setattr(collate_mod, "load_image", lambda src: calls.append(src) or real(src))

    cache = tmp_path / "cache"
    collator = CaptionCollator(_processor(), GIT, cache_dir=cache)
    first = collator(rows)["pixel_values"]
    assert len(calls) == 4 and len(list(cache.rglob("*.npy"))) == 4
    again = CaptionCollator(_processor(), GIT, cache_dir=cache)(rows)["pixel_values"]
    assert len(calls) == 4  # served from the cache, not decoded
    assert torch.equal(first, again)
    assert torch.equal(first, CaptionCollator(_processor(), GIT)(rows)["pixel_values"])
    calls.clear()

    # Another image processor config is another key: no stale pixels of the wrong size.
    bigger = CaptionCollator(_processor(size=48), GIT, cache_dir=cache)(rows)["pixel_values"]
    assert bigger.shape[-1] == 48 and len(calls) == 4
    # A changed file is a new hash.
    make_images(tmp_path / "img2", 5)[4].replace(paths[0])
    CaptionCollator(_processor(), GIT, cache_dir=cache)(rows)
    assert len(calls) == 5


def test_broken_image_is_skipped_with_warning(tmp_path, caplog):
    paths = make_images(tmp_path, 2)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    rows = _rows([paths[0], broken, paths[1]], [["a red circle"], ["a"], ["a blue square"]])
    with caplog.at_level(logging.WARNING):
        batch = CaptionCollator(_processor(), GIT)(rows)
    assert batch["input_ids"].shape[0] == 2 and batch["pixel_values"].shape[0] == 2
    assert "broken.png" in caplog.text


def test_git_loss_covers_caption_tokens_only(tiny_model_dir, tmp_path):
    """GIT slices off the image positions and shifts by one itself: labels = ids with pads -100."""
    from captioner.models.build import load_model

    model, processor = load_model(tiny_model_dir)
    rows = _rows(make_images(tmp_path, 3, size=64), [[c] for c in TINY_CAPTIONS[:2]] + [["a"]])
    batch = CaptionCollator(processor, GIT)(rows)
    with torch.no_grad():
        out = model(**batch)
    n_text = batch["input_ids"].shape[1]
    logits = out.logits[:, -n_text:-1]  # text positions predicting the next text token
    want = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), batch["labels"][:, 1:].reshape(-1), ignore_index=-100
    )
    assert torch.allclose(out.loss, want, atol=1e-5)
    unmasked = model(**{**batch, "labels": batch["input_ids"]}).loss
    assert not torch.allclose(out.loss, unmasked)  # the pads would otherwise be trained on


def test_tokenizer_without_pad_is_refused():
    processor = _processor()
    processor.tokenizer.pad_token = None
    with pytest.raises(collate_mod.CaptionerError, match="no pad token"):
        CaptionCollator(processor, GIT)


def test_epoch_reaches_dataloader_workers(tmp_path):
    """Workers get a copy of the collator when each epoch's iterator starts, so setting `epoch`
    before iterating (training.py's on_epoch_begin callback) changes the draw inside workers too."""
    paths = make_images(tmp_path, 8)
    caps = [["a red circle", "a blue square", "a green triangle", "a white circle"]] * 8
    collator = CaptionCollator(_processor(), GIT)
    loader = torch.utils.data.DataLoader(
        _rows(paths, caps), batch_size=8, num_workers=1, collate_fn=collator
    )
    first = next(iter(loader))["input_ids"]
    collator.epoch = 1
    assert not torch.equal(first, next(iter(loader))["input_ids"])
    collator.epoch = 0
    assert torch.equal(first, next(iter(loader))["input_ids"])


class _Features:
    """Stands in for a FeatureCache: 1 CLS + 16 patch tokens per image, each token's first
    dimension its position, so a test can see which tokens a batch kept."""

    pixel_size = (32, 32)

    def get(self, src):
        tokens = torch.zeros(17, 4)
        tokens[:, 0] = torch.arange(17)
        return tokens


def test_patch_dropout_thins_training_batches_only(tmp_path):
    rows = _rows(make_images(tmp_path, 3), [["a red circle"], ["a"], ["a blue square"]])
    collator = CaptionCollator(_processor(), VED, features=_Features(), patch_dropout=0.75)
    states = collator(rows)["encoder_outputs"][0]
    assert states.shape == (3, 5, 4)  # CLS + a quarter of the 16 patches
    positions = states[..., 0]
    assert (positions[:, 0] == 0).all()  # the CLS token is always kept
    assert all(torch.equal(row, row.sort().values) for row in positions)  # in their order
    assert len({tuple(row.tolist()) for row in positions}) > 1  # a subset per example
    # fixed by (seed, epoch, index)
    assert torch.equal(collator(rows)["encoder_outputs"][0], states)
    collator.epoch = 1
    assert not torch.equal(collator(rows)["encoder_outputs"][0], states)  # new each epoch
    collator.training = False  # evaluation and captioning read every token
    assert collator(rows)["encoder_outputs"][0].shape == (3, 17, 4)


def test_patch_dropout_needs_cached_features_and_a_cross_attending_decoder():
    with pytest.raises(CaptionerError, match="patch_dropout.*no feature cache"):
        CaptionCollator(_processor(), VED, patch_dropout=0.5)
    with pytest.raises(CaptionerError, match="patch_dropout.*llava"):
        CaptionCollator(
            _processor(), family_named("llava"), features=_Features(), patch_dropout=0.5
        )
