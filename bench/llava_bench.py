"""LLaVA compositions on a CPU (issue 18, part 2): `dinov2-smollm2` trained on its feature cache
vs on pixels, what makes it fast, and where a training step's time goes.

Modes, each a fresh subprocess (so peak RSS is per mode), started only when no `captioner demo` /
`pytest` runs (waits at most --max_wait_s):

  preset     `--model dinov2-smollm2` as it is (DINOv2-small cut to 6 layers at 56 px = 17 image
             tokens -> MLP projector -> SmolLM2-135M cut to 6 of 30 layers, LoRA r 8 on q/v + the
             projector under bf16 autocast: the preset's defaults) on its feature cache.
  uncached   `--model dinov2-smollm2-full` (the whole LM at 112 px = 65 image tokens, fp32) with
             `--feature_cache off` (the tower frozen but run every step; one DataLoader worker
             decodes and preprocesses beside the step, captioner's default).
  cached     the same with `--feature_cache <fresh dir>` (the one-off fill timed separately; the
             batches are tensor lookups, so the trainer drops the worker).
  cached_OPTIONS  `cached` changed by `_`-joined options: `bf16` (CPU autocast; the CPU has
             AVX512-BF16), `17tok` (image_size=56: 4 x 4 patches + CLS), `L<text_layers>` (`L8`:
             8 layers, the first 2 and last 6; `L0+1+2+3+4+5+6+7`: the first 8), `compile`
             (--torch_compile). E.g. `cached_bf16_17tok_L8` is the preset spelled out.
  breakdown  one batch of `dinov2-smollm2`, in-process: seconds of the tower (what the cache
             saves), the projector, the LM's layers and the LM head, forward and backward, and
             the optimizer step; FLOPs per sample by module (FlopCounterMode) and the sequence.

Samples/s is timed between optimizer steps after the first (compose_bench's step timer).

    .venv/bin/python bench/llava_bench.py                     # all modes: ~10 min + waits
    .venv/bin/python bench/llava_bench.py --modes cached,uncached
    .venv/bin/python bench/llava_bench.py --report            # re-print the last results
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).parent))

from compose_bench import (  # noqa: E402  (bench/ is no package: its siblings by path)
    WAIT_PATTERN,
    machine,
    median_step,
    run_train,
    samples_per_second,
    wait_quiet,
)

OUT = Path(__file__).parent / "out" / "llava_bench"
PRESET = "dinov2-smollm2"  # the CPU-sized preset (mode `preset`)
FULL = "dinov2-smollm2-full"  # the whole LM at 112 px: the base the other modes vary
# The base's composition and training defaults, read from its JSON (modes vary the spec).
_BASE = json.loads(
    (Path(__file__).parents[1] / "src/captioner/models/presets" / f"{FULL}.json").read_text()
)
DEFAULTS = _BASE.get("training_defaults", {})
SPEC = {k: v for k, v in _BASE.items() if k not in ("_comment", "training_defaults")}
MODES = ("preset", "cached", "uncached", "cached_bf16", "cached_17tok", "breakdown")


# --- the child processes ---


def train_mode(mode: str, cfg: dict) -> dict:
    """`preset` (dinov2-smollm2 as it is), or `uncached` / `cached` (dinov2-smollm2-full) then any
    of `_bf16`, `_17tok`, `_L<text_layers>`, `_compile`: e.g. `cached_bf16_17tok_L8` or
    `cached_bf16_17tok_L0+1+2+3+4+5+6+7`."""
    out = OUT / f"run_{mode}"
    shutil.rmtree(out, ignore_errors=True)
    base, *options = mode.split("_")
    flags: dict = {
        "model": PRESET if base == "preset" else FULL,
        "data": cfg["data"],
        "output_dir": out,
        "eval_strategy": "no",
        "save_strategy": "no",
        "test_size": 0,
        "logging_steps": 5,
        "seed": 0,
        "report_to": "none",
        "max_steps": cfg["steps"],
        "per_device_train_batch_size": cfg["batch"],
        "feature_cache": "off" if base == "uncached" else Path(cfg["tmp"]) / f"features_{mode}",
    }
    if base == "preset":  # as `captioner train --model dinov2-smollm2` runs it
        return run_train(flags) | {"flags": {k: str(v) for k, v in flags.items()}}
    spec = dict(SPEC)
    for option in options:
        if option == "bf16":  # transformers refuses bf16 without a GPU unless told: use_cpu
            flags |= {"bf16": True, "use_cpu": True}
        elif option == "compile":  # torch.compile (inductor; needs a C++ compiler on a CPU)
            flags["torch_compile"] = True
        elif option == "17tok":
            spec["image_size"] = 56
        elif option.startswith("L"):  # L8: 8 layers (the ends); L0+1+28+29: those layers
            spec["text_layers"] = option[1:]
        else:
            raise SystemExit(f"unknown mode option {option!r} in {mode!r}")
    if spec != SPEC:  # the base as a composition: its training defaults passed as flags
        flags |= {"model": ",".join(f"{k}={v}" for k, v in spec.items()),
                  **DEFAULTS}  # fmt: skip
    result = run_train(flags)
    result["flags"] = {k: str(v) for k, v in flags.items()}
    return result


def breakdown(cfg: dict) -> dict:
    """Seconds and FLOPs of one training step's parts on one batch of the preset."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from captioner.data.sources import load_captions
    from captioner.models.build import build_preset, load_model
    from captioner.models.compose import freeze
    from captioner.models.families import family_of
    from captioner.models.lora import add_lora
    from captioner.training.collate import CaptionCollator
    from captioner.training.features import FeatureCache
    from captioner.training.trainer import _with_index

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    n = cfg["batch"]
    rows = _with_index(load_captions(cfg["data"], test_size=0)["train"]).select(range(n))
    folder = Path(cfg["tmp"]) / "breakdown_preset"
    if not (folder / "config.json").exists():
        build_preset(PRESET, [c for caps in rows["captions"] for c in caps], folder)
    model, processor = load_model(folder)
    family = family_of(model)
    freeze(family.vision_tower(model))
    encoder = family.feature_encoder(model)
    cache = FeatureCache(
        Path(cfg["tmp"]) / "breakdown_features", encoder, processor.image_processor, max_bytes=2**32
    )
    cache.fill([rows[i]["image"] for i in range(n)])
    family.use_cached_features(model)
    model = add_lora(model, r=8, alpha=16, dropout=0.05)
    model.train()
    items = [rows[i] for i in range(n)]
    pixels = CaptionCollator(processor, family)(items)
    cached = CaptionCollator(processor, family, features=cache)(items)
    inner = model.get_base_model()
    parts = {
        "projector": inner.model.multi_modal_projector,
        "lm_layers": inner.model.language_model,
        "lm_head": inner.lm_head,
    }
    clock: dict[str, float] = {}
    started: dict[str, float] = {}
    handles = []
    for name, module in parts.items():
        handles.append(
            module.register_forward_pre_hook(
                lambda m, a, name=name: started.__setitem__(name, time.perf_counter())
            )
        )
        handles.append(
            module.register_forward_hook(
                lambda m, a, o, name=name: clock.__setitem__(
                    name, clock.get(name, 0.0) + time.perf_counter() - started[name]
                )
            )
        )
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=2e-4)

    def step(batch) -> dict[str, float]:
        clock.clear()
        t0 = time.perf_counter()
        loss = model(**batch).loss
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        t3 = time.perf_counter()
        return {"forward": t1 - t0, "backward": t2 - t1, "optimizer": t3 - t2, **clock}

    step(cached)  # warm-up
    cached_steps = [step(cached) for _ in range(cfg["repeats"])]
    pixel_steps = [step(pixels) for _ in range(cfg["repeats"])]
    with torch.no_grad():
        t0 = time.perf_counter()
        for _ in range(cfg["repeats"]):
            encoder(pixels["pixel_values"])
        tower_s = (time.perf_counter() - t0) / cfg["repeats"]
    for h in handles:
        h.remove()

    def flops(batch) -> dict[str, float]:
        counter = FlopCounterMode(display=False, depth=4)
        with counter:
            model(**batch).loss.backward()
        model.zero_grad(set_to_none=True)
        counts = counter.get_flop_counts()
        out = {"total": counter.get_total_flops() / n / 1e9}
        for name, values in counts.items():
            short = name.split(".")[-1]
            if short in ("vision_tower", "multi_modal_projector", "language_model", "lm_head"):
                out[short] = sum(values.values()) / n / 1e9
        return out

    def mean(steps: list[dict]) -> dict[str, float]:
        return {k: sum(s[k] for s in steps) / len(steps) for k in steps[0]}

    ids = cached["input_ids"]
    return {
        "batch": n,
        "sequence": int(ids.shape[1]),
        "image_tokens": int((ids[0] == inner.config.image_token_id).sum()),
        "caption_label_tokens": float((cached["labels"] != -100).sum(1).float().mean()),
        "cached_step_s": mean(cached_steps),
        "pixel_step_s": mean(pixel_steps),
        "tower_forward_s": tower_s,
        "gflop_per_sample_cached": flops(cached),
        "gflop_per_sample_pixels": flops(pixels),
        "trainable_params": sum(p.numel() for p in trainable),
        "matmul_gflops": matmul_peak(),
        "threads": torch.get_num_threads(),
    }


