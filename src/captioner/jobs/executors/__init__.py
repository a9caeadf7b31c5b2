"""Executors: what turns a list of image references into captions, and nothing else.

The caption job (`jobs/caption.py`) decides what to caption and what to do with each result
(rows, sidecars, summary, resume); an executor only runs the model over `images` and yields
`(index into images, result)` as results come, in any order, where a result is a caption, a list
of `num_return_sequences` captions, or an exception with a `reason` (a bad image). It calls
`progress(n)` with the number of images done after each batch. Two exist: `local` (this process)
and `ray` (a pool of Ray actors); both load the model only once their results are asked for, so
the job writes nothing before the model has loaded.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from captioner.decoding import DecodingOptions
from captioner.options import LoadOptions

Result = str | list[str] | Exception
Results = Iterator[tuple[int, Result]]
Progress = Callable[[int], None] | None


@dataclass(frozen=True)
class Work:
    """What an executor runs: the model (a path or Hub id; a loaded `Captioner` locally), how it
    loads, how it decodes, how many images go through it at once, the sampling seed, and where
    its tower's cached features may be (executors/features.py: auto | off | a folder)."""

    model: Any
    load: LoadOptions = field(default_factory=LoadOptions)
    decoding: DecodingOptions | None = None
    batch_size: int | None = None
    seed: int | None = None
    feature_cache: str = "auto"


class ImageFailed(Exception):
    """An image's failure as an executor reports it: `reason` is what the row's error says."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
