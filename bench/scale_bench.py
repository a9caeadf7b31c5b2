"""Scale-out on a small CPU box: FLOPs per caption, multi-process training, Ray Data captioning.

    .venv/bin/python bench/scale_bench.py                    # all three parts, ~10 min on 2 cores
    .venv/bin/python bench/scale_bench.py --parts flops      # FLOPs only (~1 min)
    .venv/bin/python bench/scale_bench.py --parts train --train_steps 150 --repeats 2

flops    FLOPs of one greedy caption of exactly N new tokens (`min_new_tokens = max_new_tokens =
         N`, batch 1), counted by `torch.utils.flop_counter.FlopCounterMode` around the same
         `Captioner` the CLI uses, for the `tiny`, `small` and `dinov2-tiny` presets; and, for
         scale, the shapes of microsoft/git-base and Salesforce/blip-image-captioning-base
         (their default transformers configs with random weights: FLOPs depend on shapes only).
         N = 1 and N = `--tokens` give the cost of the image + first token and of each further
         token. docs/scaling.md turns these into a per-GPU throughput estimate.
host     what a GPU does not remove (1 thread): decoding + preprocessing a 1024x768 JPEG, and
         the host time of one greedy decoding step at batch 1 (N=21 minus N=1 tokens, / 20).
train    the `tiny` preset on `--train_scenes` generated scenes, one global batch (16) two ways:
         1 process x 2 torch threads (`python -m captioner train`'s path, in-process) and
         2 processes x 1 thread (`accelerate launch --config_file examples/accelerate/ddp.yaml
         --num_processes 2 --mixed_precision no ... --use_cpu`: gloo DDP), per-device batch 16
         vs 8. Samples/s is timed between optimizer steps with a TrainerCallback (as in
         bench/train_bench.py), after `--warmup` steps; the loss curves of the two are compared
         (same global batch, same seed: they differ only by dropout masks and summation order).
         `--pixel_cache off --dataloader_num_workers 0`: both decode the same images in the
         training processes, and no extra process competes for the cores.
caption  `--images` 256x256 JPEGs, the `tiny` preset (random weights: every caption runs the full
         `--caption_tokens`), batch 32 everywhere: `captioner caption` (one process) vs
         `captioner caption --engine ray --num_workers 1|2` (a local Ray instance started by the
         command). Each is the real CLI in a subprocess; the bench polls the output rows every
         0.25 s, so start-up (imports, Ray, actors, model load, first batch) and the steady rate
         after the first rows are reported apart; `ray.init()` alone is timed in its own process.
         Captions are compared with the single-process run's.

Two processes on two cores cannot be faster than one process with two threads: the point of the
train and caption parts is that the multi-process paths are correct and what they cost.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = Path(__file__).resolve().parent / "out" / "scale_bench"
VENV_BIN = Path(sys.executable).parent
DDP_YAML = ROOT / "examples" / "accelerate" / "ddp.yaml"
ENV = {
    "HF_HUB_OFFLINE": "1",
    "OMP_WAIT_POLICY": "PASSIVE",
    "TOKENIZERS_PARALLELISM": "false",
    "RAY_TMPDIR": "/tmp",
}
CAPTIONS = [
    f"a {c} {s} on a {bg} background"
    for c in ("red", "green", "blue", "white", "yellow", "purple")
    for s in ("circle", "square", "triangle", "star", "cross")
    for bg in ("black", "gray", "striped", "white")
]


def cores() -> int:
    return len(os.sched_getaffinity(0))


def child_env() -> dict[str, str]:
    return {**os.environ, **ENV, "CAPTIONER_CACHE": str(OUT / "cache")}


# --- flops ---


def count_caption_flops(captioner, image, tokens: int) -> tuple[int, str]:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        caption = captioner.caption(
            [image],
            max_new_tokens=tokens,
            min_new_tokens=tokens,
            batch_size=1,
            num_workers=0,
        )[0]
    return counter.get_total_flops(), caption


def count_generate_flops(model, pixels, tokens: int) -> int:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.inference_mode():
        ids = model.generate(
            pixel_values=pixels, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False
        )
    assert ids.shape[1] >= tokens, ids.shape
    return counter.get_total_flops()


def part_flops(args) -> list[dict]:
    import torch
    from PIL import Image

    from captioner.engine import Captioner
    from captioner.models.build import build_preset, load_model

    torch.manual_seed(0)
    image = Image.new("RGB", (256, 256), (200, 40, 40))
    rows = []
    for preset in ("tiny", "small", "dinov2-tiny"):
        folder = OUT / "models" / preset
        if not (folder / "config.json").exists():
            build_preset(preset, CAPTIONS, folder)
        model, processor = load_model(folder)
        captioner = Captioner(model, processor, device="cpu")
        one, _ = count_caption_flops(captioner, image, 1)
        full, caption = count_caption_flops(captioner, image, args.tokens)
        rows.append(_flops_row(preset, model, one, full, args.tokens, caption))
    from transformers import (
        BlipConfig,
        BlipForConditionalGeneration,
        GitConfig,
        GitForCausalLM,
    )

    for name, cls, config, side in (
        ("git-base shape (GitConfig())", GitForCausalLM, GitConfig(), 224),
        ("blip-base shape (BlipConfig())", BlipForConditionalGeneration, BlipConfig(), 384),
    ):
        model = cls(config).eval()
        pixels = torch.randn(1, 3, side, side)
        one = count_generate_flops(model, pixels, 1)
        full = count_generate_flops(model, pixels, args.tokens)
        rows.append(_flops_row(name, model, one, full, args.tokens, None))
        del model
    return rows


def _flops_row(name, model, one, full, tokens, caption) -> dict:
    return {
        "model": name,
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "gflop_first": one / 1e9,
        "gflop_per_token": (full - one) / (tokens - 1) / 1e9,
        "gflop_caption": full / 1e9,
        "tokens": tokens,
        "words": len(caption.split()) if caption is not None else None,
    }


# --- host: what a GPU cannot hide ---


def part_host(args) -> dict:
    """CPU-side costs per image and per decoding step (1 thread): decoding + preprocessing a
    photo-sized JPEG, and the host time of one `generate` step at batch 1 (tiny compute, so it is
    Python + dispatch: a floor for a GPU step of these small decoders too)."""
    import numpy as np
    import torch
    from PIL import Image, ImageDraw
    from transformers import CLIPImageProcessor

    from captioner.engine import Captioner, open_image
    from captioner.models.build import load_model

    torch.set_num_threads(1)
    photo = OUT / "photo_1024x768.jpg"
    rng = np.random.default_rng(0)
    base = np.linspace(0, 255, 1024 * 768 * 3).reshape(768, 1024, 3) % 256
    noisy = (base + rng.normal(0, 12, base.shape)).clip(0, 255).astype("uint8")
    img = Image.fromarray(noisy)
    draw = ImageDraw.Draw(img)
    for _ in range(40):
        x, y = int(rng.integers(0, 900)), int(rng.integers(0, 650))
        draw.ellipse([x, y, x + 120, y + 110], fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
    img.save(photo, quality=90)
    out: dict = {"photo_kb": photo.stat().st_size / 1024, "decode_ms": {}, "step_ms": {}}
    processors = {"tiny (64 px)": load_model(OUT / "models" / "tiny")[1].image_processor}
    processors["CLIP 224 px (git-base)"] = CLIPImageProcessor()
    for name, proc in processors.items():
        best = float("inf")
        for _ in range(3):
            start = time.perf_counter()
            for _ in range(30):
                proc(images=open_image(str(photo)), return_tensors="pt")
            best = min(best, (time.perf_counter() - start) / 30)
        out["decode_ms"][name] = best * 1e3
    image = Image.new("RGB", (256, 256), (200, 40, 40))
    for preset in ("tiny", "small", "dinov2-tiny"):
        model, processor = load_model(OUT / "models" / preset)
        captioner = Captioner(model, processor, device="cpu")
        times = {}
        for n in (1, 21):
            best = float("inf")
            for _ in range(5):
                start = time.perf_counter()
                captioner.caption([image], max_new_tokens=n, min_new_tokens=n, batch_size=1,
                                  num_workers=0)  # fmt: skip
                best = min(best, time.perf_counter() - start)
            times[n] = best
        out["step_ms"][preset] = (times[21] - times[1]) / 20 * 1e3
    return out


# --- train ---


def train_child(spec: dict) -> None:
    """One training run (possibly one rank of several): time the optimizer steps on rank 0."""
    import torch
    from transformers import TrainerCallback

    from captioner.training.arguments import parse_train_args
    from captioner.training.trainer import train

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    torch.set_num_threads(max(1, cores() // local))  # as `captioner train` does

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.times: list[float] = []

        def on_step_end(self, args, state, control, **kwargs):
            self.times.append(time.perf_counter())

    timer = StepTimer()
    model_args, data_args, decoding, training_args = parse_train_args(spec["argv"])
    out = train(model_args, data_args, training_args, decoding, callbacks=[timer])
    if int(os.environ.get("RANK", "0")) == 0:  # the launcher's rank: the one that saved
        state = json.loads((out / "trainer_state.json").read_text())
        results = json.loads((out / "train_results.json").read_text())
        Path(spec["result"]).write_text(
            json.dumps(
                {
                    "times": timer.times,
                    "losses": [e["loss"] for e in state["log_history"] if "loss" in e],
                    "world_size": int(os.environ.get("WORLD_SIZE", "1")),
                    "threads": torch.get_num_threads(),
                    "trainer_samples_per_second": results["train_samples_per_second"],
                    "epoch": results["epoch"],
                }
            )
        )


def part_train(args) -> list[dict]:
    from captioner.data.scenes import generate_scenes

    data = OUT / f"scenes_{args.train_scenes}"
    if not (data / "metadata.jsonl").exists():
        generate_scenes(data, n=args.train_scenes, seed=0)
    batch = 16
    runs = []
    for repeat in range(args.repeats):
        for procs in (1, 2):
            out = OUT / "train" / f"p{procs}_r{repeat}"
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir(parents=True)
            argv = ["--model", "tiny", "--data", str(data), "--output_dir", str(out),
                    "--max_steps", str(args.warmup + args.train_steps),
                    "--per_device_train_batch_size", str(batch // procs), "--test_size", "0",
                    "--eval_strategy", "no", "--logging_steps", "10", "--seed", "0",
                    "--dataloader_num_workers", "0", "--pixel_cache", "off", "--use_cpu",
                    "--report_to", "none"]  # fmt: skip
            spec = {"argv": argv, "result": str(out / "bench.json")}
            me = [str(Path(__file__).resolve()), "--_train_child", json.dumps(spec)]
            if procs == 1:
                cmd = [sys.executable, *me]
            else:
                cmd = [str(VENV_BIN / "accelerate"), "launch", "--config_file", str(DDP_YAML),
                       "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
                       "--dynamo_backend", "no", *me]  # fmt: skip
            print(f"--- train: {procs} process(es), repeat {repeat}", file=sys.stderr, flush=True)
            start = time.perf_counter()
            done = subprocess.run(cmd, env=child_env(), capture_output=True, text=True, cwd=ROOT)
            wall = time.perf_counter() - start
            if done.returncode:
                print(done.stderr[-4000:], file=sys.stderr)
                raise SystemExit(f"train run with {procs} process(es) failed")
            r = json.loads((out / "bench.json").read_text())
            t = r["times"][args.warmup - 1 :]
            r.update(
                procs=procs,
                repeat=repeat,
                per_device=batch // procs,
                samples_per_s=batch * (len(t) - 1) / (t[-1] - t[0]),
                wall_s=wall,
                built=done.stderr.count("built GIT"),
            )
            runs.append(r)
    return runs


# --- caption ---


def count_rows(target: Path) -> int:
    files = sorted(target.glob("part-*.jsonl")) if target.is_dir() else [target]
    n = 0
    for f in files:
        try:
            n += f.read_bytes().count(b"\n")
        except OSError:
            pass
    return n


def read_rows(target: Path) -> dict[str, str | None]:
    files = sorted(target.glob("part-*.jsonl")) if target.is_dir() else [target]
    rows = {}
    for f in files:
        for line in f.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                rows[row["image"]] = row.get("caption")
    return rows


def run_polled(cmd: list[str], target: Path, total: int) -> dict:
    """Run `cmd`, polling how many rows it has written; start-up vs steady rate."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=child_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT)  # fmt: skip
    samples = []
    while proc.poll() is None:
        samples.append((time.perf_counter() - start, count_rows(target) if target.exists() else 0))
        time.sleep(0.25)
    wall = time.perf_counter() - start
    err = proc.stderr.read()
    if proc.returncode:
        print(err[-4000:], file=sys.stderr)
        raise SystemExit(f"{cmd} failed ({proc.returncode})")
    rows = count_rows(target)
    samples.append((wall, rows))
    first = next((s for s in samples if s[1] > 0), samples[-1])
    last = next(s for s in samples if s[1] == rows)
    steady = (rows - first[1]) / (last[0] - first[0]) if last[0] > first[0] else float("nan")
    return {
        "wall_s": wall,
        "rows": rows,
        "first_rows_s": first[0],
        "first_rows": first[1],
        "steady_images_per_s": steady,
        "end_to_end_images_per_s": total / wall,
    }


