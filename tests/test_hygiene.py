"""Data hygiene: planted exact duplicates, near-duplicates (resized + re-encoded copies) and
train/test leaks are all named, clean images never; the cleaned manifest fixes them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from captioner.data import hygiene
from captioner.data.hygiene import (
    EMPTY,
    EXACT,
    LEAK,
    LONG,
    NEAR,
    SHARED,
    check_hygiene,
    write_clean_manifest,
)
from captioner.data.sources import load_captions
from captioner.errors import CaptionerError


def photo(seed: int, size: tuple[int, int] = (128, 96)) -> Image.Image:
    """A smooth random picture: unlike the next seed's, as two unrelated photos are."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8))
    return coarse.resize(size, Image.Resampling.BICUBIC)


def near_copy(src: Path, dst: Path) -> None:
    """What a scraper does to an image: smaller, and re-encoded as JPEG."""
    with Image.open(src) as img:
        w, h = img.size
        img.convert("RGB").resize((w * 3 // 4, h * 3 // 4), Image.Resampling.LANCZOS).save(
            dst, "JPEG", quality=80
        )


def write_split(folder: Path, images: dict[str, str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "metadata.jsonl", "w") as meta:
        for name, caption in images.items():
            meta.write(json.dumps({"file_name": name, "text": caption}) + "\n")


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> tuple[Path, dict[str, set[str]]]:
    """An imagefolder with its own train/test split (so the split is known) and four planted
    pairs: an exact copy and a near copy inside train, an exact and a near copy across."""
    root = tmp_path_factory.mktemp("planted") / "data"
    train, test = root / "train", root / "test"
    train.mkdir(parents=True)
    test.mkdir()
    names = {}
    for i in range(14):
        photo(i).save(train / f"clean_{i:02d}.png")
        names[f"clean_{i:02d}.png"] = f"train picture number {i}"
    shutil.copyfile(train / "clean_00.png", train / "copy_of_00.png")
    near_copy(train / "clean_01.png", train / "small_01.jpg")
    names |= {"copy_of_00.png": "a copy", "small_01.jpg": "a smaller copy"}
    write_split(train, names)
    names = {}
    for i in range(100, 106):
        photo(i).save(test / f"clean_{i}.png")
        names[f"clean_{i}.png"] = f"test picture number {i}"
    shutil.copyfile(train / "clean_02.png", test / "leaked_02.png")
    near_copy(train / "clean_03.png", test / "leaked_small_03.jpg")
    names |= {"leaked_02.png": "leaked as is", "leaked_small_03.jpg": "leaked, resized"}
    write_split(test, names)
    pairs = {
        (EXACT, "exact"): {str(train / "clean_00.png"), str(train / "copy_of_00.png")},
        (NEAR, "near"): {str(train / "clean_01.png"), str(train / "small_01.jpg")},
        (LEAK, "exact"): {str(train / "clean_02.png"), str(test / "leaked_02.png")},
        (LEAK, "near"): {str(train / "clean_03.png"), str(test / "leaked_small_03.jpg")},
    }
    return root, pairs


def test_every_planted_pair_is_named_and_no_clean_image(planted, monkeypatch):
    root, pairs = planted
    calls = []
    phash = hygiene.imagehash.phash
    monkeypatch.setattr(hygiene.imagehash, "phash", lambda img: calls.append(1) or phash(img))
    report = check_hygiene(root)
    assert len(calls) == len(report.items) == 24  # every image hashed once
    found = {frozenset(f.files): f for f in report.findings}
    for (kind, how), pair in pairs.items():
        assert frozenset(pair) in found, f"{kind} ({how}) not found: {report.rows()}"
        assert found[frozenset(pair)].kind == kind, (kind, how)
    assert len(report.findings) == 4
    assert report.files() == set().union(*pairs.values())  # no clean image is named
    assert [f.kind for f in report.findings] == [LEAK, LEAK, EXACT, NEAR]  # leaks first
    leak = found[frozenset(pairs[LEAK, "near"])]
    assert "train and test" in leak.detail and "distance" in leak.detail
    assert "identical" in found[frozenset(pairs[LEAK, "exact"])].detail
    assert len(report.problems) == 4 and not report.notes
    assert "2 train/test leaks" in report.summary() and "1 exact duplicate" in report.summary()


def test_near_duplicates_can_be_turned_off(planted):
    root, pairs = planted
    report = check_hygiene(root, near_threshold=None)
    assert {f.kind for f in report.findings} == {EXACT, LEAK}
    assert report.files() == pairs[EXACT, "exact"] | pairs[LEAK, "exact"]
    tight = check_hygiene(root, near_threshold=0)  # pHash must be equal: rarely after resizing
    assert tight.files() >= pairs[EXACT, "exact"] | pairs[LEAK, "exact"]


def test_the_split_is_the_one_training_uses(tmp_path):
    """With no test split in the source, leaks are judged on load_captions' own split."""
    root = tmp_path / "side"
    root.mkdir()
    for i in range(16):
        photo(200 + i).save(root / f"img_{i:02d}.png")
        (root / f"img_{i:02d}.txt").write_text(f"caption {i}")
    for i in range(6):  # copies of six images: some land across the split, some do not
        shutil.copyfile(root / f"img_{i:02d}.png", root / f"dup_{i:02d}.png")
        (root / f"dup_{i:02d}.txt").write_text(f"copy {i}")
    dd = load_captions(root, test_size=0.5, seed=3)
    split_of = {
        Path(r["path"]).name: name
        for name in ("train", "test")
        for r in dd[name].cast_column("image", __import__("datasets").Image(decode=False))["image"]
    }
    report = check_hygiene(root, test_size=0.5, seed=3)
    kinds = {frozenset(Path(f).name for f in x.files): x.kind for x in report.findings}
    assert len(kinds) == 6
    for i in range(6):
        a, b = f"img_{i:02d}.png", f"dup_{i:02d}.png"
        assert kinds[frozenset({a, b})] == (LEAK if split_of[a] != split_of[b] else EXACT)
    assert set(kinds.values()) == {LEAK, EXACT}  # the seed puts copies on both sides


def test_caption_findings(tmp_path):
    root = tmp_path / "caps"
    root.mkdir()
    captions = {
        "a": "a dog on a beach",
        "b": "A dog on a beach.",  # the same caption on another image
        "c": "...\nan actual caption",  # one caption with no words
        "d": "one two three four five six seven",  # overlong with max 5 words
        "e": "fine",
    }
    for i, (stem, text) in enumerate(captions.items()):
        photo(300 + i).save(root / f"{stem}.png")
        (root / f"{stem}.txt").write_text(text)
    shutil.copyfile(root / "e.png", root / "e2.png")  # a copy shares its caption: no note
    (root / "e2.txt").write_text("fine")
    report = check_hygiene(root, test_size=0, max_caption_words=5)
    by_kind = {f.kind: {Path(p).name for p in f.files} for f in report.findings}
    assert by_kind == {
        SHARED: {"a.png", "b.png"},
        EMPTY: {"c.png"},
        LONG: {"d.png"},
        EXACT: {"e.png", "e2.png"},
    }
    assert [f.kind for f in report.notes] == [SHARED]
    assert "'a dog on a beach'" in report.notes[0].detail
    assert LONG not in {f.kind for f in check_hygiene(root, test_size=0).findings}


def _tree(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_clean_manifest_beside_the_data(planted, suffix):
    root, pairs = planted
    before = _tree(root)
    report = check_hygiene(root)
    out = root / f"clean{suffix}"
    try:
        written = write_clean_manifest(report, out)
        assert written.rows == 24 - 4 and written.copied_to is None
        # the later copy of each group goes (train before test), its caption joins the kept one
        dropped = {Path(f).name for f in written.dropped}
        assert dropped == {"copy_of_00.png", "small_01.jpg", "leaked_02.png", "leaked_small_03.jpg"}
        rows = load_captions(out, test_size=0)["train"]
        assert len(rows) == 20
        by_name = dict(
            zip(
                [Path(p["path"]).name for p in _undecoded(rows)],
                rows["captions"],
                strict=True,
            )
        )
        assert by_name["clean_00.png"] == ["train picture number 0", "a copy"]
        assert by_name["clean_02.png"] == ["train picture number 2", "leaked as is"]
        again = check_hygiene(out, test_size=0.5)
        assert not again.problems  # the cleaned set has no copies left
        after = _tree(root)
        assert after.pop(str(out)) and after == before  # nothing else written or changed
        with pytest.raises(CaptionerError, match="already exists"):
            write_clean_manifest(report, out)
    finally:
        out.unlink(missing_ok=True)


def test_clean_manifest_elsewhere_copies_the_images(planted, tmp_path):
    root, _ = planted
    before = _tree(root)
    report = check_hygiene(root, near_threshold=None)
    written = write_clean_manifest(report, tmp_path / "elsewhere" / "clean.jsonl")
    assert written.copied_to == tmp_path / "elsewhere" / "clean_images"
    assert len(list(written.copied_to.iterdir())) == written.rows == 24 - 2
    assert len(load_captions(written.path, test_size=0)["train"]) == 22
    assert _tree(root) == before
    with pytest.raises(CaptionerError, match=r"\.csv or \.jsonl"):
        write_clean_manifest(report, tmp_path / "clean.txt")


def _undecoded(ds):
    import datasets

    return ds.cast_column("image", datasets.Image(decode=False))["image"]


def _cli_wired() -> bool:
    from typer.testing import CliRunner

    from captioner.cli import app

    return "--near_threshold" in CliRunner().invoke(app, ["data", "check", "--help"]).output


@pytest.mark.skipif(not _cli_wired(), reason="`captioner data check` has no --near_threshold yet")
def test_cli_data_check_names_every_planted_pair(planted, tmp_path):
    from typer.testing import CliRunner

    from captioner.cli import app

    root, pairs = planted
    fixed = tmp_path / "fixed.jsonl"
    result = CliRunner().invoke(app, ["data", "check", str(root), "--fix", str(fixed)])
    assert result.exit_code == 1, result.output  # leaks and duplicates are problems
    for file in set().union(*pairs.values()):
        assert file in result.output, file
    for clean in sorted(root.rglob("clean_*")):
        if str(clean) not in set().union(*pairs.values()):
            assert str(clean) not in result.output, clean
    assert fixed.is_file() and "20 rows" in result.output
    assert len(load_captions(fixed, test_size=0)["train"]) == 20


def test_clean_manifest_never_copies_through_a_planted_link_or_over_a_file(planted, tmp_path):
    root, _ = planted
    report = check_hygiene(root, near_threshold=None)
    outside = tmp_path / "outside"
    outside.mkdir()
    victim = outside / "000000_clean_00.png"  # the name the first copy gets
    victim.write_text("precious")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "clean_images").symlink_to(outside, target_is_directory=True)
    with pytest.raises(CaptionerError, match="clean_images: already exists"):
        write_clean_manifest(report, elsewhere / "clean.jsonl")
    assert victim.read_text() == "precious" and [p.name for p in outside.iterdir()] == [victim.name]
    assert not (elsewhere / "clean.jsonl").exists()  # nothing half written
    (elsewhere / "clean_images").unlink()
    (elsewhere / "clean_images").mkdir()  # a real folder left by someone: not ours to fill
    (elsewhere / "clean_images" / victim.name).write_text("precious")
    with pytest.raises(CaptionerError, match="already exists"):
        write_clean_manifest(report, elsewhere / "clean.jsonl")
    assert (elsewhere / "clean_images" / victim.name).read_text() == "precious"
    (elsewhere / "dangling.jsonl").symlink_to(outside / "made.jsonl")
    with pytest.raises(CaptionerError, match="already exists"):
        write_clean_manifest(report, elsewhere / "dangling.jsonl")
    assert not (outside / "made.jsonl").exists()
    written = write_clean_manifest(report, elsewhere / "other.jsonl")
    assert written.copied_to == elsewhere / "other_images" and written.rows == 22
    assert all(not p.is_symlink() for p in written.copied_to.iterdir())
