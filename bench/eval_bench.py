"""Peak memory of evaluation at 200 vs 2,000 eval images: it must not grow with the split.

Each (mode, size) runs in a fresh process, so `ru_maxrss` is that run's own peak:
  generate     `evaluation.evaluate.evaluate` (generate + score): what `captioner eval` runs
  decode_all   the same engine fed `list(dataset["image"])`: every image decoded up front
  guide        the guide's evaluation memory: teacher-forced logits of every batch kept, as
               Trainer gathers them before `compute_metrics` (argmax + WER)
The model is the `tiny` preset (random weights, special tokens banned so every caption has
`max_new_tokens` words: generation cost and caption strings are as large as they get).
Child processes (the METEOR and PTB-tokenizer JVMs, the image-loading DataLoader worker) are
reported separately as the largest child's peak RSS.

    .venv/bin/python bench/eval_bench.py            # 200 and 2000 images, all modes
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
OUT = Path(__file__).parent / "out" / "eval_bench"


def prepare(n: int, image_size: int) -> tuple[Path, Path]:
    from captioner.data.scenes import generate_scenes
    from captioner.models.build import build_preset

    data = OUT / f"scenes_{n}_{image_size}"
    if not (data / "metadata.jsonl").exists():
        generate_scenes(data, n=n, difficulty="medium", image_size=image_size)
    model = OUT / "tiny_model"
    if not (model / "config.json").exists():
        rows = [json.loads(line) for line in (data / "metadata.jsonl").open()]
        build_preset("tiny", [c for r in rows for c in r["captions"]], model)
    return data, model


def child(mode: str, n: int, data: Path, model_dir: Path, max_new_tokens: int) -> dict:
    import datasets
    import psutil
    import torch

    from captioner.data.sources import ImageColumn, load_captions
    from captioner.engine import Captioner
    from captioner.evaluation import evaluate as evaluation
    from captioner.evaluation import metrics
    from captioner.models.build import load_model

    splits = load_captions(data)
    ds = datasets.concatenate_datasets([splits["train"], splits["test"]]).select(range(n))
    model, processor = load_model(model_dir)
    with torch.no_grad():
        model.output.bias[processor.tokenizer.all_special_ids] = -1e4
    captioner = Captioner(model, processor, device="cpu")
    rss_before = psutil.Process().memory_info().rss
    start = time.perf_counter()
    if mode == "generate":
        result = evaluation.evaluate(captioner, ds, max_new_tokens=max_new_tokens, batch_size=32)
        cider = result.metrics["cider"]
    elif mode == "decode_all":
        preds = captioner.caption(
            list(ds["image"]), max_new_tokens=max_new_tokens, batch_size=32, num_workers=0
        )
        cider = metrics.compute(preds, [list(c) for c in ds["captions"]])["cider"]
    else:  # guide: keep every batch's teacher-forced logits, then argmax + WER at the end
        import jiwer

        from captioner.data.images import load_image

        logits, labels = [], []
        images, captions = ImageColumn(ds), ds["captions"]
        for s in range(0, n, 32):
            idx = range(s, min(s + 32, n))
            inputs = processor(
                images=[load_image(images[i]) for i in idx],
                text=[captions[i][0] for i in idx],
                padding="max_length",
                return_tensors="pt",
            )
            with torch.inference_mode():
                logits.append(model(**inputs, labels=inputs["input_ids"]).logits.numpy())
            labels.append(inputs["input_ids"].numpy())
        preds = [processor.batch_decode(x.argmax(-1), skip_special_tokens=True) for x in logits]
        refs = [processor.batch_decode(x, skip_special_tokens=True) for x in labels]
        cider = jiwer.wer(sum(refs, []), sum(preds, []))  # the guide's number, not CIDEr
    seconds = time.perf_counter() - start
    metrics._close_meteor()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    return {
        "mode": mode,
        "n": n,
        "rss_before_mib": rss_before / 2**20,
        "peak_rss_mib": peak / 2**20,
        "child_peak_rss_mib": children / 2**20,
        "seconds": seconds,
        "score": cider,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[200, 2000])
    ap.add_argument("--modes", nargs="+", default=["generate", "decode_all", "guide"])
    ap.add_argument("--image_size", type=int, default=224)
    ap.add_argument("--max_new_tokens", type=int, default=20)
    ap.add_argument("--child", nargs=2, metavar=("MODE", "N"))
    args = ap.parse_args()
    data, model = prepare(max(args.sizes), args.image_size)
    if args.child:
        mode, n = args.child[0], int(args.child[1])
        print(json.dumps(child(mode, n, data, model, args.max_new_tokens)))
        return
    print(f"{time.strftime('%Y-%m-%d')} · {platform.machine()} · {os.cpu_count()} CPUs · torch CPU")
    print(
        f"scenes: medium, {args.image_size} px; model: tiny preset; greedy, "
        f"max_new_tokens={args.max_new_tokens}, batch 32\n"
    )
    print("| mode | eval images | RSS before (MiB) | peak RSS (MiB) | child peak (MiB) | seconds |")
    print("|---|---:|---:|---:|---:|---:|")
    for mode in args.modes:
        for n in args.sizes:
            cmd = [sys.executable, __file__, "--child", mode, str(n)]
            cmd += ["--sizes", *map(str, args.sizes), "--image_size", str(args.image_size)]
            cmd += ["--max_new_tokens", str(args.max_new_tokens)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            r = json.loads(out.strip().splitlines()[-1])
            print(
                f"| {mode} | {n} | {r['rss_before_mib']:.0f} | {r['peak_rss_mib']:.0f} | "
                f"{r['child_peak_rss_mib']:.0f} | {r['seconds']:.1f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
