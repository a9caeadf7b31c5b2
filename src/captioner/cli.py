"""The `captioner` command: a thin typer shell over the library.

Each command parses flags (spelled with underscores, as TrainingArguments spells them), calls one
library function, and turns expected failures (`CaptionerError`) into one red line and exit 1.
"""

from __future__ import annotations

import os
import sys

import typer
from rich.console import Console
from rich.markup import escape

from captioner.errors import CaptionerError

app = typer.Typer(
    help="Fine-tune, evaluate, run and serve image-captioning models.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
data_app = typer.Typer(help="Inspect, check and generate caption datasets.", no_args_is_help=True)
app.add_typer(data_app, name="data")
console = Console(stderr=True)


# --- data commands (issue 2) ---


@data_app.command("scenes")
def data_scenes(
    out: str = typer.Argument(..., help="Folder to write: PNGs + metadata.jsonl (captions)."),
    n: int = typer.Option(2000, "--n", help="Number of scenes."),
    seed: int = typer.Option(0, "--seed"),
    difficulty: str = typer.Option("easy", "--difficulty", help="easy | medium | hard"),
    image_size: int | None = typer.Option(
        None, "--image_size", help="Pixels a side (default: 64 easy, 96 medium, 128 hard)."
    ),
) -> None:
    """Draw the built-in scenes: shapes on backgrounds, 3-5 true captions each (offline)."""
    from captioner.scenes import generate_scenes

    path = generate_scenes(out, n=n, seed=seed, difficulty=difficulty, image_size=image_size)
    console.print(f"wrote {n} {difficulty} scenes to {path} (PNG + metadata.jsonl)")


@data_app.command("check")
def data_check(
    source: str = typer.Argument(..., help="Folder, manifest, .tar shards or Hub id."),
    image_column: str | None = typer.Option(None, "--image_column"),
    caption_column: str | None = typer.Option(None, "--caption_column"),
    max_pixels: int = typer.Option(50_000_000, "--max_pixels", help="Larger images are bad."),
) -> None:
    """List every bad example (file, reason) and a summary; exit 1 if there is any."""
    from rich.table import Table

    from captioner.data import scan_source

    scan = scan_source(source, image_column, caption_column, max_pixels=max_pixels, full=True)
    if scan.bad:
        longest = max(len(b.file) for b in scan.bad)
        table = Table(title=f"bad examples in {source}", title_justify="left")
        table.add_column("file", min_width=longest, no_wrap=True)  # never cut a file name
        table.add_column("reason")
        for bad in scan.bad:
            table.add_row(bad.file, bad.reason)
        width = longest + max(len(b.reason) for b in scan.bad) + 8
        Console(width=max(width, 80), highlight=False).print(table)
    sizes = ", ".join(f"{k} {len(v)}" for k, v in scan.splits.items())
    console.print(f"{scan.total} examples: {scan.total - len(scan.bad)} ok ({sizes}), ", end="")
    console.print(f"{len(scan.bad)} bad", style="red" if scan.bad else "green")
    if scan.bad:
        raise typer.Exit(1)


@app.command("show")
def show(
    source: str = typer.Argument(..., help="Any source `captioner data` reads."),
    n: int = typer.Option(5, "-n", "--n", help="Number of examples."),
    output: str = typer.Option("samples.png", "-o", "--output", help="PNG to write."),
    split: str = typer.Option("train", "--split"),
    image_column: str | None = typer.Option(None, "--image_column"),
    caption_column: str | None = typer.Option(None, "--caption_column"),
    on_bad_image: str = typer.Option("skip", "--on_bad_image", help="skip | fail"),
) -> None:
    """Draw the first N examples with their (first) caption, wrapped, to a PNG."""
    from captioner.data import load_captions
    from captioner.report import plot_samples

    dd = load_captions(
        source,
        image_column=image_column,
        caption_column=caption_column,
        test_size=0,  # dataset order, as stored
        on_bad_image=on_bad_image,
    )
    if split not in dd or len(dd[split]) == 0:
        raise CaptionerError(f"{source}: split '{split}' is empty")
    rows = dd[split].select(range(min(n, len(dd[split]))))
    path = plot_samples(list(rows["image"]), [c[0] for c in rows["captions"]], output)
    console.print(f"wrote {len(rows)} samples to {path}")


# --- train / demo commands (issue 3) ---


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def train(
    ctx: typer.Context,
    model: str | None = typer.Option(None, "--model", help="tiny | small | model dir | Hub id."),
    data: str | None = typer.Option(None, "--data", help="Any source `captioner data` reads."),
    output_dir: str | None = typer.Option(
        None, "--output_dir", help="Checkpoints, final model, metrics and curves go here."
    ),
    config: str | None = typer.Option(
        None, "--config", help="YAML/JSON file with the same keys as these flags (flags win)."
    ),
    resume: bool | None = typer.Option(
        None, "--resume/--no_resume", help="Continue from the newest checkpoint in output_dir."
    ),
    image_column: str | None = typer.Option(None, "--image_column", help="Default: image."),
    caption_column: str | None = typer.Option(
        None, "--caption_column", help="Default: text (a list column gives several captions)."
    ),
    test_size: float | None = typer.Option(None, "--test_size", help="Held-out fraction (0.1)."),
    seed: int | None = typer.Option(None, "--seed", help="Split, caption draw and init seed."),
    on_bad_image: str | None = typer.Option(
        None, "--on_bad_image", help="skip (default; counted) | fail"
    ),
    eval_max_samples: int | None = typer.Option(
        None, "--eval_max_samples", help="Eval captions are generated for this many examples."
    ),
    num_beams: int | None = typer.Option(None, "--num_beams", help="Decoding during eval."),
    max_new_tokens: int | None = typer.Option(
        None, "--max_new_tokens", help="Longest eval caption (30)."
    ),
    early_stopping_patience: int | None = typer.Option(
        None, "--early_stopping_patience", help="Stop after N evals without a better metric."
    ),
    pixel_cache: str | None = typer.Option(None, "--pixel_cache", help="auto | off | a folder."),
    trust_remote_code: bool | None = typer.Option(
        None, "--trust_remote_code", help="Allow model code from the Hub repository."
    ),
    # TrainingArguments, under their own names (any other one is passed through as well).
    learning_rate: float | None = typer.Option(None, "--learning_rate"),
    num_train_epochs: float | None = typer.Option(None, "--num_train_epochs"),
    max_steps: int | None = typer.Option(None, "--max_steps"),
    per_device_train_batch_size: int | None = typer.Option(None, "--per_device_train_batch_size"),
    per_device_eval_batch_size: int | None = typer.Option(None, "--per_device_eval_batch_size"),
    gradient_accumulation_steps: int | None = typer.Option(None, "--gradient_accumulation_steps"),
    warmup_steps: float | None = typer.Option(None, "--warmup_steps", help="< 1: a fraction."),
    warmup_ratio: float | None = typer.Option(None, "--warmup_ratio"),
    weight_decay: float | None = typer.Option(None, "--weight_decay"),
    lr_scheduler_type: str | None = typer.Option(None, "--lr_scheduler_type"),
    eval_strategy: str | None = typer.Option(None, "--eval_strategy", help="no | steps | epoch"),
    eval_steps: float | None = typer.Option(None, "--eval_steps"),
    save_strategy: str | None = typer.Option(None, "--save_strategy"),
    save_steps: float | None = typer.Option(None, "--save_steps"),
    save_total_limit: int | None = typer.Option(None, "--save_total_limit"),
    logging_steps: float | None = typer.Option(None, "--logging_steps"),
    load_best_model_at_end: bool | None = typer.Option(
        None, "--load_best_model_at_end/--no_load_best_model_at_end"
    ),
    metric_for_best_model: str | None = typer.Option(None, "--metric_for_best_model"),
    fp16: bool | None = typer.Option(None, "--fp16/--no_fp16"),
    bf16: bool | None = typer.Option(None, "--bf16/--no_bf16"),
    dataloader_num_workers: int | None = typer.Option(None, "--dataloader_num_workers"),
    report_to: str | None = typer.Option(None, "--report_to"),
    push_to_hub: bool | None = typer.Option(None, "--push_to_hub/--no_push_to_hub"),
    hub_model_id: str | None = typer.Option(None, "--hub_model_id"),
) -> None:
    """Fine-tune (or train a from-scratch preset) with transformers' Trainer.

    --model, --data and --output_dir are required (here or in --config). Any other
    TrainingArguments field is accepted too, under its own name (e.g. --adam_beta2 0.98).
    Evaluation generates captions and scores them; the best checkpoint is chosen by CIDEr-D.
    """
    import logging

    from captioner.train import TrainConfig, load_config_file, parse_extra_args
    from captioner.train import train as run_training

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    flags = {k: v for k, v in ctx.params.items() if k != "config" and v is not None}
    for key in ("eval_steps", "save_steps", "logging_steps"):  # 50.0 -> 50 (checkpoint-50)
        if isinstance(flags.get(key), float) and flags[key].is_integer():
            flags[key] = int(flags[key])
    values = {**(load_config_file(config) if config else {}), **parse_extra_args(ctx.args)}
    path = run_training(TrainConfig.from_dict({**values, **flags}))
    console.print(f"[green]done:[/] model, metrics and curves.png in {path}")


# --- eval commands (issue 4) ---


@app.command("eval")
def eval_command(
    model: str = typer.Argument(..., help="Model directory or Hub id."),
    data: str = typer.Argument(..., help="Dataset (any source `captioner data` accepts)."),
    split: str = typer.Option("test", "--split", help="Split to evaluate."),
    num_beams: int = typer.Option(1, "--num_beams", help="Beam width (1: greedy)."),
    max_new_tokens: int = typer.Option(30, "--max_new_tokens", help="Longest caption in tokens."),
    batch_size: int | None = typer.Option(None, "--batch_size", help="Default: automatic."),
    max_samples: int | None = typer.Option(None, "--max_samples", help="First N images only."),
    output_dir: str | None = typer.Option(
        None, "--output_dir", help="Write metrics.json, samples.jsonl and report.html here."
    ),
    compare: str | None = typer.Option(None, "--compare", help="Second model, side by side."),
    metric: list[str] = typer.Option(
        [], "--metric", help="Extra metric: teacher_forced_wer (the guide's number)."
    ),
    test_size: float | None = typer.Option(
        None, "--test_size", help="Held-out fraction (default: the model's training value, or 0.1)."
    ),
    seed: int | None = typer.Option(
        None, "--seed", help="Split seed (default: the model's training value, or 0)."
    ),
    image_column: str | None = typer.Option(None, "--image_column", help="Image column."),
    caption_column: str | None = typer.Option(None, "--caption_column", help="Caption column."),
    on_bad_image: str = typer.Option("skip", "--on_bad_image", help="skip | fail"),
    trust_remote_code: bool = typer.Option(
        False, "--trust_remote_code", help="Allow model code from the Hub repository."
    ),
) -> None:
    """Generate captions for a split and score them: BLEU-1..4, METEOR, ROUGE-L, CIDEr-D, WER.

    The split is the one the model was trained with (test_size and seed from its
    captioner_config.json) unless --test_size / --seed say otherwise.
    """
    from rich.markup import escape
    from rich.table import Table

    from captioner.evaluation import TEACHER_FORCED_NOTE, run_eval
    from captioner.report import REPORT_METRICS

    unknown = set(metric) - {"teacher_forced_wer"}
    if unknown:
        raise CaptionerError(f"unknown --metric {sorted(unknown)} (available: teacher_forced_wer)")
    results, tf = run_eval(
        model,
        data,
        split=split,
        compare=compare,
        teacher_forced="teacher_forced_wer" in metric,
        output_dir=output_dir,
        trust_remote_code=trust_remote_code,
        data_options={
            "test_size": test_size,
            "seed": seed,
            "image_column": image_column,
            "caption_column": caption_column,
            "on_bad_image": on_bad_image,
        },
        num_beams=num_beams,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        max_samples=max_samples,
    )
    table = Table(title=escape(f"{data} [{split}]"))
    table.add_column("metric")
    for r in results:
        table.add_column(escape(r.model), justify="right")
    rows = REPORT_METRICS + ([("teacher_forced_wer", "teacher-forced WER (guide)")] if tf else [])
    for key, label in rows:
        values = [r.metrics.get(key) for r in results]
        fmt = [
            f"{v:.4f}" if isinstance(v, float) else "n/a" if v is None else str(v) for v in values
        ]
        table.add_row(label, *fmt)
    Console().print(table)
    if tf:
        console.print(f"[dim]{TEACHER_FORCED_NOTE}[/]")
    if output_dir:
        console.print(f"wrote {output_dir}/metrics.json and {output_dir}/report.html")


# --- caption commands (issue 5) ---
@app.command("caption")
def caption_command(
    model: str = typer.Argument(..., help="Model directory or Hub id."),
    inputs: list[str] = typer.Argument(
        ..., help="Image files, folders (recursive), globs, http(s) URLs, or - (list on stdin)."
    ),
    output: str | None = typer.Option(
        None, "--output", "-o", help="Rows to a .jsonl or .csv file (default: JSONL on stdout)."
    ),
    sidecar: bool = typer.Option(False, "--sidecar", help="Write image.txt next to each image."),
    caption_extension: str = typer.Option(
        ".txt", "--caption_extension", help="Sidecar suffix (.txt, .caption)."
    ),
    skip_existing: bool = typer.Option(False, "--skip_existing", help="Keep existing sidecars."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace sidecars / --output."),
    resume: bool = typer.Option(False, "--resume", help="Skip images already in --output."),
    batch_size: int | None = typer.Option(None, "--batch_size", help="Default: automatic."),
    num_beams: int = typer.Option(1, "--num_beams", help="Beam width (1: greedy)."),
    max_new_tokens: int = typer.Option(30, "--max_new_tokens", help="Longest caption."),
    do_sample: bool = typer.Option(False, "--do_sample", help="Sample instead of search."),
    top_p: float | None = typer.Option(None, "--top_p", help="Nucleus sampling mass."),
    temperature: float | None = typer.Option(None, "--temperature", help="Sampling temperature."),
    num_return_sequences: int = typer.Option(
        1, "--num_return_sequences", help="Captions per image (a list)."
    ),
    repetition_penalty: float | None = typer.Option(
        None, "--repetition_penalty", help="> 1 discourages repeats."
    ),
    prompt: str | None = typer.Option(None, "--prompt", help='Caption prefix: "a drawing of".'),
    bad_words: list[str] = typer.Option(
        [], "--bad_words", help="Words never to emit (repeat, or comma-separated)."
    ),
    seed: int | None = typer.Option(None, "--seed", help="Makes --do_sample repeatable."),
    device: str | None = typer.Option(None, "--device", help="cpu, cuda, ... (default: auto)."),
    trust_remote_code: bool = typer.Option(
        False, "--trust_remote_code", help="Allow model code from the Hub repository."
    ),
    progress: bool = typer.Option(True, "--progress/--no_progress", help="Progress bar (stderr)."),
) -> None:
    """Caption images into JSONL/CSV rows {"image", "caption"} or sidecar .txt files.

    Bad images become rows with an "error" field; the exit code is 1 if any failed.
    """
    from captioner.caption import caption_files

    if seed is not None:
        import torch

        torch.manual_seed(seed)
    decoding = dict(
        batch_size=batch_size,
        num_beams=num_beams,
        max_new_tokens=max_new_tokens,
        do_sample=do_sample,
        top_p=top_p,
        temperature=temperature,
        num_return_sequences=num_return_sequences,
        repetition_penalty=repetition_penalty,
        prompt=prompt,
        bad_words=[w.strip() for words in bad_words for w in words.split(",") if w.strip()],
    )
    summary = caption_files(
        model,
        inputs,
        output=output,
        sidecar=sidecar,
        caption_extension=caption_extension,
        skip_existing=skip_existing,
        overwrite=overwrite,
        resume=resume,
        decoding=decoding,
        device=device,
        trust_remote_code=trust_remote_code,
        progress=progress,
    )
    for image, reason in summary.failed:
        console.print(f"[red]failed:[/] {image}: {reason}", highlight=False, soft_wrap=True)
    console.print(
        f"captioned {summary.captioned}, skipped {summary.skipped}, failed {len(summary.failed)}"
    )
    if summary.failed:
        raise typer.Exit(1)


# --- serve commands (issue 6) ---
@app.command()
def serve(
    model: str = typer.Argument(..., help="Model directory or Hub id (as for `caption`)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Interface to bind; 0.0.0.0 exposes it."),
    port: int = typer.Option(8000, "--port", help="TCP port."),
    max_batch_size: int = typer.Option(
        16, "--max_batch_size", help="Images per generate call; 1 = no batching."
    ),
    max_wait_ms: float = typer.Option(
        5.0,
        "--max_wait_ms",
        help="How long a batch waits for more requests (0: only what is already queued).",
    ),
    max_upload_bytes: int = typer.Option(
        10_000_000, "--max_upload_bytes", help="Per image; larger uploads get 413."
    ),
    max_pixels: int = typer.Option(
        25_000_000, "--max_pixels", help="Per image; larger (or bombs) get 422."
    ),
    api_key: str = typer.Option(
        None,
        "--api_key",
        envvar="CAPTIONER_API_KEY",
        help="Require this key in X-API-Key (or Bearer).",
    ),
    device: str = typer.Option(
        None, "--device", help="cpu, cuda, cuda:1 ... (default: cuda if present)."
    ),
    trust_remote_code: bool = typer.Option(
        False, "--trust_remote_code", help="Allow model code from the Hub."
    ),
) -> None:
    """Serve MODEL over HTTP: POST /caption, GET /health, a web page at /, API docs at /docs."""
    # Before torch loads OpenMP: idle OpenMP threads that spin steal the cores the event loop,
    # image decoding and (on a shared box) everyone else need; measured 4.7 s -> 35 ms per
    # caption on a loaded 2-core machine.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    try:
        import uvicorn

        from captioner.serve import create_app
    except ImportError as err:
        from rich.markup import escape  # "[serve]" would otherwise be read as rich markup

        msg = f"`captioner serve` needs the serve extra ({err.name} is missing): "
        console.print("[bold red]error:[/] " + escape(msg + "pip install 'captioner[serve]'"))
        raise typer.Exit(1) from None
    from captioner.generate import Captioner

    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        console.print(f"[yellow]warning:[/] listening on {host} without --api_key")
    captioner = Captioner.from_pretrained(model, device=device, trust_remote_code=trust_remote_code)
    web = create_app(
        captioner,
        max_batch_size=max_batch_size,
        max_wait_ms=max_wait_ms,
        max_upload_bytes=max_upload_bytes,
        max_pixels=max_pixels,
        api_key=api_key,
        model_name=model,
    )
    console.print(f"serving [bold]{model}[/] at http://{host}:{port}/  (API docs: /docs)")
    uvicorn.run(web, host=host, port=port, log_level="warning")


@app.command()
def push(
    model_dir: str = typer.Argument(..., help="A trained model directory (`--output_dir`)."),
    hub_model_id: str = typer.Option(..., "--hub_model_id", help="Repository: you/name."),
    private: bool = typer.Option(False, "--private", help="Create the repository private."),
) -> None:
    """Upload a trained model to the Hugging Face Hub (log in first: `hf auth login`).

    Checkpoints are left out; the repository then loads with plain
    AutoModelForCausalLM / AutoProcessor.from_pretrained("you/name").
    """
    from captioner.models import push_to_hub

    console.print(f"pushed: {push_to_hub(model_dir, hub_model_id, private=private)}")


# --- demo (lead) ---
@app.command()
def demo(
    output_dir: str = typer.Option(
        "runs/demo", "--output_dir", help="Where everything is written."
    ),
    num_scenes: int = typer.Option(4000, "--num_scenes", help="Scenes to generate (train + test)."),
    difficulty: str = typer.Option(
        "easy", "--difficulty", help="Scene setting: easy, medium or hard."
    ),
    preset: str = typer.Option(
        "tiny", "--preset", help="From-scratch model preset: tiny or small."
    ),
    num_train_epochs: float = typer.Option(
        None, "--num_train_epochs", help="Override the demo's epoch count."
    ),
    seed: int = typer.Option(0, "--seed", help="Seed for scenes, split and training."),
) -> None:
    """Generate scenes, train a from-scratch model, evaluate, caption and report.

    The built-in end-to-end job, offline: about 10 minutes on 2 CPU cores. Prints the model's
    WER next to the best constant caption's, and where every output is.
    """
    from rich.table import Table

    from captioner.demo import DemoConfig, run_demo

    config = DemoConfig(
        output_dir=output_dir,
        num_scenes=num_scenes,
        difficulty=difficulty,
        preset=preset,
        seed=seed,
    )
    if num_train_epochs is not None:
        config.training_args["num_train_epochs"] = num_train_epochs
    out = Console()
    summary = run_demo(config, console=out)
    table = Table(title="held-out scenes")
    table.add_column("metric")
    table.add_column("model", justify="right")
    table.add_column("best constant caption", justify="right")
    table.add_row(
        "WER (closest reference)", f"{summary['wer']:.3f}", f"{summary['constant_caption_wer']:.3f}"
    )
    table.add_row("CIDEr-D", f"{summary['cider']:.3f}", f"{summary['constant_caption_cider']:.3f}")
    for key in ("bleu_4", "meteor", "rouge_l", "exact_match"):
        table.add_row(key, f"{summary[key]:.3f}", "")
    out.print(table)
    out.print(f"constant caption: [italic]{summary['constant_caption']}[/]")
    for s in summary["samples"]:
        out.print(f"  {s['caption']!r:45} reference: {s['references'][0]!r}", soft_wrap=True)
    root = config.output_dir
    out.print(
        f"\nmodel      {root}/model  (AutoModelForCausalLM / AutoProcessor.from_pretrained)\n"
        f"report     {root}/report.html\nsamples    {root}/samples.png\n"
        f"curves     {root}/model/curves.png\nmetrics    {root}/metrics.json\n"
        f"time       {summary['total_minutes']} min",
        soft_wrap=True,
    )
    out.print(
        f"WER {summary['wer']:.3f} = {summary['wer_vs_constant']:.2f} x the best constant "
        f"caption's {summary['constant_caption_wer']:.3f}",
        soft_wrap=True,
    )


def main() -> None:
    """Entry point: run the app, print expected errors as one line instead of a traceback."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        app()
    except CaptionerError as err:
        console.print(f"[bold red]error:[/] {escape(str(err))}", soft_wrap=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
