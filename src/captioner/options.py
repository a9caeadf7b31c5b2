"""How a model is loaded: the one owner of the load options, their defaults and their rules.

`LoadOptions` is to loading what `DecodingOptions` is to decoding: `Captioner.from_pretrained`
takes one (or its fields as keywords), and every command that loads a model for captioning
(`caption`, `eval`, `serve`, `caption --engine ray`) gets one flag per field, generated from these
fields by the CLI. A new load option is a new field here plus its use in `from_pretrained`.
This module must stay light (no torch): the CLI imports it to build `--help`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from captioner.errors import CaptionerError

DTYPES = ("float32", "bfloat16")


@dataclass(frozen=True)
class LoadOptions:
    """Where and in what precision a model runs, and whether its Hub code may run."""

    device: str | None = field(
        default=None, metadata={"help": "cpu, cuda, cuda:1 ... (default: cuda if present)."}
    )
    dtype: str = field(
        default="float32",
        metadata={"help": "float32 | bfloat16 (native on AVX512-BF16/AMX CPUs): faster, inexact."},
    )
    int8: bool = field(
        default=False,
        metadata={"help": "int8 linear layers (CPU, dynamic quantization): faster, inexact."},
    )
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Allow model code from the Hub repository."}
    )

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise CaptionerError(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.int8 and self.dtype != "float32":
            raise CaptionerError(
                "--int8 quantizes float32 linear layers: use it with --dtype float32"
            )
        if self.int8 and self.device not in (None, "cpu"):
            raise CaptionerError(
                f"--int8 runs on the CPU only (torch dynamic quantization), not {self.device}"
            )

    def replace(self, **changes: Any) -> LoadOptions:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
