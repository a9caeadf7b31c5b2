"""The caption-trained tokenizer of from-scratch decoders: byte-level BPE, lossless and cased,
through the tokenizer itself, saved + reloaded processors (GIT's and VisionEncoderDecoder's),
and a tiny GIT that learns such captions back exactly."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_CAPTIONS, make_images
from PIL import Image
from transformers import AutoProcessor

from captioner.engine import Captioner
from captioner.models.build import build_preset, load_model
from captioner.models.tokenizer import train_caption_tokenizer

HARD = [
    "Café Ünïcode 3.5",
    "你好",
    "a 🐶 with 👍🏽 and 👩‍👩‍👧",
    "it's a dog's toy (red)",
    "a t-rex, roaring",
    "woman: light skin tone",
    "[brackets] {braces} <angles> «quotes» “curly”",
    "numbers 1234567890 and 0.25 or 1/2",
    "sks person, 1girl, solo",
    "UPPER lower MiXeD",
    "text with [CLS] and [SEP] and [PAD] in it",
    "tabs\tand\nnewlines  and  double spaces ",
    " leading space",
    "",
]


@pytest.fixture(scope="module")
def tokenizer():
    return train_caption_tokenizer(TINY_CAPTIONS + ["Sks and 1girl"], vocab_size=400)


@pytest.mark.parametrize("text", HARD)
def test_any_text_round_trips(tokenizer, text):
    ids = tokenizer(text).input_ids
    assert ids[0] == tokenizer.cls_token_id and ids[-1] == tokenizer.sep_token_id
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    inner = tokenizer(text, add_special_tokens=False).input_ids
    assert tokenizer.cls_token_id not in inner and tokenizer.sep_token_id not in inner
    assert tokenizer.decode(inner) == text


def test_cased_caption_sized_and_words_are_single_tokens(tokenizer):
    assert tokenizer("Red").input_ids != tokenizer("red").input_ids
    assert len(tokenizer) <= 400
    for word in ("red", "circle", "background"):  # a caption word is one token...
        (first,) = tokenizer(word, add_special_tokens=False).input_ids
        # ...the same one wherever it stands, as it was with WordPiece
        assert tokenizer(f"a {word}", add_special_tokens=False).input_ids[-1] == first
    caption = tokenizer("a red circle", add_special_tokens=False).input_ids
    after_prompt = tokenizer("a picture of a red circle", add_special_tokens=False).input_ids
    assert after_prompt[-len(caption) :] == caption
    # batch_decode as the engine calls it (special tokens skipped)
    batch = tokenizer(HARD[:4], padding=True).input_ids
    assert tokenizer.batch_decode(batch, skip_special_tokens=True) == HARD[:4]
    assert tokenizer.bos_token_id == tokenizer.cls_token_id
    assert tokenizer.eos_token_id == tokenizer.sep_token_id
    assert tokenizer.pad_token_id not in (tokenizer.cls_token_id, tokenizer.sep_token_id)


def test_a_tiny_vocabulary_is_the_byte_alphabet_and_still_lossless():
    tok = train_caption_tokenizer(["a b"], vocab_size=10)
    assert 256 <= len(tok) <= 256 + 3 + 2
    assert all(tok.decode(tok(t).input_ids, skip_special_tokens=True) == t for t in HARD)


def test_git_preset_processor_round_trips_after_save_and_reload(tmp_path):
    out = build_preset("tiny", TINY_CAPTIONS + HARD, tmp_path / "git")
    processor = AutoProcessor.from_pretrained(out)  # plain transformers
    assert type(processor).__name__ == "GitProcessor"
    _, ours = load_model(out)
    for proc in (processor, ours):
        for text in HARD:
            ids = proc(text=text).input_ids
            assert proc.batch_decode([ids], skip_special_tokens=True) == [text]
    # resaved, it is still the same tokenizer
    processor.save_pretrained(tmp_path / "again")
    again = AutoProcessor.from_pretrained(tmp_path / "again")
    assert again.tokenizer(HARD).input_ids == processor.tokenizer(HARD).input_ids


def test_ved_scratch_processor_round_trips_after_save_and_reload(tiny_dinov2_dir, tmp_path):
    spec = f"vision={tiny_dinov2_dir},text=scratch,vision_layers=1,decoder_hidden_size=32,"
    spec += "decoder_layers=1,decoder_heads=2"
    out = build_preset(spec, TINY_CAPTIONS + HARD, tmp_path / "ved")
    model, _ = load_model(out)
    processor = AutoProcessor.from_pretrained(out)
    assert type(processor).__name__ == "VisionTextDualEncoderProcessor"
    tok = processor.tokenizer
    assert model.config.decoder_start_token_id == tok.cls_token_id
    assert model.config.eos_token_id == tok.sep_token_id
    assert model.config.pad_token_id == tok.pad_token_id
    for text in HARD:
        ids = processor(text=text).input_ids
        assert processor.batch_decode([ids], skip_special_tokens=True) == [text]


CAPTIONS = [  # what the lossy WordPiece could not give back
    "Café Ünïcode 3.5",
    "it's a dog's toy (red)",
    "a T-rex: 你好 🐶",
    "sks 1girl [solo]",
]


def test_tiny_git_learns_cased_unicode_captions_back_exactly(tmp_path):
    """A tiny GIT trained briefly on 4 images captions each back exactly, through the engine."""
    images = make_images(tmp_path / "images", len(CAPTIONS), size=64)
    model, processor = load_model(build_preset("tiny", CAPTIONS, tmp_path / "git"))
    loaded = [Image.open(p).convert("RGB") for p in images]
    pixels = processor.image_processor(images=loaded, return_tensors="pt").pixel_values
    text = processor.tokenizer(CAPTIONS, padding=True, return_tensors="pt")
    labels = text.input_ids.masked_fill(text.attention_mask == 0, -100)
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    model.train()
    for _ in range(150):
        loss = model(pixel_values=pixels, labels=labels, **text).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    assert loss.item() < 0.05
    captions = Captioner(model, processor, device="cpu").caption(images, max_new_tokens=30)
    assert captions == CAPTIONS
