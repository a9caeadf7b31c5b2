"""Training augmentations that keep what the caption says (issue 18, part 4).

A caption claims colours, a category and a name; an augmentation may change only what no
caption of the image mentions:

- `crop`: a random resized crop keeping 70-100 % of the area (the object stays in view);
- `shrink`: the whole image at 65-95 % of its side, placed at random on its own border colour
  (another artist's margins and placement: a decoder trained on one layout misreads a drawing
  moved by a few pixels). With `crop` too, each view takes one of the two;
- `blur`: Gaussian blur, radius 0.3-1.5 px (another artist's line weight, a smaller source);
- `posterize`: 3-5 bits per channel (flat-shaded styles keep their hues);
- `grayscale`: only when no caption names a colour (COLOUR_WORDS): "a red star" stays red;
- `flip`: horizontal, only when no caption has a direction word (DIRECTION_WORDS: left/right,
  and icon words such as next/previous/forward/back/undo/redo that a mirror image reverses).
  Off by default: a text list cannot know every direction a drawing implies.

With a frozen, cached vision tower an augmented image needs its own features: the feature cache
stores `views` augmented copies per training image (view 0 is the image itself), built once, and
the collator draws one view per image and epoch (features.py, collate.py). Each view is fixed by
(image hash, view number, the ops allowed for its captions), so a rerun reuses the cache.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFilter, ImageOps

from captioner.data.scenes import COLOURS
from captioner.errors import CaptionerError

OPS = ("crop", "shrink", "blur", "posterize", "grayscale", "flip")
DEFAULT_OPS = "crop,blur,posterize,grayscale"
# Every colour the scenes use, and the usual others (both spellings of grey).
COLOUR_WORDS = frozenset(COLOURS) | {
    "gray", "grey", "pink", "brown", "cyan", "magenta", "violet", "indigo", "teal", "turquoise",
    "beige", "gold", "golden", "silver", "maroon", "navy", "olive", "lime", "amber", "colour",
    "color", "colours", "colors", "colored", "coloured", "dark", "light",
}  # fmt: skip
DIRECTION_WORDS = frozenset({
    "left", "right", "leftward", "rightward", "ltr", "rtl", "east", "west", "next", "previous",
    "prev", "forward", "forwards", "back", "backward", "backwards", "undo", "redo", "rewind",
    "clockwise", "anticlockwise", "counterclockwise",
})  # fmt: skip
_WORD = re.compile(r"[a-z]+")


def _words(captions: Iterable[str]) -> set[str]:
    return {w for c in captions for w in _WORD.findall(c.lower())}


def names_colour(captions: Iterable[str]) -> bool:
    """Whether any caption names a colour (then no view may be grayscale)."""
    return bool(_words(captions) & COLOUR_WORDS)


def names_direction(captions: Iterable[str]) -> bool:
    """Whether any caption has a left/right word (then no view may be mirrored)."""
    return bool(_words(captions) & DIRECTION_WORDS)


@dataclass(frozen=True)
class Augmenter:
    """Caption-preserving augmentations; `ops` is a subset of OPS."""

    ops: tuple[str, ...] = tuple(DEFAULT_OPS.split(","))

    @classmethod
    def parse(cls, text: str) -> Augmenter:
        ops = tuple(o.strip() for o in text.split(",") if o.strip())
        unknown = sorted(set(ops) - set(OPS))
        if unknown:
            raise CaptionerError(
                f"--augment: unknown op(s) {', '.join(unknown)} (choose from {', '.join(OPS)})"
            )
        return cls(ops)

    def allowed(self, captions: Sequence[str]) -> tuple[str, ...]:
        """The ops that keep these captions true."""
        banned = set()
        if names_colour(captions):
            banned.add("grayscale")
        if names_direction(captions):
            banned.add("flip")
        return tuple(o for o in self.ops if o not in banned)

    def view_key(self, digest: str, view: int, captions: Sequence[str]) -> str:
        """The feature cache key of view `view` (0: the image itself, key = its hash)."""
        if view == 0:
            return digest
        policy = hashlib.sha1(",".join(self.allowed(captions)).encode()).hexdigest()[:8]
        return f"{digest}~v{view}~{policy}"

    def apply(self, image: Image.Image, digest: str, view: int, captions: Sequence[str]):
        """View `view` of `image`, reproducible from (digest, view, allowed ops)."""
        if view == 0:
            return image
        allowed = self.allowed(captions)
        rng = np.random.default_rng([int(digest[:12], 16) if digest else 0, view])
        return augment(image, allowed, rng)


def augment(image: Image.Image, ops: Sequence[str], rng: np.random.Generator) -> Image.Image:
    """One random view of `image` using only `ops` (each applied with probability 1/2; crop or
    shrink always: a view should differ from the original)."""
    image = image.convert("RGB")
    geometry = [op for op in ("crop", "shrink") if op in ops]
    if geometry:
        # no draw when there is one: views made before `shrink` existed stay the same
        pick = geometry[int(rng.integers(len(geometry)))] if len(geometry) > 1 else geometry[0]
        image = _resized_crop(image, rng) if pick == "crop" else _shrink(image, rng)
    if "blur" in ops and rng.random() < 0.5:
        image = image.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.3, 1.5))))
    if "posterize" in ops and rng.random() < 0.5:
        image = ImageOps.posterize(image, int(rng.integers(3, 6)))
    if "grayscale" in ops and rng.random() < 0.5:
        image = ImageOps.grayscale(image).convert("RGB")
    if "flip" in ops and rng.random() < 0.5:
        image = ImageOps.mirror(image)
    return image


def _resized_crop(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    w, h = image.size
    area = float(rng.uniform(0.7, 1.0)) * w * h
    ratio = float(np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3))))
    cw = min(w, max(1, round((area * ratio) ** 0.5)))
    ch = min(h, max(1, round((area / ratio) ** 0.5)))
    x = int(rng.integers(0, w - cw + 1))
    y = int(rng.integers(0, h - ch + 1))
    return image.crop((x, y, x + cw, y + ch)).resize((w, h), Image.Resampling.BICUBIC)


def _shrink(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    w, h = image.size
    scale = float(rng.uniform(0.65, 0.95))
    sw, sh = max(1, round(w * scale)), max(1, round(h * scale))
    pixels = np.asarray(image)
    ring = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    canvas = Image.new("RGB", (w, h), tuple(int(v) for v in np.median(ring, axis=0)))
    x = int(rng.integers(0, w - sw + 1))
    y = int(rng.integers(0, h - sh + 1))
    canvas.paste(image.resize((sw, sh), Image.Resampling.BICUBIC), (x, y))
    return canvas


def draw_view(views: int, seed: int, epoch: int, index: int) -> int:
    """Which of an image's `views` (+1 for the image itself) an epoch trains on."""
    if views <= 0:
        return 0
    return int(np.random.default_rng([seed, epoch, index, 7]).integers(views + 1))