def part_caption(args) -> dict:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from caption_bench import make_images

    from captioner.models.build import build_preset

    folder = OUT / f"images_{args.images}"
    if len(list(folder.glob("*.jpg"))) != args.images:
        shutil.rmtree(folder, ignore_errors=True)
        make_images(folder, args.images)
    model = OUT / "models" / "tiny"
    if not (model / "config.json").exists():
        build_preset("tiny", CAPTIONS, model)
    cli = [sys.executable, "-m", "captioner", "caption", str(model), str(folder), "--batch_size",
           "32", "--max_new_tokens", str(args.caption_tokens), "--no_progress"]  # fmt: skip
    results: dict = {}
    # ray.init() alone, in a fresh process, as the CLI calls it
    code = (
        "import os, time; t0 = time.perf_counter(); import ray; t1 = time.perf_counter(); "
        "ray.init(num_cpus=len(os.sched_getaffinity(0)), include_dashboard=False, "
        "log_to_driver=False); t2 = time.perf_counter(); ray.shutdown(); "
        "t3 = time.perf_counter(); print(t1 - t0, t2 - t1, t3 - t2)"
    )
    print("--- caption: ray.init alone", file=sys.stderr, flush=True)
    done = subprocess.run([sys.executable, "-c", code], env=child_env(), capture_output=True,
                          text=True, check=True)  # fmt: skip
    imp, init, stop = map(float, done.stdout.split()[-3:])
    results["ray_init"] = {"import_s": imp, "init_s": init, "shutdown_s": stop}
    sides = [("local", None), ("ray", 1), ("ray", 2)]
    for side, workers in sides:
        name = side if workers is None else f"ray x{workers}"
        print(f"--- caption: {name}", file=sys.stderr, flush=True)
        target = OUT / "caption" / name.replace(" ", "_")
        shutil.rmtree(target, ignore_errors=True)
        if side == "local":
            target.parent.mkdir(parents=True, exist_ok=True)
            target = target.with_suffix(".jsonl")
            target.unlink(missing_ok=True)
            cmd = [*cli, "--output", str(target)]
        else:
            cmd = [*cli, "--engine", "ray", "--num_workers", str(workers), "--output", str(target)]
        r = run_polled(cmd, target, args.images)
        r["captions"] = read_rows(target)
        results[name] = r
    local = results["local"]["captions"]
    for name in ("ray x1", "ray x2"):
        got = results[name].pop("captions")
        results[name]["same_captions"] = sum(got.get(k) == v for k, v in local.items())
        results[name]["unique_images"] = len(got)
    results["local"].pop("captions")
    return results