def matmul_peak() -> float:
    """Best fp32 torch.matmul GFLOP/s over a few square sizes (the machine's ceiling now)."""
    import torch

    best = 0.0
    for size in (512, 1024, 2048):
        a, b = torch.randn(size, size), torch.randn(size, size)
        a @ b
        t0 = time.perf_counter()
        for _ in range(3):
            a @ b
        best = max(best, 3 * 2 * size**3 / (time.perf_counter() - t0) / 1e9)
    return best


def child(mode: str, cfg: dict) -> dict:
    if mode == "prep":
        from captioner.data.scenes import generate_scenes
        from captioner.models.parts import get_part

        start = time.perf_counter()
        get_part("dinov2-small")
        get_part("smollm2-135m")
        data = Path(cfg["data"])
        if not (data / "metadata.jsonl").exists():
            generate_scenes(data, n=cfg["scenes"], seed=0, difficulty="hard", image_size=112)
        return {"prep_s": time.perf_counter() - start}
    start = time.perf_counter()
    result = breakdown(cfg) if mode == "breakdown" else train_mode(mode, cfg)
    result["wall_s"] = time.perf_counter() - start
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result["child_peak_rss_mb"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return result


# --- the parent ---


def run_child(mode: str, cfg: dict) -> dict:
    cmd = [sys.executable, __file__, "--_child", mode, "--_cfg", json.dumps(cfg)]
    run = subprocess.run(cmd, capture_output=True, text=True)
    line = next((x for x in run.stdout.splitlines() if x.startswith("RESULT ")), None)
    (OUT / f"{mode}.log").write_text(run.stdout[-20000:] + run.stderr[-20000:])
    if run.returncode or line is None:
        print(run.stderr[-4000:], file=sys.stderr)
        return {"error": f"exit {run.returncode}; log in {OUT / f'{mode}.log'}"}
    return json.loads(line[len("RESULT ") :])


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--steps", type=int, default=10, help="optimizer steps per training mode")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--scenes", type=int, default=320, help="hard scenes at 112 px")
    ap.add_argument("--repeats", type=int, default=2, help="breakdown: timed steps per input")
    ap.add_argument("--tmp", help="CAPTIONER_CACHE's features etc. (default: a fresh temp dir)")
    ap.add_argument("--max_wait_s", type=float, default=600)
    ap.add_argument("--wait_pattern", default=WAIT_PATTERN)
    ap.add_argument("--report", action="store_true", help="re-print the last results.json")
    ap.add_argument("--_child", help=argparse.SUPPRESS)
    ap.add_argument("--_cfg", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.report:
        report(json.loads((OUT / "results.json").read_text()))
        return
    if args._child:
        print("RESULT " + json.dumps(child(args._child, json.loads(args._cfg))))
        return
    OUT.mkdir(parents=True, exist_ok=True)
    tmp = Path(args.tmp or tempfile.mkdtemp(prefix="llava_bench_"))
    cfg = {
        "steps": args.steps,
        "batch": args.batch,
        "scenes": args.scenes,
        "repeats": args.repeats,
        "tmp": str(tmp),
        "data": str(OUT / "data" / f"hard112_{args.scenes}"),
    }
    for mode in MODES:
        shutil.rmtree(tmp / f"features_{mode}", ignore_errors=True)  # every fill starts fresh
    results = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": machine(),
        "cfg": cfg,
        "prep": run_child("prep", cfg),
        "runs": {},
    }
    path = OUT / "results.json"
    old = json.loads(path.read_text()) if path.exists() else {}
    for mode in args.modes.split(","):
        waited = wait_quiet(args.max_wait_s, args.wait_pattern)
        before, started = uptime(), time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())
        print(f"--- {mode} (waited {waited:.0f} s; {before})", file=sys.stderr)
        result = run_child(mode, cfg)
        result |= {"waited_s": waited, "started": started, "uptime_before": before,
                   "uptime_after": uptime()}  # fmt: skip
        results["runs"][mode] = result
        merged = {**old, **results, "runs": {**old.get("runs", {}), **results["runs"]}}
        path.write_text(json.dumps(merged, indent=2))
    report(json.loads(path.read_text()))


