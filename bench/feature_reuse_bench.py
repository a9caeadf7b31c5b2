"""Feature reuse at captioning time: `captioner eval` on images whose frozen-tower outputs are
already in the feature cache (as `captioner train` leaves them) vs the same run on pixels.

The model is the `dinov2-tiny` preset (pretrained DINOv2-small cut to 6 layers at 112 px, frozen;
a 2-layer decoder of 256 from scratch, random weights scaled up so every caption runs to
`max_new_tokens`). The cache is filled once (what training does; timed apart), then:

  engine   `Captioner.caption` over the split's images, pixels and cached alternately, `--reps`
           times each, in one process (images/s; the captions must be identical)
  cli      the whole `captioner eval --split all` command once per mode, a fresh process each
           (load + caption + score); the cached run finds the cache by itself (`auto`, via
           $CAPTIONER_CACHE), the pixel run gets an empty $CAPTIONER_CACHE

    .venv/bin/python bench/feature_reuse_bench.py --images 256 --reps 3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
OUT = Path(__file__).parent / "out" / "feature_reuse_bench"


def prepare(n: int) -> tuple[Path, Path]:
    import torch

    from captioner.data.scenes import generate_scenes
    from captioner.models.build import build_preset, load_model
    from captioner.models.families import family_of

    data = OUT / f"scenes_{n}"
    if not (data / "metadata.jsonl").exists():
        generate_scenes(data, n=n, difficulty="medium")
    model_dir = OUT / "model"
    if not (model_dir / "config.json").exists():
        rows = [json.loads(line) for line in (data / "metadata.jsonl").open()]
        built = build_preset("dinov2-tiny", [c for r in rows for c in r["captions"]], OUT / "b")
        model, processor = load_model(built)
        frozen = {id(p) for p in family_of(model).vision_tower(model).parameters()}
        torch.manual_seed(0)
        with torch.no_grad():  # long captions: generation cost as a trained model's
            for p in model.parameters():
                if p.dim() > 1 and id(p) not in frozen:
                    p.normal_(0, 0.3)
        model.save_pretrained(model_dir)
        processor.save_pretrained(model_dir)
    return data, model_dir


def fill(model_dir: Path, images: list[str]) -> dict:
    from captioner.models.build import load_model
    from captioner.models.families import family_of
    from captioner.training.features import FeatureCache

    model, processor = load_model(model_dir)
    family = family_of(model)
    root = OUT / "cache" / "features"
    start = time.perf_counter()
    cache = FeatureCache(
        root, family.feature_encoder(model), processor.image_processor, max_bytes=2**31
    )
    computed = cache.fill(images)
    return {"fill_s": round(time.perf_counter() - start, 2), "computed": computed,
            "cache_mb": round(cache.size_bytes() / 2**20, 1)}  # fmt: skip


def engine(model_dir: Path, images: list[str], reps: int, max_new_tokens: int) -> dict:
    from captioner.engine import Captioner
    from captioner.jobs.executors.features import reuse_features

    captioner = Captioner.from_pretrained(model_dir, device="cpu")
    start = time.perf_counter()
    cache = reuse_features(captioner, model_dir, str(OUT / "cache" / "features"))
    find_s = time.perf_counter() - start
    assert cache is not None, "the cache was not found"
    source = captioner.features
    times: dict[str, list[float]] = {"pixels": [], "cached": []}
    captions: dict[str, list] = {}
    captioner.caption(images[:8], max_new_tokens=max_new_tokens)  # warm-up
    for _ in range(reps):
        for mode in ("pixels", "cached"):
            captioner.features = source if mode == "cached" else None
            start = time.perf_counter()
            captions[mode] = captioner.caption(images, max_new_tokens=max_new_tokens)
            times[mode].append(time.perf_counter() - start)
    differ = sum(a != b for a, b in zip(captions["pixels"], captions["cached"], strict=True))
    return {
        "find_cache_s": round(find_s, 3),
        **{f"{m}_img_s": [round(len(images) / t, 1) for t in ts] for m, ts in times.items()},
        "captions_differ": differ,
        "distinct_captions": len(set(captions["pixels"])),
    }


def cli(model_dir: Path, data: Path, max_new_tokens: int) -> dict:
    out = {}
    for mode, root in (("pixels", OUT / "empty"), ("cached", OUT / "cache")):
        root.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "CAPTIONER_CACHE": str(root)}
        cmd = [sys.executable, "-m", "captioner", "eval", str(model_dir), str(data),
               "--split", "all", "--max_new_tokens", str(max_new_tokens)]  # fmt: skip
        start = time.perf_counter()
        run = subprocess.run(cmd, env=env, capture_output=True, text=True)
        assert run.returncode == 0, run.stderr[-2000:]
        out[f"{mode}_s"] = round(time.perf_counter() - start, 1)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--max_new_tokens", type=int, default=20)
    parser.add_argument("--no_cli", action="store_true")
    args = parser.parse_args()
    data, model_dir = prepare(args.images)
    images = sorted(str(p) for p in data.glob("*.png"))
    result = {
        "images": len(images),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        **fill(model_dir, images),
        **engine(model_dir, images, args.reps, args.max_new_tokens),
    }
    if not args.no_cli:
        result["cli_eval"] = cli(model_dir, data, args.max_new_tokens)
    result["uptime"] = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
