"""Greedy captions identical to torch float32, per family: ONNX float32, ONNX int8 and
bfloat16 (mixed, and the whole-model cast it replaced), in one process on the same images.

    .venv/bin/python bench/onnx_agree.py MODEL_DIR IMAGES_DIR --n 300 [--modes ...]

`MODEL_DIR` is any captioner model folder; the ONNX folders are exported next to the results
(bench/out/onnx_agree/<name>/). Prints one markdown row per mode: identical %, images/s in this
process (2 torch / ONNX Runtime threads; a rough figure, the whole-command speed is
onnx_bench.py's) and the export's seconds.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
MODES = ("float32", "bfloat16", "bfloat16-cast", "onnx", "onnx-int8")
# int8 variants re-quantized from the float32 export, to see what the defaults buy
VARIANTS = {
    "onnx-int8-head": {"keep_head": False},  # the logits MatMul quantized too
    "onnx-int8-tensor": {"per_channel": False},  # one scale per weight matrix
}


def captioner_for(mode: str, model_dir: Path, work: Path):
    from captioner.engine import Captioner
    from captioner.models import precision
    from captioner.models.build import load_model
    from captioner.models.export import export_onnx

    if mode in VARIANTS:
        return Captioner.from_pretrained(_variant(work, mode)), None
    if mode.startswith("onnx"):
        start = time.perf_counter()
        out = export_onnx(model_dir, work / mode, int8=mode == "onnx-int8", overwrite=True)
        return Captioner.from_pretrained(out), time.perf_counter() - start
    model, processor = load_model(model_dir)
    if mode == "bfloat16-cast":
        model = model.to(torch.bfloat16)
    else:
        model = precision.prepare(model, dtype=mode)
    return Captioner(model, processor, device="cpu"), None


def _variant(work: Path, mode: str) -> Path:
    import json
    import shutil

    from captioner.models.export import FORMAT_FILE
    from captioner.models.export.quantize import quantize

    out = work / mode
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(work / "onnx", out)  # the float32 export: run "onnx" before the variants
    for graph in out.glob("*.onnx"):
        quantize(work / "onnx" / graph.name, graph, **VARIANTS[mode])
    meta = json.loads((out / FORMAT_FILE).read_text())
    (out / FORMAT_FILE).write_text(json.dumps({**meta, "int8": mode}))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("images", type=Path)
    parser.add_argument("--n", type=int, default=300)
    parser.add_argument("--name", default=None, help="the row's label (default: folder name)")
    parser.add_argument("--modes", nargs="+", default=list(MODES))
    parser.add_argument("--max_new_tokens", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    torch.set_num_threads(args.threads)
    name = args.name or args.model.name
    work = ROOT / "bench/out/onnx_agree" / name
    paths = sorted(p for p in args.images.rglob("*") if p.suffix in (".png", ".jpg"))[: args.n]
    reference = None
    for mode in ["float32", *[m for m in args.modes if m != "float32"]]:
        captioner, export_s = captioner_for(mode, args.model, work)
        captioner.caption(paths[:4], max_new_tokens=args.max_new_tokens)  # warm-up
        start = time.perf_counter()
        captions = captioner.caption(paths, max_new_tokens=args.max_new_tokens)
        rate = len(paths) / (time.perf_counter() - start)
        reference = captions if reference is None else reference
        same = sum(a == b for a, b in zip(reference, captions, strict=True)) / len(paths)
        distinct = len(set(captions))
        exported = "" if export_s is None else f"{export_s:.0f}"
        print(f"| {name} | {mode} | {len(paths)} | {same:.1%} | {rate:.1f} | {distinct} | "
              f"{exported} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