# --- the report ---


def load(r: dict) -> str:
    def one(text: str) -> str:
        return text.split("load average:")[-1].split(",")[0].strip()

    return f"{one(r['uptime_before'])} → {one(r['uptime_after'])}"


def report(res: dict) -> None:
    runs = res["runs"]
    cfg = res["cfg"]
    print(f"\n{res['date']} · {res['machine']} · batch {cfg['batch']}, {cfg['steps']} steps")
    print(
        "\n| dinov2-smollm2 | UTC | train samples/s | per CPU-s | median step s | one-off fill "
        "s (images) | train loss | peak RSS MB | load (1 min) before → after |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---|")
    for mode, r in runs.items():
        if mode == "breakdown":
            continue
        if "error" in r:
            print(f"| {mode} | — | failed: {r['error']} | | | | | | |")
            continue
        fill = sum(f["s"] for f in r["fills"])
        imgs = sum(f["computed"] for f in r["fills"])
        fill_txt = f"{fill:.1f} ({imgs})" if imgs else "—"
        print(
            f"| {mode} | {r['started'][-8:-3]} | {samples_per_second(r):.2f} | "
            f"{samples_per_second(r, clock='cpu'):.2f} | {median_step(r):.2f} | {fill_txt} | "
            f"{r['train_loss']:.3f} ({r['flags']['max_steps']} steps) | {r['peak_rss_mb']:.0f} | "
            f"{load(r)} |"
        )
    if "cached" in runs and "uncached" in runs and "error" not in runs["cached"]:
        c, u = runs["cached"], runs["uncached"]
        print(
            f"\ncached / uncached: {samples_per_second(c) / samples_per_second(u):.2f}x samples/s,"
            f" {median_step(u) / median_step(c):.2f}x by median step; target 20 samples/s: "
            f"{'met' if samples_per_second(c) >= 20 else 'missed'}"
        )
    b = runs.get("breakdown")
    if b and "error" not in b:
        c, p = b["cached_step_s"], b["pixel_step_s"]
        print(
            f"\nbreakdown (batch {b['batch']}, sequence {b['sequence']} = {b['image_tokens']} "
            f"image tokens + prompt + caption; {b['caption_label_tokens']:.1f} label tokens/row; "
            f"{b['trainable_params'] / 1e6:.2f} M trainable; matmul peak "
            f"{b['matmul_gflops']:.0f} GFLOP/s, {b['threads']} threads):"
        )
        print("\n| seconds per step | cached | pixels |")
        print("|---|---:|---:|")
        for key in ("forward", "projector", "lm_layers", "lm_head", "backward", "optimizer"):
            print(f"| {key} | {c.get(key, 0):.2f} | {p.get(key, 0):.2f} |")
        total_c = c["forward"] + c["backward"] + c["optimizer"]
        total_p = p["forward"] + p["backward"] + p["optimizer"]
        print(f"| **step** | **{total_c:.2f}** | **{total_p:.2f}** |")
        print(f"| (tower forward alone, no grad) | — | {b['tower_forward_s']:.2f} |")
        fc, fp = b["gflop_per_sample_cached"], b["gflop_per_sample_pixels"]
        print("\n| GFLOP per sample (fwd + bwd) | cached | pixels |")
        print("|---|---:|---:|")
        for key in ("vision_tower", "multi_modal_projector", "language_model", "lm_head", "total"):
            print(f"| {key} | {fc.get(key, 0):.2f} | {fp.get(key, 0):.2f} |")
        print(
            f"\ncached: {fc['total'] * b['batch'] / total_c:.0f} GFLOP/s achieved = "
            f"{fc['total'] * b['batch'] / total_c / b['matmul_gflops']:.0%} of the matmul peak; "
            f"20 samples/s would need {20 * fc['total']:.0f} GFLOP/s"
        )


if __name__ == "__main__":
    main()
