"""How captions are decoded: the one owner of every decoding option, its default and its rules.

`DecodingOptions` is a plain dataclass. Everything that decodes takes one:
- the engine (`Captioner.caption_iter`) turns it into `model.generate` keywords;
- every CLI command that captions (caption, eval, serve) gets one flag per field, built from
  these fields (`cli.decoding_flags`), and `captioner train` parses it with `HfArgumentParser`
  beside `TrainingArguments` (it decodes the evaluation captions);
- the server validates request fields with `DecodingOptions.from_mapping`.

A new option is a new field here (type, default, help, bounds), plus its use in
`generate_kwargs` or in the engine when it needs the tokenizer. Nothing else changes.
This module must stay light (no torch): the CLI imports it to build `--help`.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from captioner.errors import CaptionerError

# Bounds: (lowest, highest, whether the lowest itself is excluded). The server takes these
# options from any caller, so each one is bounded.
BOUNDS: dict[str, tuple[float, float, bool]] = {
    "max_new_tokens": (1, 256, False),
    "num_beams": (1, 16, False),
    "top_p": (0, 1, True),
    # 1e-45 passes "> 0" and turns the logits into inf/NaN (torch.multinomial then fails):
    # the lowest temperature and penalty are ones sampling survives.
    "temperature": (0.01, 5, False),
    "num_return_sequences": (1, 16, False),
    "repetition_penalty": (0.01, 5, False),
    "min_new_tokens": (0, 256, False),
    "length_penalty": (-10, 10, False),
    "max_words": (1, 1000, False),
}
MAX_PROMPT_CHARS = 200
MAX_AFFIX_CHARS = 200  # prefix, suffix: added to every caption
# bad_words / force_words: every word becomes up to 4 tokenizer calls and a constraint checked at
# every step of generate, so one request may name only so many.
MAX_WORDS = 256
MAX_WORDS_CHARS = 4096


def _option(default: Any, help: str):
    """A field with its help text (the metadata is what HfArgumentParser hands argparse)."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class DecodingOptions:
    """Decoding options shared by captioning, evaluation, the server and training evaluation."""

    max_new_tokens: int = _option(30, "Longest caption, in tokens.")
    num_beams: int = _option(1, "Beam width (1: greedy).")
    do_sample: bool = _option(False, "Sample instead of searching (see top_p, temperature).")
    top_p: float | None = _option(None, "Nucleus sampling mass (with do_sample).")
    temperature: float | None = _option(None, "Sampling temperature (with do_sample).")
    num_return_sequences: int = _option(1, "Captions per image (a list when > 1).")
    repetition_penalty: float | None = _option(None, "> 1 discourages repeated words.")
    prompt: str | None = _option(
        None,
        'Caption prefix, e.g. "a drawing of" (kept in the output); for LLaVA models the '
        'instruction after the image (replaces the saved "Caption:").',
    )
    bad_words: list[str] = _option([], "Words never to emit (repeat, or comma-separated).")
    keep_prompt: bool = _option(True, "Keep the --prompt at the start of the caption.")
    min_new_tokens: int | None = _option(None, "Shortest caption, in tokens.")
    length_penalty: float | None = _option(None, "With beams: > 1 favours longer captions.")
    force_words: list[str] = _option(
        [], "Words every caption must contain (needs constrained beam search)."
    )
    max_words: int | None = _option(None, "Cut captions to this many words (at a word boundary).")
    prefix: str | None = _option(
        None, 'Text put before every caption, e.g. "sks, " (trigger word).'
    )
    suffix: str | None = _option(None, 'Text put after every caption, e.g. ", high quality".')

    def __post_init__(self) -> None:
        self.bad_words = _words(self.bad_words, "bad_words")
        self.force_words = _words(self.force_words, "force_words")
        for name, bounds in BOUNDS.items():
            _check_bounds(name, getattr(self, name), *bounds)
        if self.prompt is not None and len(self.prompt) > MAX_PROMPT_CHARS:
            raise CaptionerError(f"--prompt: at most {MAX_PROMPT_CHARS} characters")
        for name in ("prefix", "suffix"):
            value = getattr(self, name)
            if value is not None and len(value) > MAX_AFFIX_CHARS:
                raise CaptionerError(f"--{name}: at most {MAX_AFFIX_CHARS} characters")
        if self.min_new_tokens is not None and self.min_new_tokens > self.max_new_tokens:
            raise CaptionerError(
                f"--min_new_tokens ({self.min_new_tokens}) must be <= --max_new_tokens "
                f"({self.max_new_tokens})"
            )
        if not self.do_sample and (self.top_p is not None or self.temperature is not None):
            raise CaptionerError("--top_p / --temperature only apply with --do_sample")
        if (
            self.num_return_sequences > 1
            and not self.do_sample
            and self.num_return_sequences > self.num_beams
        ):
            raise CaptionerError(
                f"num_return_sequences={self.num_return_sequences} needs --do_sample or "
                f"--num_beams >= {self.num_return_sequences}"
            )

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> DecodingOptions:
        """Options from loose values (form fields are strings, JSON gives numbers): unknown keys
        and values of the wrong type are errors naming the option."""
        names = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(names))
        if unknown:
            raise CaptionerError(f"unknown decoding option(s): {', '.join(unknown)}")
        return cls(**{k: _coerce(names[k], v) for k, v in values.items()})

    def replace(self, **changes: Any) -> DecodingOptions:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def key(self) -> tuple:
        """Hashable: requests with equal options can share one `generate` call."""
        return tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in self.to_dict().items())

    @property
    def sequences_per_image(self) -> int:
        """Sequences `generate` keeps per image: beams, times samples when sampling."""
        return self.num_beams * (self.num_return_sequences if self.do_sample else 1)

    def generate_kwargs(self) -> dict[str, Any]:
        """`model.generate` keywords for the options that need no tokenizer (the engine adds the
        prompt and bad words, which it must tokenize)."""
        kwargs: dict[str, Any] = {
            "max_new_tokens": self.max_new_tokens,
            "num_beams": self.num_beams,
            "do_sample": self.do_sample,
            "num_return_sequences": self.num_return_sequences,
            "use_cache": True,
        }
        optional = {
            "top_p": self.top_p,
            "temperature": self.temperature,
            "repetition_penalty": self.repetition_penalty,
            "min_new_tokens": self.min_new_tokens,
            "length_penalty": self.length_penalty,
        }
        kwargs.update({k: v for k, v in optional.items() if v is not None})
        return kwargs

    def finish(self, caption: str) -> str:
        """A generated caption as the user asked for it: cut at `max_words`, then `prefix` and
        `suffix` added verbatim. (The engine drops the prompt's tokens when `keep_prompt` is
        False: only it knows which tokens they were.)"""
        if self.max_words is not None:
            caption = " ".join(caption.split()[: self.max_words])
        return f"{self.prefix or ''}{caption}{self.suffix or ''}"


