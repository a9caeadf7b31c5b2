"""The `captioner` command: a thin typer shell over the library.

Each command parses flags (spelled with underscores, as TrainingArguments spells them), calls one
library function, and turns expected failures (`CaptionerError`) into one red line and exit 1.
"""

from __future__ import annotations

import os
import sys

import typer
from rich.console import Console

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


# --- train / demo commands (issue 3) ---


# --- eval commands (issue 4) ---


# --- caption commands (issue 5) ---


# --- serve commands (issue 6) ---


def main() -> None:
    """Entry point: run the app, print expected errors as one line instead of a traceback."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        app()
    except CaptionerError as err:
        console.print(f"[bold red]error:[/] {err}")
        sys.exit(1)
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]")
        sys.exit(130)


if __name__ == "__main__":
    main()
