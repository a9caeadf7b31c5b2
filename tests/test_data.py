"""Every source format loads to the same shape; every kind of bad input gets its stated outcome."""

import csv
import json
import logging

import datasets
import pytest
import webdataset as wds
from conftest import png_header
from PIL import Image

from captioner.data.sources import load_captions, scan_source
from captioner.errors import CaptionerError


def captions(ds) -> list[list[str]]:
    return list(ds["captions"])


# --- the same 20 pairs in every format ---


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """20 small distinct images, 1-3 captions each (with non-ASCII text and stray whitespace)."""
    src = tmp_path_factory.mktemp("pairs")
    out = []
    for i in range(20):
        path = src / f"img{i:02d}.png"
        Image.new("RGB", (16, 16), (i * 12, 255 - i * 12, 7)).save(path)
        out.append((path, [f"picture {i}, café number {k}" for k in range(1 + i % 3)]))
    return out


def write_formats(root, pairs):
    """Write `pairs` as imagefolder, parquet, save_to_disk, sidecars, CSV, JSONL, webdataset."""
    folder = root / "imagefolder"
    folder.mkdir()
    with open(folder / "metadata.jsonl", "w", encoding="utf-8") as f:
        for path, caps in pairs:
            (folder / path.name).write_bytes(path.read_bytes())
            f.write(json.dumps({"file_name": path.name, "text": caps}) + "\n")
    ds = datasets.Dataset.from_dict(
        {"image": [str(p) for p, _ in pairs], "text": [c for _, c in pairs]}
    ).cast_column("image", datasets.Image())
    (root / "parquet").mkdir()
    ds.to_parquet(str(root / "parquet" / "train.parquet"))
    ds.save_to_disk(str(root / "disk"))
    side = root / "sidecars"
    side.mkdir()
    for path, caps in pairs:
        (side / path.name).write_bytes(path.read_bytes())
        (side / path.with_suffix(".txt").name).write_text("\n\n".join(caps) + "\n")
    (root / "manifests" / "images").mkdir(parents=True)
    with open(root / "manifests" / "captions.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "text"])
        for path, caps in pairs:  # COCO style: one row per caption
            (root / "manifests" / "images" / path.name).write_bytes(path.read_bytes())
            writer.writerows([f"images/{path.name}", c] for c in caps)
    with open(root / "manifests" / "captions.jsonl", "w", encoding="utf-8") as f:
        for path, caps in pairs:
            f.write(json.dumps({"file_name": f"images/{path.name}", "captions": caps}) + "\n")
    (root / "wds").mkdir()
    with wds.TarWriter(str(root / "wds" / "shard-000.tar")) as sink:
        for path, caps in pairs[:10]:
            sink.write({"__key__": path.stem, "png": path.read_bytes(), "txt": "\n".join(caps)})
    with wds.TarWriter(str(root / "wds" / "shard-001.tar")) as sink:
        for path, caps in pairs[10:]:
            sink.write({"__key__": path.stem, "png": path.read_bytes(), "json": {"caption": caps}})
    return {
        "imagefolder": folder,
        "parquet": root / "parquet",
        "save_to_disk": root / "disk",
        "sidecars": side,
        "csv": root / "manifests" / "captions.csv",
        "jsonl": root / "manifests" / "captions.jsonl",
        "webdataset": root / "wds",
    }


def test_five_formats_load_identically(tmp_path, pairs):
    sources = write_formats(tmp_path, pairs)
    expected = [caps for _, caps in pairs]
    loaded = {}
    for name, source in sources.items():
        dd = load_captions(source, test_size=0.2, seed=1)
        assert set(dd) == {"train", "test"}, name
        assert isinstance(dd["train"].features["image"], datasets.Image), name
        everything = captions(dd["train"]) + captions(dd["test"])
        assert sorted(everything) == sorted(expected), name
        loaded[name] = (captions(dd["train"]), captions(dd["test"]))
        first = dd["train"][0]
        assert first["image"].mode == "RGB" and first["image"].size == (16, 16)
        # the pixels travel with their captions
        i = int(first["captions"][0].split()[1].rstrip(","))
        assert first["image"].getpixel((0, 0)) == (i * 12, 255 - i * 12, 7), name
    # same rows in, same seeded split out, whatever the format
    assert len({json.dumps(v) for v in loaded.values()}) == 1


def test_single_shard_and_single_parquet_file(tmp_path, pairs):
    sources = write_formats(tmp_path, pairs)
    expected = {  # the first shard holds pairs 0-9; the parquet file all 20
        sources["webdataset"] / "shard-000.tar": [caps for _, caps in pairs[:10]],
        sources["parquet"] / "train.parquet": [caps for _, caps in pairs],
    }
    for source, caps in expected.items():
        dd = load_captions(source, test_size=0)
        assert sorted(captions(dd["train"])) == sorted(caps) and len(dd["test"]) == 0, source


def test_imagefolder_with_metadata_csv_and_named_columns(tmp_path, pairs):
    with open(tmp_path / "metadata.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["file_name", "description", "other"])
        for path, caps in pairs:
            (tmp_path / path.name).write_bytes(path.read_bytes())
            writer.writerow([path.name, caps[0], "x"])
    dd = load_captions(tmp_path, caption_column="description", test_size=0)
    assert sorted(captions(dd["train"])) == sorted([caps[:1] for _, caps in pairs])
    with pytest.raises(CaptionerError, match="no caption column 'nope'.*description"):
        load_captions(tmp_path, caption_column="nope")


def test_seeded_split_and_existing_test_split_kept(tmp_path, pairs):
    sources = write_formats(tmp_path, pairs)
    a = load_captions(sources["sidecars"], test_size=0.25, seed=7)
    b = load_captions(sources["sidecars"], test_size=0.25, seed=7)
    c = load_captions(sources["sidecars"], test_size=0.25, seed=8)
    assert (len(a["train"]), len(a["test"])) == (15, 5)
    assert captions(a["test"]) == captions(b["test"]) != captions(c["test"])
    ds = datasets.load_from_disk(str(sources["save_to_disk"]))
    datasets.DatasetDict(
        {"train": ds.select(range(17)), "test": ds.select(range(17, 20))}
    ).save_to_disk(str(tmp_path / "split"))
    dd = load_captions(tmp_path / "split", test_size=0.5)
    assert captions(dd["test"]) == [caps for _, caps in pairs[17:]]
    assert len(dd["train"]) == 17


def test_hub_id_without_network_is_one_clear_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CaptionerError) as info:
        load_captions("reach-vb/pokemon-blip-captions")
    message = str(info.value)
    assert "reach-vb/pokemon-blip-captions" in message and "HF_HUB_OFFLINE" in message
    assert "\n" not in message


def test_missing_local_path_is_not_sent_to_the_hub(tmp_path):
    with pytest.raises(CaptionerError, match="no such file or directory"):
        load_captions(tmp_path / "nope.csv")
    with pytest.raises(CaptionerError, match="empty folder"):
        load_captions(tmp_path)


# --- the bad-input corpus: each kind, its file, its outcome ---


def make_corpus(root):
    """A sidecar folder with every kind of bad image file, plus odd-but-good ones.

    Returns {file name: expected reason}; every other image must load.
    """
    root.mkdir()

    def good(name, img, caption="a fine picture", **save):
        img.save(root / name, **save)
        (root / name).with_suffix(".txt").write_text(caption)

    def bad(name, data, caption="a caption"):
        (root / name).write_bytes(data)
        if caption is not None:
            (root / name).with_suffix(".txt").write_text(caption)

    noise = Image.effect_noise((64, 64), 60).convert("RGB")
    noise.save(root / "full.png")
    truncated = (root / "full.png").read_bytes()[:500]
    (root / "full.png").unlink()
    exif = Image.Exif()
    exif[0x0112] = 6
    good("rotated.jpg", Image.new("RGB", (20, 10), "red"), exif=exif)
    good("cmyk.jpg", Image.new("CMYK", (8, 8), (0, 255, 255, 0)))
    good("alpha.png", Image.new("RGBA", (8, 8), (0, 0, 0, 0)))
    good("deep.png", Image.new("I;16", (8, 8), 40000))
    good("upper.PNG", Image.new("RGB", (8, 8)), caption="\ufeffwith BOM\r\nand CRLF\r\n")
    (root / ".DS_Store").write_bytes(b"\0\1junk")  # hidden files are not data
    expected = {
        "zero.png": "empty file",
        "notimage.png": "not an image",
        "truncated.png": "truncated",
        "bomb.png": "too many pixels",
        "one.png": "too small",
        "zerosize.png": "not an image",  # PIL refuses a 0x0 header outright
        "nocaption.png": "no caption file",
        "empty.txt": "empty caption file",
        "latin1.txt": "not UTF-8",
        "dup.jpg": "several images share",
        "dup.png": "several images share",
    }
    bad("zero.png", b"")
    bad("notimage.png", b"GIF? no, just text")
    bad("truncated.png", truncated)
    bad("bomb.png", png_header(10_000, 10_000))
    bad("one.png", png_header(1, 1))
    bad("zerosize.png", png_header(0, 0))
    good("nocaption.png", Image.new("RGB", (8, 8)))
    (root / "nocaption.txt").unlink()
    good("empty.png", Image.new("RGB", (8, 8)), caption="  \n\n")
    good("latin1.png", Image.new("RGB", (8, 8)))
    (root / "latin1.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    good("dup.jpg", Image.new("RGB", (8, 8)))
    Image.new("RGB", (8, 8)).save(root / "dup.png")
    return expected


def test_bad_input_corpus_in_a_sidecar_folder(tmp_path, caplog):
    expected = make_corpus(tmp_path / "corpus")
    bad = scan_source(tmp_path / "corpus", full=True).bad
    found = {b.file.rsplit("/", 1)[-1]: b.reason for b in bad}
    assert set(found) == set(expected), found
    for name, reason in expected.items():
        assert reason in found[name], (name, found[name])
    with caplog.at_level(logging.WARNING, logger="captioner.data.sources"):
        dd = load_captions(tmp_path / "corpus", test_size=0)
    assert "skipped 11 of 16 examples" in caplog.text
    images = {r["image"].size: r["captions"] for r in dd["train"]}
    assert len(dd["train"]) == 5
    assert images[(10, 20)] == ["a fine picture"]  # EXIF rotation applied on load
    assert ["with BOM", "and CRLF"] in images.values()
    with pytest.raises(CaptionerError, match="11 bad example.*--on_bad_image skip"):
        load_captions(tmp_path / "corpus", on_bad_image="fail")


def test_bad_manifest_rows(tmp_path):
    (tmp_path / "data").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "data" / "ok.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "outside.png")
    rows = [
        {"image": "ok.png", "text": "fine"},
        {"image": "missing.png", "text": "no such file"},
        {"image": "../outside.png", "text": "escapes the root"},
        {"image": "/etc/hostname", "text": "absolute, elsewhere"},
        {"image": "ok.png", "text": ""},  # adds nothing to ok.png's captions
        {"image": "", "text": "no image"},
        {"image": "https://example.com/a.jpg", "text": "not fetched"},
    ]
    manifest = tmp_path / "data" / "m.jsonl"
    manifest.write_text("\n".join(json.dumps(r) for r in rows) + "\n{broken\n")
    found = {b.file: b.reason for b in scan_source(manifest, full=True).bad}
    assert "file not found" in found[str(tmp_path / "data" / "missing.png")]
    assert "outside the manifest's folder" in found["../outside.png"]
    assert "outside the manifest's folder" in found["/etc/hostname"]
    assert "no image path" in found[f"{manifest}:6"]
    assert "not downloaded" in found["https://example.com/a.jpg"]
    assert "not a JSON object" in found[f"{manifest}:8"]
    assert len(found) == 6
    assert captions(load_captions(manifest, test_size=0)["train"]) == [["fine"]]


def test_bad_imagefolder_and_webdataset_samples(tmp_path):
    folder = tmp_path / "folder"
    folder.mkdir()
    for name in ("a.png", "b.png", "unlisted.png"):
        Image.new("RGB", (8, 8)).save(folder / name)
    rows = [{"file_name": "a.png", "text": "ok"}, {"file_name": "b.png", "text": None}]
    rows.append({"file_name": "gone.png", "text": "missing"})
    (folder / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    found = {b.file.rsplit("/", 1)[-1]: b.reason for b in scan_source(folder, full=True).bad}
    assert found == {
        "b.png": "no caption",
        "gone.png": "file not found",
        "unlisted.png": "not listed in metadata (no caption)",
    }
    png = (folder / "a.png").read_bytes()
    with wds.TarWriter(str(tmp_path / "s.tar")) as sink:
        sink.write({"__key__": "ok", "png": png, "txt": "fine"})
        sink.write({"__key__": "nocap", "png": png})
        sink.write({"__key__": "noimg", "txt": "lonely caption"})
        sink.write({"__key__": "latin", "png": png, "txt": "caf\xe9".encode("latin-1")})
        sink.write({"__key__": "two", "png": png, "jpg": png, "txt": "which one?"})
        sink.write({"__key__": "junk", "png": b"not a png", "txt": "broken image"})
    found = {
        b.file.rsplit("/", 1)[-1]: b.reason for b in scan_source(tmp_path / "s.tar", full=True).bad
    }
    assert found == {
        "nocap.png": "no caption",
        "noimg": "no image",
        "latin": "caption is not UTF-8 text",
        "two": "several images (jpg, png)",
        "junk.png": "not an image (unrecognised format)",
    }
    assert captions(load_captions(tmp_path / "s.tar", test_size=0)["train"]) == [["fine"]]


def test_truncated_shard_is_reported(tmp_path):
    png = Image.effect_noise((32, 32), 50).convert("RGB")
    png.save(tmp_path / "a.png")
    with wds.TarWriter(str(tmp_path / "full.tar")) as sink:
        for i in range(4):
            sink.write({"__key__": f"k{i}", "png": (tmp_path / "a.png").read_bytes(), "txt": "x"})
    data = (tmp_path / "full.tar").read_bytes()
    (tmp_path / "cut.tar").write_bytes(data[: len(data) // 2])
    found = scan_source(tmp_path / "cut.tar", full=True).bad
    assert [b.file for b in found] == [str(tmp_path / "cut.tar")]
    assert "unreadable tar shard" in found[0].reason


def test_cli_data_check_names_every_bad_file(tmp_path):
    from typer.testing import CliRunner

    from captioner.cli import app

    expected = make_corpus(tmp_path / "corpus")
    result = CliRunner().invoke(app, ["data", "check", str(tmp_path / "corpus")])
    assert result.exit_code == 1
    for name in expected:
        assert str(tmp_path / "corpus" / name) in result.output, name
    assert "16 examples: 5 ok (train 5), 11 bad" in result.output


def test_folder_with_one_manifest_reads_the_manifest(tmp_path, pairs):
    sources = write_formats(tmp_path, pairs)
    folder = sources["jsonl"].parent
    sources["csv"].unlink()  # one manifest left, no .txt sidecars: the folder means the manifest
    dd = load_captions(folder, test_size=0)
    assert captions(dd["train"]) == [caps for _, caps in pairs]


def test_hub_unreachable_fails_fast_without_offline_mode(monkeypatch):
    import captioner.data.sources as data_mod

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(data_mod, "hub_reachable", lambda timeout=3.0: False)
    with pytest.raises(CaptionerError, match="Hugging Face Hub is unreachable.*HF_HUB_OFFLINE"):
        load_captions("lambdalabs/pokemon-blip-captions")


def test_cli_prints_one_line_for_a_hub_id_offline(tmp_path):
    import os
    import subprocess
    import sys

    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    run = subprocess.run(
        [sys.executable, "-m", "captioner.cli", "show", "reach-vb/pokemon-blip-captions"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
    )
    assert run.returncode == 1
    # one message (rich may wrap it at the terminal width), no traceback, no retry chatter
    assert run.stderr.startswith("error: cannot load 'reach-vb/pokemon-blip-captions'"), run.stderr
    assert run.stderr.count("error") == 1 and "Traceback" not in run.stderr


def test_loading_checks_headers_and_data_check_decodes(tmp_path):
    """load_captions does not decode a whole dataset an extra time: a JPEG cut inside its pixel
    data passes the header check (training and captioning skip it when they meet it), while
    `data check` decodes everything and names it."""
    import io

    root = tmp_path / "side"
    root.mkdir()
    noise = Image.effect_noise((64, 64), 60).convert("RGB")
    noise.save(root / "good.jpg")
    buf = io.BytesIO()
    noise.save(buf, "JPEG")
    (root / "cut.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) * 2 // 3])
    for stem in ("good", "cut"):
        (root / f"{stem}.txt").write_text("noise")
    assert len(load_captions(root, test_size=0)["train"]) == 2
    found = {b.file.rsplit("/", 1)[-1]: b.reason for b in scan_source(root, full=True).bad}
    assert list(found) == ["cut.jpg"] and "truncated" in found["cut.jpg"]