class Generated(str):
    """A caption that also says how generation ended: `tokens` generated (the prompt and the end
    token not counted) and `finish_reason`, "stop" (the model ended it) or "length" (it ran
    into max_new_tokens, after any clamping). It is a str, so code that wants text needs nothing
    else; None where the producer did not count (a plain str carries neither)."""

    tokens: int | None
    finish_reason: str | None

    def __new__(
        cls, text: str, tokens: int | None = None, finish_reason: str | None = None
    ) -> Generated:
        self = super().__new__(cls, text)
        self.tokens = tokens
        self.finish_reason = finish_reason
        return self

    def __reduce__(self):  # pickles with its counts (DataLoader workers, Ray actors)
        return (type(self), (str(self), self.tokens, self.finish_reason))


def _words(items: list[str], name: str) -> list[str]:
    """Repeated and comma-separated words, as one clean list without repeats, bounded."""
    words = [w for w in (w.strip() for words in items for w in words.split(",")) if w]
    words = list(dict.fromkeys(words))
    chars = sum(len(w) for w in words)
    if len(words) > MAX_WORDS or chars > MAX_WORDS_CHARS:
        raise CaptionerError(
            f"--{name}: at most {MAX_WORDS} words and {MAX_WORDS_CHARS:,} characters in all, "
            f"got {len(words):,} words and {chars:,} characters"
        )
    return words


def option_help(name: str) -> str:
    """The help text of one option (for CLI flags and the server's schema)."""
    return next(f.metadata["help"] for f in dataclasses.fields(DecodingOptions) if f.name == name)


def field_type(f: dataclasses.Field) -> type:
    """The plain type of a field (`float | None` -> float, `list[str]` -> list)."""
    hint = typing.get_type_hints(DecodingOptions)[f.name]
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    return typing.get_origin(hint) or hint


def _check_bounds(name: str, value: Any, low: float, high: float, open_low: bool) -> None:
    if value is None:
        return
    above_low = value > low if open_low else value >= low
    if not (above_low and value <= high):  # written so that NaN fails too
        lower = ">" if open_low else ">="
        raise CaptionerError(f"--{name} must be {lower} {low} and <= {high}, got {value}")


def _coerce(f: dataclasses.Field, value: Any) -> Any:
    kind = field_type(f)
    if value is None:
        return None
    try:
        if kind is bool:
            if isinstance(value, str):
                if value.lower() not in ("true", "false", "1", "0", "yes", "no", "on", "off"):
                    raise ValueError(value)
                return value.lower() in ("true", "1", "yes", "on")
            if not isinstance(value, bool):
                raise ValueError(value)
            return value
        if kind is list:
            return [value] if isinstance(value, str) else [str(v) for v in value]
        if kind is int and (isinstance(value, bool) or isinstance(value, float)):
            raise ValueError(value)
        if kind is str and not isinstance(value, str):
            raise ValueError(value)
        return kind(value)
    except (TypeError, ValueError):
        raise CaptionerError(f"{f.name}: expected {kind.__name__}, got {value!r}") from None
