"""Built-in scenes: procedurally drawn shapes with captions that are true by construction.

The offline default dataset and the demo's training data. Three settings:
  easy    one large object centred-ish on a plain background (64 px): learnable in minutes on CPU
  medium  one or two objects, two sizes, left/right or above/below (96 px)
  hard    one to three objects, two sizes, spatial relations, gradient backgrounds (128 px)
Every image gets 3-5 paraphrased captions; the first one is always the canonical template, so
"the first caption" is a stable choice for display. Same seed, same images and captions.
"""

from __future__ import annotations

import json
import math
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from captioner.errors import CaptionerError

COLOURS = {
    "red": (215, 35, 35),
    "green": (35, 165, 55),
    "blue": (35, 75, 215),
    "yellow": (245, 215, 35),
    "purple": (135, 50, 175),
    "orange": (245, 135, 25),
    "white": (245, 245, 245),
    "black": (25, 25, 25),
}
BACKGROUNDS = {
    "white": (238, 238, 238),
    "gray": (128, 128, 128),
    "black": (18, 18, 18),
    "blue": (70, 110, 200),
    "green": (80, 160, 90),
}
SHAPES = ("circle", "square", "triangle", "star", "cross", "diamond")
SUPERSAMPLE = 4  # draw at 4x and reduce: anti-aliased edges for free


@dataclass(frozen=True)
class Setting:
    image_size: int
    max_objects: int
    large: tuple[float, float]  # object size as a fraction of the image side
    small: tuple[float, float] | None  # None: one size only, and captions do not mention size
    gradient: bool


SETTINGS = {
    "easy": Setting(64, 1, (0.55, 0.75), None, False),
    "medium": Setting(96, 2, (0.36, 0.44), (0.17, 0.22), False),
    "hard": Setting(128, 3, (0.27, 0.31), (0.13, 0.17), True),
}


@dataclass
class Thing:
    colour: str
    shape: str
    size: str  # "large" / "small" / "" (easy: not mentioned)

    @property
    def phrase(self) -> str:
        return " ".join(w for w in (self.size, self.colour, self.shape) if w)


def generate_scenes(
    out_dir: str | Path,
    n: int = 2000,
    seed: int = 0,
    *,
    difficulty: str = "easy",
    image_size: int | None = None,
) -> Path:
    """Write `n` scenes to `out_dir` as an imagefolder: PNGs + metadata.jsonl with `captions`."""
    if difficulty not in SETTINGS:
        raise CaptionerError(f"unknown difficulty {difficulty!r}; choose {', '.join(SETTINGS)}")
    setting = SETTINGS[difficulty]
    size = image_size or setting.image_size
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:  # OUT is a file, or not writable
        raise CaptionerError(f"{out}: cannot create the scenes folder ({err.strerror})") from None
    width = len(str(max(n - 1, 0)))
    with open(out / "metadata.jsonl", "w", encoding="utf-8") as meta:
        for i in range(n):
            rng = random.Random(f"{seed}:{difficulty}:{i}")  # image i is the same for any n
            img, captions = draw_scene(rng, setting, size)
            name = f"{i:0{max(width, 5)}d}.png"
            img.save(out / name, optimize=False, compress_level=1)
            meta.write(json.dumps({"file_name": name, "captions": captions}) + "\n")
    return out


def draw_scene(rng: random.Random, setting: Setting, size: int) -> tuple[Image.Image, list[str]]:
    """Draw one scene and return it with 3-5 captions that are all true of it."""
    count = rng.randint(1, setting.max_objects)
    things = [_thing(rng, setting) for _ in range(count)]
    object_colours = {t.colour for t in things}
    background = rng.choice([b for b in BACKGROUNDS if b not in object_colours])
    big = size * SUPERSAMPLE
    img = _background(rng, background, size, setting.gradient).resize((big, big), Image.NEAREST)
    draw = ImageDraw.Draw(img)
    vertical = count > 1 and rng.random() < 0.5  # layout axis: objects in a row or a column
    for k, thing in enumerate(things):
        lo, hi = setting.large if thing.size != "small" else setting.small  # type: ignore[misc]
        side = rng.uniform(lo, hi) * big
        # each object owns an equal cell along the layout axis; jitter stays inside the cell
        cell = big / count
        along = cell * (k + 0.5) + rng.uniform(-1, 1) * max(0.0, (cell - side) / 2) * 0.8
        across = big / 2 + rng.uniform(-1, 1) * (big - side) / 2 * 0.6
        cx, cy = (across, along) if vertical else (along, across)
        _draw_shape(draw, rng, thing.shape, cx, cy, side, _jitter(rng, COLOURS[thing.colour]))
    img = img.reduce(SUPERSAMPLE)
    return img, _captions(rng, things, background, vertical)


def _thing(rng: random.Random, setting: Setting) -> Thing:
    size = "" if setting.small is None else rng.choice(("large", "small"))
    return Thing(rng.choice(list(COLOURS)), rng.choice(SHAPES), size)


def _jitter(rng: random.Random, rgb: tuple[int, int, int], amount: int = 12) -> tuple[int, ...]:
    return tuple(max(0, min(255, c + rng.randint(-amount, amount))) for c in rgb)


def _background(rng: random.Random, name: str, side: int, gradient: bool) -> Image.Image:
    base = _jitter(rng, BACKGROUNDS[name], 8)
    if not gradient or rng.random() < 0.3:
        return Image.new("RGB", (side, side), base)
    # a gentle linear gradient towards a lighter or darker shade of the same colour
    toward = 255 if sum(base) < 380 else 0
    shade = tuple(int(c + (toward - c) * 0.2) for c in base)
    ramp = Image.linear_gradient("L").resize((side, side))  # at output size: 16x cheaper
    if rng.random() < 0.5:
        ramp = ramp.transpose(Image.Transpose.ROTATE_90)
    return Image.composite(
        Image.new("RGB", ramp.size, shade), Image.new("RGB", ramp.size, base), ramp
    )


