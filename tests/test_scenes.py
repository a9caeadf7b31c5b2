"""Built-in scenes: deterministic, fast, and every caption is true of its picture."""

import json

import numpy as np
import pytest
from PIL import Image

from captioner.data.scenes import BACKGROUNDS, COLOURS, SETTINGS, SHAPES, generate_scenes
from captioner.errors import CaptionerError


def rows(out):
    return [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]


def nearest(rgb, palette):
    return min(
        palette, key=lambda k: sum((a - b) ** 2 for a, b in zip(rgb, palette[k], strict=True))
    )


def test_same_seed_same_scenes_other_seed_differs(tmp_path):
    a = generate_scenes(tmp_path / "a", n=30, seed=3)
    b = generate_scenes(tmp_path / "b", n=30, seed=3)
    c = generate_scenes(tmp_path / "c", n=30, seed=4)
    assert rows(a) == rows(b) and rows(a) != rows(c)
    assert (a / "00007.png").read_bytes() == (b / "00007.png").read_bytes()


@pytest.mark.parametrize("difficulty", list(SETTINGS))
def test_layout_and_captions(tmp_path, difficulty):
    out = generate_scenes(tmp_path, n=40, seed=0, difficulty=difficulty)
    meta = rows(out)
    assert len(meta) == 40
    for row in meta:
        img = Image.open(out / row["file_name"])
        assert img.size == (SETTINGS[difficulty].image_size,) * 2 and img.mode == "RGB"
        assert 3 <= len(row["captions"]) <= 5
        assert len(set(row["captions"])) == len(row["captions"])
        assert all(any(s in c for s in SHAPES) for c in row["captions"])
    assert len({r["captions"][0] for r in meta}) > 30  # varied, not one scene repeated


def test_easy_captions_match_the_pixels(tmp_path):
    """Background colour at a corner, the object's colour on a large share of the image."""
    out = generate_scenes(tmp_path, n=60, seed=1, difficulty="easy", image_size=48)
    for row in rows(out):
        first = row["captions"][0]  # "a red circle on a blue background"
        words = first.split()
        colour, shape, bg = words[1], words[2], words[-2]
        assert first == f"{words[0]} {colour} {shape} on a {bg} background"
        assert colour != bg and colour in COLOURS and shape in SHAPES and bg in BACKGROUNDS
        img = Image.open(out / row["file_name"])
        assert img.size == (48, 48)
        assert nearest(img.getpixel((0, 0)), BACKGROUNDS) == bg
        palette = np.array([*COLOURS.values(), BACKGROUNDS[bg]])
        pixels = np.asarray(img, dtype=float).reshape(-1, 1, 3)
        closest = ((pixels - palette[None]) ** 2).sum(-1).argmin(1)
        share = (closest == list(COLOURS).index(colour)).mean()
        assert share > 0.07, (row, share)  # one large object, not a speck


def test_two_thousand_scenes_each_with_three_to_five_captions(tmp_path):
    # (their speed is a benchmark: bench/scenes_bench.py)
    generate_scenes(tmp_path, n=2000, seed=0)
    rows = [json.loads(line) for line in (tmp_path / "metadata.jsonl").read_text().splitlines()]
    assert len(rows) == 2000 and len(list(tmp_path.glob("*.png"))) == 2000
    assert {r["file_name"] for r in rows} == {p.name for p in tmp_path.glob("*.png")}
    assert all(3 <= len(r["captions"]) <= 5 for r in rows)


def test_unknown_difficulty_is_a_clear_error(tmp_path):
    with pytest.raises(CaptionerError, match="unknown difficulty"):
        generate_scenes(tmp_path, n=1, difficulty="impossible")


def test_spatial_relations_are_true(tmp_path):
    """'a X to the left of / above a Y': X's pixels really lie left of / above Y's."""
    import re

    pattern = re.compile(
        r"an? (small|large) (\w+) (\w+) (to the left of|above) an? (small|large) (\w+) (\w+) "
        r"on an? (\w+) background"
    )
    out = generate_scenes(tmp_path, n=120, seed=2, difficulty="medium")
    checked = 0
    for row in rows(out):
        match = pattern.fullmatch(row["captions"][0])
        if not match or match[2] == match[6]:
            continue  # one object, or two of one colour
        size1, c1, _, relation, size2, c2, _, bg = match.groups()
        palette = np.array([*COLOURS.values(), BACKGROUNDS[bg]])
        pixels = np.asarray(Image.open(out / row["file_name"]), dtype=float)
        closest = ((pixels[..., None, :] - palette) ** 2).sum(-1).argmin(-1)
        ys1, xs1 = np.nonzero(closest == list(COLOURS).index(c1))
        ys2, xs2 = np.nonzero(closest == list(COLOURS).index(c2))
        axis1, axis2 = (xs1, xs2) if relation == "to the left of" else (ys1, ys2)
        assert axis1.mean() < axis2.mean(), row
        if size1 != size2:  # the large one covers more pixels
            assert (len(xs1) > len(xs2)) == (size1 == "large"), row
        checked += 1
    assert checked >= 20