# --- report ---


def report(results: dict) -> None:
    meta = results["meta"]
    print(
        f"\n{meta['date']} · {meta['machine']} · {meta['cpus']} CPUs · torch {meta['torch']} · "
        f"load average before {meta['load_before']}, after {meta['load_after']}"
    )
    if "flops" in results:
        print(f"\nFLOPs per greedy caption ({results['flops'][0]['tokens']} new tokens, batch 1)\n")
        print("| model | parameters (M) | GFLOP image + 1st token | GFLOP per further token "
              "| GFLOP per caption |")  # fmt: skip
        print("|---|---:|---:|---:|---:|")
        for r in results["flops"]:
            print(f"| {r['model']} | {r['params_m']:.1f} | {r['gflop_first']:.3f} | "
                  f"{r['gflop_per_token']:.4f} | {r['gflop_caption']:.3f} |")  # fmt: skip
    if "host" in results:
        h = results["host"]
        print(f"\nHost costs, 1 thread: decode + preprocess one 1024x768 JPEG "
              f"({h['photo_kb']:.0f} KB); one greedy decoding step at batch 1\n")  # fmt: skip
        print("| what | ms |")
        print("|---|---:|")
        for name, ms in h["decode_ms"].items():
            print(f"| decode + preprocess, {name} | {ms:.1f} |")
        for name, ms in h["step_ms"].items():
            print(f"| one decoding step, {name}, batch 1 | {ms:.2f} |")
    if "train" in results:
        runs = results["train"]
        print("\nTraining, tiny preset, global batch 16\n")
        print("| processes x threads | per-device batch | repeat | samples/s (timed steps) | "
              "Trainer's samples/s | wall s (whole command) | preset built |")  # fmt: skip
        print("|---|---:|---:|---:|---:|---:|---:|")
        for r in runs:
            print(f"| {r['world_size']} x {r['threads']} | {r['per_device']} | {r['repeat']} | "
                  f"{r['samples_per_s']:.1f} | {r['trainer_samples_per_second']:.1f} | "
                  f"{r['wall_s']:.1f} | {r['built']}x |")  # fmt: skip
        one = [r for r in runs if r["procs"] == 1]
        two = [r for r in runs if r["procs"] == 2]
        mean = lambda rs: sum(r["samples_per_s"] for r in rs) / len(rs)  # noqa: E731
        print(f"\nmean samples/s: 1x2 {mean(one):.1f}, 2x1 {mean(two):.1f} "
              f"(2x1 / 1x2 = {mean(two) / mean(one):.2f})")  # fmt: skip
        for a, b in zip(one, two, strict=True):
            diffs = [abs(x - y) / y for x, y in zip(b["losses"], a["losses"], strict=True)]
            print(f"repeat {a['repeat']}: logged losses (every 10 steps) 2x1 vs 1x2: max relative "
                  f"difference {max(diffs):.3f}, first {a['losses'][0]:.3f}/{b['losses'][0]:.3f}, "
                  f"last {a['losses'][-1]:.3f}/{b['losses'][-1]:.3f}")  # fmt: skip
    if "caption" in results:
        c = results["caption"]
        ri = c["ray_init"]
        print(f"\nCaptioning {meta['images']} images, tiny preset, batch 32, "
              f"{meta['caption_tokens']} new tokens\n")  # fmt: skip
        print("| engine | wall s (whole command) | images/s end to end | first rows after s | "
              "steady images/s after first rows | captions equal to local |")  # fmt: skip
        print("|---|---:|---:|---:|---:|---:|")
        for name in ("local", "ray x1", "ray x2"):
            r = c[name]
            same = "—" if name == "local" else f"{r['same_captions']}/{r['unique_images']}"
            print(
                f"| {name} | {r['wall_s']:.1f} | {r['end_to_end_images_per_s']:.1f} | "
                f"{r['first_rows_s']:.1f} | {r['steady_images_per_s']:.1f} | {same} |"
            )
        print(f"\n`import ray` {ri['import_s']:.1f} s, `ray.init()` {ri['init_s']:.1f} s, "
              f"`ray.shutdown()` {ri['shutdown_s']:.1f} s (a fresh process)")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", default="flops,host,train,caption")
    ap.add_argument("--tokens", type=int, default=20, help="flops: new tokens per caption")
    ap.add_argument("--train_scenes", type=int, default=2000)
    ap.add_argument("--train_steps", type=int, default=150, help="timed steps after warm-up")
    ap.add_argument("--warmup", type=int, default=10, help="untimed first steps")
    ap.add_argument("--repeats", type=int, default=2, help="train: alternate 1x2 / 2x1 runs")
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--caption_tokens", type=int, default=20)
    ap.add_argument("--report", action="store_true", help="re-print the last results.json")
    ap.add_argument("--_train_child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    for k, v in ENV.items():
        os.environ.setdefault(k, v)
    if args._train_child:
        train_child(json.loads(args._train_child))
        return
    if args.report:
        report(json.loads((OUT / "results.json").read_text()))
        return
    import torch

    logging.disable(logging.WARNING)
    OUT.mkdir(parents=True, exist_ok=True)
    results: dict = {
        "meta": {
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "machine": f"{platform.machine()} {platform.node()}",
            "cpus": cores(),
            "torch": torch.__version__,
            "load_before": " ".join(f"{x:.2f}" for x in os.getloadavg()),
            "images": args.images,
            "caption_tokens": args.caption_tokens,
        }
    }
    parts = args.parts.split(",")
    if "flops" in parts:
        results["flops"] = part_flops(args)
    if "host" in parts:
        results["host"] = part_host(args)
    if "train" in parts:
        results["train"] = part_train(args)
    if "caption" in parts:
        results["caption"] = part_caption(args)
    results["meta"]["load_after"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    (OUT / "results.json").write_text(json.dumps(results, indent=2))
    report(results)


if __name__ == "__main__":
    main()
