"""The frozen-encoder feature cache: shards prove which encoder wrote them, bad shards are
dropped and recomputed, concurrent fills compute each image once, files get the umask's mode."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import make_images
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoImageProcessor, AutoModel

from captioner.training.features import FeatureCache

MiB = 2**20


@pytest.fixture(scope="module")
def encoder(tiny_dinov2_dir):
    return AutoModel.from_pretrained(tiny_dinov2_dir).eval()


@pytest.fixture(scope="module")
def image_processor(tiny_dinov2_dir):
    return AutoImageProcessor.from_pretrained(tiny_dinov2_dir)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[str]:
    return [str(p) for p in make_images(tmp_path_factory.mktemp("feature_images"), 8)]


def cache_at(root, encoder, image_processor, max_bytes=64 * MiB) -> FeatureCache:
    return FeatureCache(root, encoder, image_processor, max_bytes=max_bytes)


def shards(cache: FeatureCache) -> list[Path]:
    return sorted(cache.dir.glob("shard-*.safetensors"))


def test_shards_record_the_fingerprint_and_get_the_umask_mode(
    encoder, image_processor, images, tmp_path
):
    umask = os.umask(0o022)
    try:
        cache = cache_at(tmp_path, encoder, image_processor)
        assert cache.fill(images) == 8
    finally:
        os.umask(umask)
    (shard,) = shards(cache)
    with safe_open(str(shard), framework="pt") as f:
        meta = f.metadata()
        assert meta["fingerprint"] == cache.fingerprint == cache.dir.name
        assert len(list(f.keys())) == 8
    assert shard.stat().st_mode & 0o777 == 0o644  # not safetensors' 0600
    assert (cache.dir / ".lock").stat().st_mode & 0o777 == 0o644
    assert not list(cache.dir.glob(".*.tmp"))
    with torch.no_grad():
        image = Image.open(images[0]).convert("RGB")
        pixels = image_processor(images=[image], return_tensors="pt").pixel_values
        expected = encoder(pixel_values=pixels).last_hidden_state[0]
    assert torch.allclose(cache.get(images[0]), expected, atol=1e-5)
    assert cache.pixel_size == (32, 32)


def test_a_truncated_shard_is_dropped_with_a_warning_and_recomputed(
    encoder, image_processor, images, tmp_path, caplog
):
    cache = cache_at(tmp_path, encoder, image_processor)
    cache.fill(images[:4])
    cache.fill(images[4:])
    first, second = shards(cache)
    data = first.read_bytes()
    first.write_bytes(data[: len(data) // 2])  # a copy that stopped half-way
    again = cache_at(tmp_path, encoder, image_processor)
    with caplog.at_level(logging.WARNING, logger="captioner.training.features"):
        found = [again.get(src) is not None for src in images]  # no SafetensorError
    assert sum(found) == 4 and first.name in caplog.text and "unreadable" in caplog.text
    assert again.size_bytes() == second.stat().st_size  # the broken one does not count
    assert again.fill(images) == 4  # its images, computed again
    assert not first.exists() and len(shards(again)) == 2
    assert all(cache_at(tmp_path, encoder, image_processor).get(src) is not None for src in images)


def test_a_shard_from_another_model_or_without_a_fingerprint_is_not_used(
    encoder, image_processor, images, tmp_path, caplog
):
    ours = cache_at(tmp_path, encoder, image_processor)
    other_encoder = AutoModel.from_config(encoder.config)  # same shapes, other weights
    theirs = cache_at(tmp_path, other_encoder, image_processor)
    assert theirs.dir != ours.dir
    theirs.fill(images[:3])
    (copied,) = shards(theirs)
    ours.dir.mkdir(parents=True)
    shutil.copy(copied, ours.dir / copied.name)  # same keys, same shapes: only metadata differs
    old = ours.dir / "shard-old.safetensors"  # an older captioner's shard: no metadata
    with safe_open(str(copied), framework="pt") as f:
        save_file({k: f.get_tensor(k) for k in list(f.keys())[:1]}, str(old))
    with caplog.at_level(logging.WARNING, logger="captioner.training.features"):
        assert ours.index() == {}
    assert "written for encoder" in caplog.text and "no fingerprint" in caplog.text
    assert ours.get(images[0]) is None
    assert ours.fill(images[:3]) == 3
    assert not (ours.dir / copied.name).exists() and not old.exists()
    with torch.no_grad():
        assert not torch.allclose(ours.get(images[0]), theirs.get(images[0]))


def test_duplicate_shards_count_once_and_are_removed(encoder, image_processor, images, tmp_path):
    cache = cache_at(tmp_path, encoder, image_processor)
    cache.fill(images)
    (shard,) = shards(cache)
    shutil.copy(shard, cache.dir / "shard-zzzz.safetensors")  # what two unlocked fills left
    size = shard.stat().st_size
    fresh = cache_at(tmp_path, encoder, image_processor)
    assert fresh.size_bytes() == size
    # the limit sees the one copy: room for exactly what is there
    assert cache_at(tmp_path, encoder, image_processor, max_bytes=size).fill(images) == 0
    assert shards(fresh) == [shard]
    # a stale temporary file of a killed fill goes too
    (cache.dir / f".shard-x.safetensors.{os.getpid()}.tmp").write_bytes(b"half")
    cache_at(tmp_path, encoder, image_processor).fill(images)
    assert not list(cache.dir.glob(".*.tmp"))


def test_a_shard_removed_after_indexing_skips_its_images(
    encoder, image_processor, images, tmp_path, caplog
):
    cache = cache_at(tmp_path, encoder, image_processor)
    cache.fill(images)
    reader = cache_at(tmp_path, encoder, image_processor)
    assert len(reader.index()) == 8
    for shard in shards(cache):
        shard.unlink()
    with caplog.at_level(logging.WARNING, logger="captioner.training.features"):
        assert reader.get(images[0]) is None and reader.get(images[1]) is None
    assert "cannot read" in caplog.text


FILL = """
import json, sys, time
from pathlib import Path
from transformers import AutoImageProcessor, AutoModel
from captioner.training.features import FeatureCache

model_dir, root, start, images = sys.argv[1], sys.argv[2], Path(sys.argv[3]), sys.argv[4:]
encoder = AutoModel.from_pretrained(model_dir).eval()
processor = AutoImageProcessor.from_pretrained(model_dir)
encode = FeatureCache._encode
def slow(self, items):  # long enough for the other run to arrive while this one computes
    time.sleep(0.4)
    return encode(self, items)
FeatureCache._encode = slow
while not start.exists():
    time.sleep(0.01)
print(json.dumps(FeatureCache(root, encoder, processor, max_bytes=2**30).fill(images, 2)))
"""


def test_two_runs_filling_one_cache_compute_each_image_once(
    tiny_dinov2_dir, encoder, image_processor, images, tmp_path
):
    start = tmp_path / "go"
    root = tmp_path / "cache"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    runs = [
        subprocess.Popen(
            [sys.executable, "-c", FILL, str(tiny_dinov2_dir), str(root), str(start), *images],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for _ in range(2)
    ]
    time.sleep(0.5)
    start.touch()
    results = []
    for run in runs:
        out, err = run.communicate(timeout=180)
        assert run.returncode == 0, err[-2000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    assert sorted(results) == [0, 8]  # one computed everything, the other waited and reused it
    cache = cache_at(root, encoder, image_processor)
    assert len(shards(cache)) == 1 and len(cache.index()) == 8
    assert cache.size_bytes() == shards(cache)[0].stat().st_size
