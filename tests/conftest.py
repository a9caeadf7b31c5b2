"""Shared fixtures: tiny models and images built in tmp dirs, never downloaded."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Hub lookups would spend minutes in retries here; every test is offline by construction.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Spinning OpenMP threads starve every other process on a shared 2-core box (a 35 ms caption took
# 4.7 s); passive waiting costs nothing here. Set before torch is imported, inherited by children.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

COLORS = {
    "red": (220, 30, 30),
    "green": (30, 180, 60),
    "blue": (30, 60, 220),
    "white": (255, 255, 255),
}
TINY_CAPTIONS = [
    f"a {c} {s} on a {bg} background"
    for c in COLORS
    for s in ("circle", "square", "triangle")
    for bg in ("black", "gray")
]


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """Tiny models gain nothing from 2 threads, and on a shared machine two OpenMP threads per
    process oversubscribe the cores (measured: the engine tests ran 5x slower)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A randomly initialised `tiny` GIT preset saved with save_pretrained (loads like a Hub id)."""
    from captioner.models.build import build_preset

    return build_preset("tiny", TINY_CAPTIONS, tmp_path_factory.mktemp("tiny_git"))


def png_header(w: int, h: int) -> bytes:
    """A PNG that only claims a size: opening it must not decode (or allocate) anything."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def make_images(folder: Path, n: int, size: int = 48, ext: str = "png") -> list[Path]:
    """Write `n` small distinct RGB images (coloured squares on gray) and return their paths."""
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    palette = list(COLORS.values())
    for i in range(n):
        img = Image.new("RGB", (size, size), (90 + i % 40, 90, 90))
        ImageDraw.Draw(img).rectangle(
            [i % 12, i % 9, size // 2 + i % 17, size // 2 + i % 13], fill=palette[i % len(palette)]
        )
        path = folder / f"img_{i:03d}.{ext}"
        img.save(path)
        paths.append(path)
    return paths


@pytest.fixture(scope="session")
def chatty_model_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny preset with larger random weights, so greedy captions are long and differ per
    image. (At its init scale the random model only repeats [CLS], which decodes to "": any
    batched-vs-single comparison of empty strings would pass trivially.)"""
    import torch

    from captioner.models.build import load_model

    model, processor = load_model(tiny_model_dir)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.3)
    out = tmp_path_factory.mktemp("chatty_git")
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_dinov2_dir(tmp_path_factory) -> Path:
    """A tiny random DINOv2 with its image processor, saved like a Hub model."""
    import torch
    from transformers import BitImageProcessorPil, Dinov2Config, Dinov2Model

    out = tmp_path_factory.mktemp("tiny_dinov2")
    config = Dinov2Config(
        hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64,
        patch_size=8, image_size=32,
    )  # fmt: skip
    torch.manual_seed(0)
    Dinov2Model(config).save_pretrained(out)
    BitImageProcessorPil(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, do_center_crop=True
    ).save_pretrained(out)
    return out
