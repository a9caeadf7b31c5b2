"""GPU rows of the captioning and training benchmarks (issue 21): fp32 / fp16 / bf16, eager vs
SDPA attention, torch.compile, on a trained `dinov2-tiny` (VisionEncoderDecoder) model.

Plain transformers only (the GPU machine has its own torch/transformers and none of captioner's
extra dependencies), so it measures the model, not the CLI: images are decoded and processed once
(timed apart), then each row captions all of them greedily in batches and is compared with the
fp32 eager row (identical greedy captions, %). The training rows time optimiser steps of the
decoder on cached encoder features (what `captioner train` does with the feature cache), with the
fp32 captions as targets.

    python bench/gpu_caption_bench.py --model DIR --images DIR [--limit 1000] [--out F.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoTokenizer, VisionEncoderDecoderModel


def load(model_dir: str, attn: str, dtype: torch.dtype, device: str) -> VisionEncoderDecoderModel:
    model = VisionEncoderDecoderModel.from_pretrained(model_dir, attn_implementation=attn)
    return model.to(device=device, dtype=dtype).eval()


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@torch.inference_mode()
def caption_all(model, pixels: torch.Tensor, tok, batch: int, max_new: int, device: str,
                autocast: torch.dtype | None = None) -> tuple[list[str], float]:  # fmt: skip
    texts: list[str] = []
    dtype = next(model.parameters()).dtype
    ctx = (torch.autocast(device.split(":")[0], dtype=autocast) if autocast
           else torch.autocast(device.split(":")[0], enabled=False))  # fmt: skip
    with ctx:  # warm-up (kernels, compile): one batch, untimed
        model.generate(pixel_values=pixels[:batch].to(device, dtype), max_new_tokens=max_new)
    sync(device)
    start = time.perf_counter()
    with ctx:
        for i in range(0, len(pixels), batch):
            px = pixels[i : i + batch].to(device, dtype, non_blocking=True)
            ids = model.generate(pixel_values=px, max_new_tokens=max_new, do_sample=False)
            texts += tok.batch_decode(ids, skip_special_tokens=True)
    sync(device)
    return [" ".join(t.split()) for t in texts], time.perf_counter() - start


def train_rate(model_dir: str, pixels: torch.Tensor, captions: list[str], tok, device: str,
               mode: str, steps: int, batch: int) -> float:  # fmt: skip
    """Decoder optimiser steps per second x batch, on cached encoder features."""
    model = load(model_dir, "sdpa", torch.float32, device)
    with torch.inference_mode():
        chunks = [pixels[i : i + 256].to(device) for i in range(0, len(pixels), 256)]
        feats = torch.cat([model.encoder(pixel_values=c).last_hidden_state for c in chunks])
    feats = feats.clone()
    enc = tok(captions, padding=True, return_tensors="pt")
    labels = enc.input_ids.masked_fill(enc.attention_mask == 0, -100).to(device)
    model.encoder.requires_grad_(False)  # frozen tower: only the projection and decoder learn
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    step_fn = torch.compile(model, dynamic=False) if mode.endswith("compile") else model
    amp = mode.startswith("bf16")

    def step(i: int) -> None:
        sel = torch.arange(i * batch, (i + 1) * batch, device=device) % len(feats)
        with torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=amp):
            out = step_fn(encoder_outputs=(feats[sel],), labels=labels[sel])
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for i in range(3):  # warm-up (compile)
        step(i)
    sync(device)
    start = time.perf_counter()
    for i in range(steps):
        step(i)
    sync(device)
    return steps * batch / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--images", required=True)
    ap.add_argument("--limit", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--max_new_tokens", type=int, default=32)
    ap.add_argument("--train_steps", type=int, default=50)
    ap.add_argument("--out", default=None)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    dev = args.device
    info = {"torch": torch.__version__, "device": torch.cuda.get_device_name() if
            dev.startswith("cuda") else "cpu"}  # fmt: skip
    print(json.dumps(info), flush=True)
    tok = AutoTokenizer.from_pretrained(args.model)
    proc = AutoImageProcessor.from_pretrained(args.model)
    files = sorted(Path(args.images).glob("*.png"))[: args.limit]
    t0 = time.perf_counter()
    pixels = proc([Image.open(f).convert("RGB") for f in files], return_tensors="pt").pixel_values
    info["images"] = len(files)
    info["preprocess_s"] = round(time.perf_counter() - t0, 2)
    rows = [  # (name, attention, weights dtype, autocast dtype, compile)
        ("fp32 eager", "eager", torch.float32, None, False),
        ("fp32 sdpa", "sdpa", torch.float32, None, False),
        ("tf32 sdpa", "sdpa", torch.float32, None, False),
        ("bf16 autocast sdpa", "sdpa", torch.float32, torch.bfloat16, False),
        ("fp16 weights sdpa", "sdpa", torch.float16, None, False),
        ("bf16 weights sdpa", "sdpa", torch.bfloat16, None, False),
        ("bf16 weights sdpa + compile", "sdpa", torch.bfloat16, None, True),
    ]
    results, reference = [], None
    for name, attn, dtype, autocast, compiled in rows:
        torch.backends.cuda.matmul.allow_tf32 = name.startswith("tf32")
        torch.backends.cudnn.allow_tf32 = name.startswith("tf32")
        row = {"row": name}
        try:
            model = load(args.model, attn, dtype, dev)
            if compiled:
                model.encoder = torch.compile(model.encoder)
                model.decoder = torch.compile(model.decoder, dynamic=True)
            texts, secs = caption_all(model, pixels, tok, args.batch, args.max_new_tokens, dev,
                                      autocast)  # fmt: skip
            reference = reference or texts
            same = sum(a == b for a, b in zip(texts, reference, strict=True)) / len(texts)
            row.update(images_per_s=round(len(texts) / secs, 1), seconds=round(secs, 3),
                       identical=round(same, 4), sample=texts[0])  # fmt: skip
        except Exception as err:  # a row that fails is recorded, the others still run
            row["error"] = f"{type(err).__name__}: {str(err)[:300]}"
        print(json.dumps(row), flush=True)
        results.append(row)
    torch.backends.cuda.matmul.allow_tf32 = False
    train = []
    if reference is not None:
        for mode in ("fp32", "bf16 autocast", "bf16 autocast + compile"):
            row = {"train": mode, "batch": 64}
            try:
                row["samples_per_s"] = round(train_rate(args.model, pixels, reference, tok, dev,
                                                        mode, args.train_steps, 64), 1)  # fmt: skip
            except Exception as err:
                row["error"] = f"{type(err).__name__}: {str(err)[:300]}"
            print(json.dumps(row), flush=True)
            train.append(row)
    if args.out:
        Path(args.out).write_text(json.dumps({**info, "rows": results, "train": train}, indent=1))


if __name__ == "__main__":
    main()