def _draw_shape(
    draw: ImageDraw.ImageDraw,
    rng: random.Random,
    shape: str,
    cx: float,
    cy: float,
    side: float,
    fill: tuple[int, ...],
) -> None:
    r = side / 2
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        return
    # rotations stay small where a big turn would change the shape's name (square -> diamond)
    turn = {"square": 12, "triangle": 15, "star": 36, "cross": 12, "diamond": 10}[shape]
    angle = math.radians(rng.uniform(-turn, turn))
    if shape == "square":
        pts = [(-1, -1), (1, -1), (1, 1), (-1, 1)]
        pts = [(x * 0.85, y * 0.85) for x, y in pts]  # same visual weight as the circle
    elif shape == "triangle":
        pts = [(0, -1), (0.95, 0.75), (-0.95, 0.75)]
    elif shape == "diamond":
        pts = [(0, -1), (0.7, 0), (0, 1), (-0.7, 0)]
    elif shape == "star":
        pts = [
            (math.sin(a) * rad, -math.cos(a) * rad)
            for k in range(10)
            for a, rad in [(k * math.pi / 5, 1.0 if k % 2 == 0 else 0.42)]
        ]
    else:  # cross (a plus sign)
        t = 0.3
        pts = [(-t, -1), (t, -1), (t, -t), (1, -t), (1, t), (t, t), (t, 1), (-t, 1), (-t, t)]
        pts += [(-1, t), (-1, -t), (-t, -t)]
    cos, sin = math.cos(angle), math.sin(angle)
    draw.polygon(
        [(cx + r * (x * cos - y * sin), cy + r * (x * sin + y * cos)) for x, y in pts], fill=fill
    )


def _a(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _captions(rng: random.Random, things: list[Thing], bg: str, vertical: bool) -> list[str]:
    """3-5 paraphrases: the canonical template first, then a seeded sample of the others."""
    p = [_a(t.phrase) for t in things]
    if len(p) == 1:
        first, others = (
            f"{p[0]} on a {bg} background",
            [
                f"{p[0]} against a {bg} background",
                f"a {bg} background with {p[0]} on it",
                f"{p[0]} on {bg}",
                f"{p[0]} in front of a {bg} background",
            ],
        )
    elif len(p) == 2:
        before, after = ("above", "below") if vertical else ("to the left of", "to the right of")
        ends = ("at the top", "at the bottom") if vertical else ("on the left", "on the right")
        first, others = (
            f"{p[0]} {before} {p[1]} on a {bg} background",
            [
                f"{p[1]} {after} {p[0]} on a {bg} background",
                f"{p[0]} and {p[1]} on a {bg} background",
                f"a {bg} background with {p[0]} {ends[0]} and {p[1]} {ends[1]}",
                f"{p[0]} {before} {p[1]}",
            ],
        )
    else:
        order = "from top to bottom" if vertical else "from left to right"
        before = "above" if vertical else "to the left of"
        after = "below" if vertical else "to the right of"
        first, others = (
            f"{p[0]}, {p[1]} and {p[2]} on a {bg} background",
            [
                f"{p[0]}, {p[1]} and {p[2]} {order} on a {bg} background",
                f"three shapes on a {bg} background: {p[0]}, {p[1]} and {p[2]}",
                f"{p[0]} {before} {p[1]}, with {p[2]} {after} them",
                f"a {bg} background with {p[0]}, {p[1]} and {p[2]} {order}",
            ],
        )
    return [first] + rng.sample(others, rng.randint(2, 4))


# --- reading the attributes back out of a caption ---

_OBJECT = re.compile(
    r"\b(?:(large|small) )?(" + "|".join(COLOURS) + r") (" + "|".join(SHAPES) + r")\b"
)
_BACKGROUND = re.compile(r"\b(" + "|".join(BACKGROUNDS) + r") background\b|\bon (\w+)$")
ATTRIBUTES = ("shape", "colour", "size", "background", "objects")


def caption_attributes(caption: str) -> dict[str, Any]:
    """What a scene caption says: the objects' shapes, colours and sizes (sorted lists: the
    paraphrases name objects in different orders), the background, and the objects as
    (size, colour, shape) triples. Anything it does not say is empty or None."""
    text = " ".join(caption.lower().replace(",", " ").split())
    objects = sorted((size or "", colour, shape) for size, colour, shape in _OBJECT.findall(text))
    match = _BACKGROUND.search(text)
    background = None
    if match:
        background = match.group(1) or (match.group(2) if match.group(2) in BACKGROUNDS else None)
    return {
        "shape": sorted(o[2] for o in objects),
        "colour": sorted(o[1] for o in objects),
        "size": sorted(o[0] for o in objects),
        "background": background,
        "objects": objects,
    }


def attribute_accuracy(predictions: list[str], references: list[list[str]]) -> dict[str, float]:
    """Per attribute, the fraction of images whose caption states it exactly as the canonical
    reference (the first) does: a wrong shape cannot hide behind a low WER."""
    truths = [caption_attributes(refs[0]) for refs in references]
    guesses = [caption_attributes(p) for p in predictions]
    n = max(len(predictions), 1)
    return {
        f"{key}_accuracy": sum(g[key] == t[key] for g, t in zip(guesses, truths, strict=True)) / n
        for key in ATTRIBUTES
    }
