"""The `captioner` command: a thin typer shell over the library and the jobs.

Each command parses flags, calls one library function or job, and turns expected failures
(`CaptionerError`, and click's usage errors) into one red line and a non-zero exit. Flags are
spelled with underscores, as TrainingArguments spells them. The decoding flags and the data flags
are generated from their dataclasses (`DecodingOptions`, `DataArguments`), so every command names
an idea the same way and a new option appears everywhere at once.

The modules that import torch (the engine, training, the jobs, the server) are imported inside
the command that uses them: `captioner --help` must not pay torch's seconds-long import (a test
checks that it does not). Process-wide settings (torch threads, logging, OpenMP waiting) are made
here, by the entry points, never by the library.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import logging
import os
import sys
import types
import typing
from collections.abc import Callable
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from captioner.data.sources import DataArguments
from captioner.decoding import DecodingOptions
from captioner.errors import CaptionerError
from captioner.jobs.caption import CaptionOptions
from captioner.options import LoadOptions
from captioner.serve.settings import ServerSettings

app = typer.Typer(
    help="Fine-tune, evaluate, run and serve image-captioning models.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
data_app = typer.Typer(help="Inspect, check and generate caption datasets.", no_args_is_help=True)
app.add_typer(data_app, name="data")
parts_app = typer.Typer(
    help="Pretrained parts shipped inside registry packages, as transformers folders.",
    no_args_is_help=True,
)
app.add_typer(parts_app, name="parts")
console = Console(stderr=True)

# The data options every dataset-reading command takes (train takes them through its parser).
DATA_FLAGS = ("image_column", "caption_column", "test_size", "on_bad_image", "max_pixels")
# Server settings the app fills from the model it serves, not flags.
APP_FILLED = ("model_name", "device")
# What `review` shares with `serve` (its page is a server too) and with the model loaders.
REVIEW_SERVER_FLAGS = ("api_key", "allowed_hosts")
REVIEW_LOAD_FLAGS = ("device", "trust_remote_code")


def dataclass_flags(
    cls: type,
    param: str,
    *,
    only: tuple[str, ...] | None = None,
    exclude: tuple[str, ...] = (),
    unset: bool = False,
) -> Callable[[Callable], Callable]:
    """Decorator: one typer option per field of dataclass `cls` (name, type, default and help
    from the field), collected into an instance of `cls` passed to the command as `param`.

    A field's metadata may also give `flags` (more names, e.g. `-o`) and `envvar`. A list or
    tuple field is a repeatable option (a tuple field gets a tuple; none given: its default).
    A bool that defaults to True gets an off switch `--no_NAME`. `only`/`exclude` pick fields
    (e.g. those the app fills itself). With `unset=True` every option defaults to None and the
    command receives a dict of the options the user gave (for commands whose defaults come from
    elsewhere, e.g. a saved model).
    """
    hints = typing.get_type_hints(cls)
    fields = [
        f
        for f in dataclasses.fields(cls)
        if (only is None or f.name in only) and f.name not in exclude
    ]

    def decorate(fn: Callable) -> Callable:
        signature = inspect.signature(fn)
        params = [p for p in signature.parameters.values() if p.name != param]
        annotations = {k: v for k, v in fn.__annotations__.items() if k != param}
        for f in fields:
            kind = _plain_type(hints[f.name])
            default = None if unset else _field_default(f)
            annotation: Any = list[str] if kind in (list, tuple) else kind | None
            if kind is tuple:  # typer wants a list; the command gets the field's own type
                default = None if default is None else list(default)
            if kind is bool and not unset:
                annotation = bool
            names = [f"--{f.name}", *f.metadata.get("flags", ())]
            if kind is bool and default is True:  # a flag that is on: it needs an off switch
                names[0] = f"--{f.name}/--no_{f.name}"
            option = typer.Option(
                default, *names, help=f.metadata.get("help"), envvar=f.metadata.get("envvar")
            )
            params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=option))
            annotations[f.name] = annotation

        @functools.wraps(fn)
        def command(*args: Any, **kwargs: Any) -> Any:
            values = {f.name: _value(f, hints[f.name], kwargs.pop(f.name)) for f in fields}
            if unset:
                kwargs[param] = {k: v for k, v in values.items() if v not in (None, [], ())}
            else:
                kwargs[param] = cls(**values)
            return fn(*args, **kwargs)

        command.__signature__ = signature.replace(parameters=params)  # type: ignore[attr-defined]
        command.__annotations__ = annotations
        return command

    return decorate


def _value(f: dataclasses.Field, hint: Any, given: Any) -> Any:
    if _plain_type(hint) is tuple:  # a repeatable option given no times: the field's default
        return tuple(given) if given else _field_default(f)
    return given


def _plain_type(hint: Any) -> type:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    return typing.get_origin(hint) or hint


def _field_default(f: dataclasses.Field) -> Any:
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


def _data_args(source: str, given: dict[str, Any]) -> DataArguments:
    return DataArguments(data=source, **given)


def _logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")


# --- data ---


@data_app.command("scenes")
def data_scenes(
    out: str = typer.Argument(..., help="Folder to write: PNGs + metadata.jsonl (captions)."),
    num_scenes: int = typer.Option(2000, "--num_scenes", help="Number of scenes."),
    seed: int = typer.Option(0, "--seed", help="Same seed, same scenes."),
    difficulty: str = typer.Option("easy", "--difficulty", help="easy | medium | hard"),
    image_size: int | None = typer.Option(
        None, "--image_size", help="Pixels a side (default: 64 easy, 96 medium, 128 hard)."
    ),
) -> None:
    """Draw the built-in scenes: shapes on backgrounds, 3-5 true captions each (offline)."""
    from captioner.data.scenes import generate_scenes

    path = generate_scenes(
        out, n=num_scenes, seed=seed, difficulty=difficulty, image_size=image_size
    )
    console.print(f"wrote {num_scenes} {difficulty} scenes to {path} (PNG + metadata.jsonl)")


@data_app.command("check")
@dataclass_flags(DataArguments, "data_options", only=DATA_FLAGS, unset=True)
def data_check(
    source: str = typer.Argument(..., help="Folder, manifest, .tar shards or Hub id."),
    seed: int = typer.Option(0, "--seed", help="Split seed (as for train)."),
    near_threshold: int = typer.Option(
        6, "--near_threshold", help="Near-duplicates: pHash bits that may differ (-1: off)."
    ),
    max_caption_words: int | None = typer.Option(
        None, "--max_caption_words", help="Also report captions longer than this."
    ),
    fix: str | None = typer.Option(
        None,
        "--fix",
        help="Write a cleaned manifest (.csv/.jsonl) here: one image per group of copies, "
        "empty/overlong captions dropped. The originals are not touched.",
    ),
    data_options: dict = None,  # type: ignore[assignment]
) -> None:
    """List every bad example, duplicate, near-duplicate, train/test leak and caption problem by
    file (train/test as `train` splits it: same --test_size and --seed); exit 1 if there is any."""
    from captioner.data.hygiene import check_hygiene, write_clean_manifest
    from captioner.data.sources import scan_source

    args = _data_args(source, data_options)
    scan = scan_source(
        source, args.image_column, args.caption_column, max_pixels=args.max_pixels, full=True
    )
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
    report = check_hygiene(
        source,
        near_threshold=near_threshold if near_threshold >= 0 else None,
        max_caption_words=max_caption_words,
        test_size=args.test_size,
        seed=seed,
        image_column=args.image_column,
        caption_column=args.caption_column,
        max_pixels=args.max_pixels,
    )
    if report.findings:
        rows = report.rows()
        longest = max(len(line) for _, files, _ in rows for line in files.splitlines())
        table = Table(title=f"data hygiene in {source}", title_justify="left")
        table.add_column("finding")
        table.add_column("files [split]", min_width=longest, no_wrap=True)
        table.add_column("detail")
        for kind, files, detail in rows:
            table.add_row(kind, escape(files), escape(detail))
        Console(width=max(longest + 60, 80), highlight=False).print(table)
    console.print(report.summary(), style="red" if report.problems else "green")
    if fix:
        written = write_clean_manifest(report, fix)
        copied = f"; images copied to {written.copied_to}" if written.copied_to else ""
        console.print(
            f"wrote {written.rows} rows to {written.path} ({len(written.dropped)} images left "
            f"out{copied})"
        )
    if scan.bad or report.problems:
        raise typer.Exit(1)


@app.command("show")
@dataclass_flags(DataArguments, "data_options", only=DATA_FLAGS, unset=True)
def show(
    source: str = typer.Argument(..., help="Any source `captioner data` reads."),
    num_samples: int = typer.Option(5, "-n", "--num_samples", help="Number of examples."),
    output: str = typer.Option("samples.png", "-o", "--output", help="PNG to write."),
    split: str = typer.Option("train", "--split", help="train | test"),
    seed: int = typer.Option(0, "--seed", help="Split seed (as for train)."),
    data_options: dict = None,  # type: ignore[assignment]
) -> None:
    """Draw the first N examples with their (first) caption, wrapped, to a PNG.

    Without --test_size the rows are shown in stored order (the whole set is `train`)."""
    from captioner.evaluation.report import plot_samples

    dd = _data_args(source, {"test_size": 0, **data_options}).load(seed)
    if split not in dd or len(dd[split]) == 0:
        raise CaptionerError(f"{source}: split '{split}' is empty")
    rows = dd[split].select(range(min(num_samples, len(dd[split]))))
    path = plot_samples(list(rows["image"]), [c[0] for c in rows["captions"]], output)
    console.print(f"wrote {len(rows)} samples to {path}")


# --- parts ---


@parts_app.command("list")
def parts_list() -> None:
    """The parts `parts get` can convert, and whether each is installed and converted."""
    from captioner.models.parts import list_parts, part_status

    table = Table(title="pretrained parts (use as --model vision=NAME or text=NAME)")
    for column in ("name", "package", "licence", "status", "what"):
        table.add_column(column)
    for part in list_parts():
        table.add_row(part.name, part.package, part.licence, part_status(part), part.description)
    Console().print(table)


@parts_app.command("get")
def parts_get(
    name: str = typer.Argument(..., help="A part from `captioner parts list`."),
    out: str | None = typer.Argument(None, help="Also copy the converted folder here (new)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty OUT."),
) -> None:
    """Convert a part once into the cache ($CAPTIONER_CACHE/parts) and print its folder."""
    from captioner.models.parts import copy_part, get_part

    _logging()
    folder = get_part(name) if out is None else copy_part(name, out, overwrite=overwrite)
    typer.echo(str(folder))


# --- models ---


@app.command("models")
def models_command() -> None:
    """The model families captioner trains, captions and serves, and what each supports.

    `train --model`, `caption`, `eval` and `serve` take a Hub id or folder of any of them.
    """
    from captioner.models.families import FAMILIES

    out = Console(soft_wrap=False)
    for family in FAMILIES:
        row = family.describe()
        out.print(f"[bold]{row['family']}[/]  ({row['class']})", highlight=False)
        out.print(f"  prompted by   {escape(row['prompting'])}", highlight=False)
        if family.default_prompt:
            out.print(f"  prompt        {escape(repr(family.default_prompt))}", highlight=False)
        out.print(
            f"  LoRA {_yes(row['lora'])} · feature cache {_yes(row['feature_cache'])} · "
            f"ONNX export {_yes(row['onnx'])}",
            highlight=False,
        )
        if family.hub_examples:
            out.print(f"  e.g.          {', '.join(family.hub_examples)}", highlight=False)
    out.print(
        "chat: any other AutoModelForImageTextToText model whose processor has a chat template",
        highlight=False,
    )


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


# --- train ---

TRAIN_CONTEXT = {"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []}


@app.command(context_settings=TRAIN_CONTEXT, add_help_option=False)
def train(ctx: typer.Context) -> None:
    """Fine-tune (or train a from-scratch preset) with transformers' Trainer.

    Every TrainingArguments field is a flag under its own name; `captioner train --help` lists
    them all with captioner's own options (--model, --data, decoding of eval captions, ...).
    """
    import torch

    from captioner.training.arguments import parse_train_args
    from captioner.training.trainer import train as run_training

    model_args, data_args, decoding, training_args = parse_train_args(ctx.args)
    _logging()
    if not torch.cuda.is_available():  # the cores, shared by the processes of this machine
        local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // local_processes))
    path = run_training(model_args, data_args, training_args, decoding)
    console.print(f"[green]done:[/] model, metrics and curves.png in {path}")


# --- eval ---


@app.command("eval")
@dataclass_flags(DecodingOptions, "decoding")
@dataclass_flags(LoadOptions, "load")
@dataclass_flags(DataArguments, "data_options", only=(*DATA_FLAGS, "max_eval_samples"), unset=True)
def eval_command(
    model: str = typer.Argument(..., help="Model directory or Hub id."),
    source: str = typer.Argument(..., help="Dataset (any source `captioner data` reads)."),
    split: str = typer.Option(
        "test", "--split", help="test | train | all (every row of every split, e.g. a test folder)."
    ),
    seed: int | None = typer.Option(
        None, "--seed", help="Split seed (default: the model's training value, or 0)."
    ),
    batch_size: int | None = typer.Option(None, "--batch_size", help="Default: automatic."),
    output_dir: str | None = typer.Option(
        None, "--output_dir", help="Write metrics.json, samples.jsonl and report.html here."
    ),
    compare: str | None = typer.Option(None, "--compare", help="Second model, side by side."),
    metric: list[str] = typer.Option(
        [], "--metric", help="Extra metric: teacher_forced_wer (the guide's number)."
    ),
    feature_cache: str = typer.Option(
        "auto",
        "--feature_cache",
        help="Cached vision-tower outputs of these images (captioner train fills them): auto "
        "(the model's own cache, if it has one) | off | a feature-cache folder.",
    ),
    decoding: DecodingOptions = None,  # type: ignore[assignment]
    load: LoadOptions = None,  # type: ignore[assignment]
    data_options: dict = None,  # type: ignore[assignment]
) -> None:
    """Generate captions for a split and score them: BLEU-1..4, METEOR, ROUGE-L, CIDEr-D, WER.

    The split is the one the model was trained with (test_size, seed and columns from its
    captioner_config.json) unless the data flags say otherwise.
    """
    from captioner.evaluation.evaluate import TEACHER_FORCED_NOTE
    from captioner.evaluation.report import REPORT_METRICS
    from captioner.jobs.evaluate import EvalJob, run_eval

    unknown = set(metric) - {"teacher_forced_wer"}
    if unknown:
        raise CaptionerError(f"unknown --metric {sorted(unknown)} (available: teacher_forced_wer)")
    job = EvalJob(
        model=model,
        data=source,
        data_options={**data_options, "seed": seed},
        split=split,
        compare=compare,
        teacher_forced="teacher_forced_wer" in metric,
        output_dir=output_dir,
        decoding=decoding,
        batch_size=batch_size,
        load=load,
        feature_cache=feature_cache,
    )
    results, teacher_forced = run_eval(job)
    table = Table(title=escape(f"{source} [{split}]"))
    table.add_column("metric")
    for r in results:
        table.add_column(escape(r.model), justify="right")
    tf_row = [("teacher_forced_wer", "teacher-forced WER (guide)")] if teacher_forced else []
    for key, label in REPORT_METRICS + tf_row:
        values = [r.metrics.get(key) for r in results]
        table.add_row(label, *(_fmt(v) for v in values))
    Console().print(table)
    if teacher_forced:
        console.print(f"[dim]{TEACHER_FORCED_NOTE}[/]")
    if output_dir:
        console.print(f"wrote {output_dir}/metrics.json and {output_dir}/report.html")


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return "n/a" if value is None else str(value)


# --- caption ---


@app.command("caption")
@dataclass_flags(DecodingOptions, "decoding")
@dataclass_flags(LoadOptions, "load")
@dataclass_flags(CaptionOptions, "options")
def caption_command(
    model: str = typer.Argument(..., help="Model directory or Hub id."),
    inputs: list[str] = typer.Argument(
        ...,
        help="Image files, folders (recursive), globs, http(s) URLs, - (a list on stdin), "
        "@list.txt (a list in a file), or a Parquet/JSONL manifest with an image column.",
    ),
    options: CaptionOptions = None,  # type: ignore[assignment]
    load: LoadOptions = None,  # type: ignore[assignment]
    decoding: DecodingOptions = None,  # type: ignore[assignment]
) -> None:
    """Caption images into JSONL/CSV rows {"image", "caption"}, shards or sidecar .txt files.

    Bad images become rows with an "error" field; the exit code is 1 if any failed.
    --engine ray runs the model on Ray actors; every other flag means the same on both.
    """
    from captioner.jobs.caption import CaptionJob, run_caption

    summary = run_caption(CaptionJob(model, list(inputs), options, decoding, load))
    _print_caption_summary(summary)


def _print_caption_summary(summary) -> None:
    for note in summary.notes:
        console.print(f"[yellow]note:[/] {escape(note)}", highlight=False, soft_wrap=True)
    for image, reason in summary.failed:
        console.print(
            f"[red]failed:[/] {escape(image)}: {escape(reason)}", highlight=False, soft_wrap=True
        )
    console.print(
        f"captioned {summary.captioned}, skipped {summary.skipped}, failed {len(summary.failed)}"
    )
    if summary.failed:
        raise typer.Exit(1)


# --- review ---


@app.command()
@dataclass_flags(DataArguments, "columns", only=("image_column", "caption_column"), unset=True)
@dataclass_flags(ServerSettings, "server", only=REVIEW_SERVER_FLAGS)
@dataclass_flags(LoadOptions, "load", only=REVIEW_LOAD_FLAGS)
def review(
    source: str = typer.Argument(
        ...,
        help="Dataset: folder (+ .txt sidecars or metadata.jsonl), CSV/TSV/JSONL manifest; Hub "
        "ids, parquet, save_to_disk and .tar shards open read-only.",
    ),
    model: str | None = typer.Option(
        None, "--model", help="Caption images on the page with this model (as for `caption`)."
    ),
    host: str = typer.Option("127.0.0.1", "--host", help="Interface to bind; 0.0.0.0 exposes it."),
    port: int = typer.Option(8765, "--port", help="TCP port."),
    export_to: str | None = typer.Option(
        None,
        "--export_to",
        help="Where Export writes a read-only source as an editable folder "
        "(default: ./NAME-editable).",
    ),
    server: ServerSettings = None,  # type: ignore[assignment]
    load: LoadOptions = None,  # type: ignore[assignment]
    columns: dict = None,  # type: ignore[assignment]
) -> None:
    """Browse, search, check and edit SOURCE's captions on one page; saves go back where each
    caption came from, with backups under .captioner-backup/ (--api_key: also the page's key
    box)."""
    try:
        from captioner.serve.review import run_review
    except ImportError as err:
        raise CaptionerError(
            f"`captioner review` needs the serve extra ({err.name} is missing): "
            "pip install 'captioner[serve]'"
        ) from None
    _logging()
    hosts = list(server.allowed_hosts) if server.allowed_hosts is not None else None
    run_review(
        source, model=model, host=host, port=port, api_key=server.api_key, allowed_hosts=hosts,
        image_column=columns.get("image_column"), caption_column=columns.get("caption_column"),
        export_to=export_to,
        device=load.device, trust_remote_code=load.trust_remote_code,
        say=lambda line: console.print(line, markup=False, highlight=False),
    )  # fmt: skip


# --- serve ---


@app.command()
@dataclass_flags(ServerSettings, "settings", exclude=APP_FILLED)
@dataclass_flags(LoadOptions, "load")
def serve(
    model: str = typer.Argument(..., help="Model directory or Hub id (as for `caption`)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Interface to bind; 0.0.0.0 exposes it."),
    port: int = typer.Option(8000, "--port", help="TCP port."),
    settings: ServerSettings = None,  # type: ignore[assignment]
    load: LoadOptions = None,  # type: ignore[assignment]
) -> None:
    """Serve MODEL over HTTP: POST /caption, GET /health, a web page at /, API docs at /docs."""
    try:
        import uvicorn

        from captioner.serve.app import create_app, default_allowed_hosts, uvicorn_options
    except ImportError as err:
        raise CaptionerError(
            f"`captioner serve` needs the serve extra ({err.name} is missing): "
            "pip install 'captioner[serve]'"
        ) from None
    from captioner.engine import Captioner

    # the settings were checked when the flags became a ServerSettings: before the model loads
    if host not in ("127.0.0.1", "localhost", "::1") and not settings.api_key:
        console.print(f"[yellow]warning:[/] listening on {host} without --api_key")
    settings = settings.replace(
        model_name=model, allowed_hosts=settings.allowed_hosts or default_allowed_hosts(host)
    )
    captioner = Captioner.from_pretrained(model, load)
    console.print(f"serving [bold]{model}[/] at http://{host}:{port}/  (API docs: /docs)")
    uvicorn.run(
        create_app(captioner, settings),
        host=host,
        port=port,
        log_level="warning",
        **uvicorn_options(),
    )


# --- push ---


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
    from captioner.hub import push_to_hub

    console.print(f"pushed: {push_to_hub(model_dir, hub_model_id, private=private)}")


# --- export ---


@app.command()
def export(
    model: str = typer.Argument(..., help="A model folder to export."),
    out: str = typer.Argument(..., help="Folder for the ONNX graphs and the processor."),
    format: str = typer.Option("onnx", "--format", help="onnx (the only format)."),
    int8: bool = typer.Option(
        False,
        "--int8",
        help="Quantize weights to int8 per channel (logits layer kept float32); keeps small "
        "decoders' captions, not LLMs' (see bench/RESULTS.md).",
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing OUT."),
) -> None:
    """Export for onnxruntime; `captioner caption OUT ...` then runs it (greedy or sampling).

    GIT, VisionEncoderDecoder, LLaVA, BLIP-2 and chat models export (a vision graph run once per
    image, a text decoder with a KV cache); others are refused with the reason."""
    from captioner.models.export import export_onnx

    if format != "onnx":
        raise CaptionerError(f"--format {format!r}: only onnx is supported")
    console.print(f"exported to {export_onnx(model, out, int8=int8, overwrite=overwrite)}")


# --- merge ---


@app.command()
def merge(
    adapter_dir: str = typer.Argument(..., help="A LoRA training output (adapter_config.json)."),
    out: str = typer.Argument(..., help="Folder for the merged, plain transformers model."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty OUT."),
) -> None:
    """Fold a LoRA adapter into its base model: a plain folder that needs neither peft nor
    captioner (caption, eval and serve also take the adapter folder itself)."""
    from captioner.models.build import merge_adapter

    console.print(f"merged model in {merge_adapter(adapter_dir, out, overwrite=overwrite)}")


# --- demo ---


@app.command()
def demo(
    output_dir: str = typer.Option("runs/demo", "--output_dir", help="Where everything goes."),
    num_scenes: int = typer.Option(4000, "--num_scenes", help="Scenes to generate (train + test)."),
    difficulty: str = typer.Option("easy", "--difficulty", help="easy | medium | hard"),
    model: str = typer.Option(
        "dinov2-tiny", "--model", help="What to train (as for train --model; tiny: from scratch)."
    ),
    num_train_epochs: float | None = typer.Option(
        None, "--num_train_epochs", help="Override the demo's epoch count."
    ),
    seed: int = typer.Option(0, "--seed", help="Seed for scenes, split and training."),
) -> None:
    """Generate scenes, fine-tune a pretrained composition, evaluate, caption and report, offline.

    Prints exact match, per-attribute accuracy and COCO scores next to the best constant
    caption's, and where every output is.
    """
    import torch

    from captioner.jobs.demo import DemoConfig, run_demo

    _logging()
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    config = DemoConfig(
        output_dir=output_dir,
        num_scenes=num_scenes,
        difficulty=difficulty,
        model=model,
        seed=seed,
    )
    if num_train_epochs is not None:
        config.training_args["num_train_epochs"] = num_train_epochs
    out = Console()
    summary = run_demo(config, say=out.print)
    _print_demo_summary(out, summary, config.output_dir)


def _print_demo_summary(out: Console, summary: dict[str, Any], root: str) -> None:
    table = Table(title="held-out scenes")
    table.add_column("metric")
    table.add_column("model", justify="right")
    table.add_column("best constant caption", justify="right")
    table.add_row(
        "WER (closest reference)", f"{summary['wer']:.3f}", f"{summary['constant_caption_wer']:.3f}"
    )
    table.add_row("CIDEr-D", f"{summary['cider']:.3f}", f"{summary['constant_caption_cider']:.3f}")
    table.add_row(
        "exact match", _fmt(summary["exact_match"]), _fmt(summary["constant_caption_exact_match"])
    )
    for key in ("shape", "colour", "size", "background", "objects"):
        table.add_row(f"{key} right", _fmt(summary.get(f"{key}_accuracy")), "")
    for key in ("bleu_4", "meteor", "rouge_l"):
        table.add_row(key, _fmt(summary.get(key)), "")
    out.print(table)
    out.print(f"constant caption: [italic]{escape(summary['constant_caption'])}[/]")
    for s in summary["samples"]:
        out.print(f"  {s['caption']!r:45} reference: {s['references'][0]!r}", soft_wrap=True)
    out.print(
        f"\nmodel      {root}/model  (loads with plain transformers from_pretrained)\n"
        f"report     {root}/report.html\nsamples    {root}/samples.png\n"
        f"curves     {root}/model/curves.png\nmetrics    {root}/metrics.json\n"
        f"time       {summary['total_minutes']} min",
        soft_wrap=True,
    )


def main() -> None:
    """Entry point: run the app; expected errors are one line, never a traceback."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Before torch loads OpenMP: threads that spin while idle starve the event loop, the image
    # loader and anything else on the machine. Measured on a shared 2-core box: decoder training
    # 11-15 samples/s spinning vs 146-161 passive; a caption 4.7 s vs 35 ms. Set it to ACTIVE
    # yourself on a dedicated machine.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    try:
        code = app(standalone_mode=False)
    except CaptionerError as err:
        console.print(f"[bold red]error:[/] {escape(str(err))}", soft_wrap=True, highlight=False)
        sys.exit(1)
    except typer.Abort:
        console.print("aborted")
        sys.exit(130)
    except typer.TyperException as err:  # click's usage errors: its message, on one line
        if type(err).__name__ == "NoArgsIsHelpError":  # `captioner` alone: the help, exit 0
            typer.echo(err.ctx.get_help())
            sys.exit(0)
        message = " ".join(err.format_message().split())
        console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
        sys.exit(err.exit_code)
    sys.exit(code or 0)


if __name__ == "__main__":
    main()
