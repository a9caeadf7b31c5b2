"""bf16 mixed-precision *training* on the CPU against fp32, on what `captioner demo` trains
(issue 21, point 3).

    .venv/bin/python bench/bf16_train_bench.py                    # ~7 min on 2 cores (cache warm)
    .venv/bin/python bench/bf16_train_bench.py --epochs 4         # fewer epochs, same for both
    .venv/bin/python bench/bf16_train_bench.py --report_only      # table from an earlier --out

Generates the demo's 4,000 easy scenes (seed 0), then trains the `dinov2-tiny` preset twice
with `captioner train` and the demo's exact training arguments (jobs/demo.py's
DEMO_TRAINING_ARGS, test_size 0.1, max_eval_samples 100, seed 0): once in fp32, once with
`--bf16 true --use_cpu true` (transformers Trainer's CPU autocast; without --use_cpu transformers
refuses bf16 when no GPU is found). Both read the shared feature cache ($CAPTIONER_CACHE, warm
from earlier demo runs, so no run computes DINOv2 features). Each trained model is then scored
with `captioner eval` (fp32 inference) on the same 400 held-out scenes; per-attribute accuracy
is computed from eval's samples.jsonl as the demo does. Peak RSS comes from /usr/bin/time -v.
Prints markdown for bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CLI = str(ROOT / ".venv" / "bin" / "captioner")

MODES = {"fp32": [], "bf16": ["--bf16", "true", "--use_cpu", "true"]}


def run_mode(out: Path, mode: str, epochs: float) -> None:
    from captioner.jobs.demo import demo_train_flags

    cmd = [CLI, "train", *demo_train_flags(num_train_epochs=epochs), *MODES[mode]]
    cmd += ["--data", str(out / "scenes"), "--output_dir", str(out / mode)]
    info: dict = {"load_before": os.getloadavg()}
    started = time.time()
    with open(out / f"train_{mode}.log", "w") as log:
        subprocess.run(
            ["/usr/bin/time", "-v", "-o", str(out / f"time_{mode}.txt"), *cmd],
            stdout=log, stderr=subprocess.STDOUT, check=True,
        )  # fmt: skip
    info["train_wall_s"] = time.time() - started
    info["load_after"] = os.getloadavg()
    with open(out / f"eval_{mode}.log", "w") as log:
        subprocess.run(
            [CLI, "eval", str(out / mode), str(out / "scenes"), "--output_dir",
             str(out / mode / "eval")],
            stdout=log, stderr=subprocess.STDOUT, check=True,
        )  # fmt: skip
    (out / f"info_{mode}.json").write_text(json.dumps(info))
    print(f"{mode}: {info}", file=sys.stderr)


def row(out: Path, mode: str) -> dict:
    from captioner.data.scenes import attribute_accuracy

    results = json.loads((out / mode / "train_results.json").read_text())
    metrics = json.loads((out / mode / "eval" / "metrics.json").read_text())
    metrics = metrics.get("metrics", metrics)
    samples = [json.loads(line) for line in open(out / mode / "eval" / "samples.jsonl")]
    attrs = attribute_accuracy(
        [s["prediction"] for s in samples], [s["references"] for s in samples]
    )
    history = json.loads((out / mode / "trainer_state.json").read_text())["log_history"]
    eval_s = sum(h["eval_runtime"] for h in history if "eval_runtime" in h)
    # train_runtime includes the per-epoch generation evals (and checkpoint saves): without evals
    steps_only = results["train_samples"] * results["epoch"] / (results["train_runtime"] - eval_s)
    rss = None
    time_file = out / f"time_{mode}.txt"
    if time_file.exists():
        text = time_file.read_text()
        rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)[1]) / 1e6
        wall = re.search(r"Elapsed \(wall clock\) time.*: ([\d:.]+)", text)[1]
    else:
        wall = "?"
    info_file = out / f"info_{mode}.json"
    info = json.loads(info_file.read_text()) if info_file.exists() else {}
    return {
        "mode": mode,
        "samples_s": results["train_samples_per_second"],
        "train_runtime": results["train_runtime"],
        "eval_s": eval_s,
        "steps_only_samples_s": steps_only,
        "train_loss": results["train_loss"],
        "wall": wall,
        "rss_gb": rss,
        "exact_match": metrics["exact_match"],
        "wer": metrics["wer"],
        "cider": metrics["cider"],
        "n": len(samples),
        **attrs,
        **info,
    }


def table(rows: list[dict]) -> str:
    attrs = ["shape", "colour", "size", "background", "objects"]
    lines = [
        "| mode | train samples/s | without evals | train_runtime s (evals) "
        "| `captioner train` wall | peak RSS GB | train loss | exact match | WER | CIDEr-D | "
        + " / ".join(attrs)
        + " |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        rss = f"{r['rss_gb']:.2f}" if r["rss_gb"] else "?"
        acc = " / ".join(f"{r[a + '_accuracy']:.4f}" for a in attrs)
        lines.append(
            f"| {r['mode']} | {r['samples_s']:.1f} | {r['steps_only_samples_s']:.1f} "
            f"| {r['train_runtime']:.1f} ({r['eval_s']:.1f}) | {r['wall']} "
            f"| {rss} | {r['train_loss']:.4f} | {r['exact_match']:.4f} | {r['wer']:.4f} "
            f"| {r['cider']:.2f} | {acc} |"
        )
    fp32, bf16 = rows
    speedup = bf16["samples_s"] / fp32["samples_s"]
    steps_speedup = bf16["steps_only_samples_s"] / fp32["steps_only_samples_s"]
    delta = bf16["exact_match"] - fp32["exact_match"]
    met = speedup >= 1.4 and abs(delta) <= 0.01
    lines.append(
        f"\nbf16 / fp32 samples/s: **{speedup:.2f}x** ({steps_speedup:.2f}x without evals); "
        f"exact match bf16 - fp32: {delta:+.4f} "
        f"({fp32['n']} held-out scenes); target (>= 1.4x, |delta| <= 0.01): "
        f"**{'met' if met else 'not met'}**"
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(ROOT / "bench" / "out" / "bf16_train"))
    parser.add_argument("--epochs", type=float, default=8)
    parser.add_argument("--order", nargs=2, default=list(MODES), help="Which mode trains first.")
    parser.add_argument("--report_only", action="store_true")
    args = parser.parse_args()
    out = Path(args.out)
    if not args.report_only:
        os.environ.setdefault("CAPTIONER_CACHE", str(Path.home() / ".cache" / "captioner"))
        out.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [CLI, "data", "scenes", str(out / "scenes"), "--num_scenes", "4000",
             "--difficulty", "easy", "--seed", "0"],
            check=True,
        )  # fmt: skip
        for mode in args.order:
            run_mode(out, mode, args.epochs)
    print(table([row(out, mode) for mode in MODES]))


if __name__ == "__main__":
    main()
