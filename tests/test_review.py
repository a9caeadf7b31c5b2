"""`captioner review`: write-back to each editable source kind, backups, path rules, read-only
sources, bulk edits, the HTTP API's guards, and the page driven in headless chromium."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import socket
import tarfile
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
from conftest import make_images  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

from captioner.data.review import (  # noqa: E402
    BACKUP_DIR,
    BulkEdit,
    ImagefolderDataset,
    ManifestDataset,
    ReviewError,
    ReviewSession,
    SidecarDataset,
    open_review,
)
from captioner.errors import BadImageError  # noqa: E402
from captioner.serve.review import create_review_app  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM = "/usr/bin/chromium"


def snapshot(folder: Path, skip_backups: bool = True) -> dict[str, str]:
    """relative path -> sha256 of every file under `folder` (symlinks as their target text)."""
    out = {}
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).as_posix()
        if skip_backups and rel.startswith(BACKUP_DIR):
            continue
        if path.is_symlink():
            out[rel] = "link:" + os.readlink(path)
        elif path.is_file():
            out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def backups(folder: Path) -> dict[str, str]:
    """backed-up file (relative to the source) -> its text, newest backup last."""
    out = {}
    for path in sorted((folder / BACKUP_DIR).rglob("*")):
        if path.is_file():
            rel = Path(*path.relative_to(folder / BACKUP_DIR).parts[1:]).as_posix()
            out.setdefault(rel, path.read_bytes().decode())
    return out


def sidecar_folder(folder: Path, n: int = 4, uncaptioned: int = 1) -> list[Path]:
    images = make_images(folder, n + uncaptioned)
    for i, p in enumerate(images[:n]):
        p.with_suffix(".txt").write_text(f"caption {i}\nsecond {i}\n")
    return images


# ---- write-back per source kind ----


def test_sidecar_edit_writes_one_file_atomically_with_a_backup(tmp_path):
    sidecar_folder(tmp_path)
    before = snapshot(tmp_path)
    ds = open_review(tmp_path)
    assert isinstance(ds, SidecarDataset) and not ds.read_only
    session = ReviewSession(ds)
    assert session.captions(0) == ["caption 0", "second 0"] and session.captions(4) == []
    session.edit({0: ["a new caption"], 4: ["first caption ever", "and another"]})
    assert len(session.pending) == 2
    assert snapshot(tmp_path) == before  # nothing is written before save
    saved = session.save()
    assert saved.files == ["img_000.txt", "img_004.txt"]
    assert (tmp_path / "img_000.txt").read_text() == "a new caption\n"
    assert (tmp_path / "img_004.txt").read_text() == "first caption ever\nand another\n"
    assert backups(tmp_path) == {"img_000.txt": "caption 0\nsecond 0\n"}  # a new file has none
    after = snapshot(tmp_path)
    changed = {k for k in after if before.get(k) != after[k]}
    assert changed == {"img_000.txt", "img_004.txt"}
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert ReviewSession(open_review(tmp_path)).captions(4) == ["first caption ever", "and another"]


def test_jsonl_manifest_edit_rewrites_only_that_images_rows(tmp_path):
    make_images(tmp_path, 3)
    rows = [
        {"file_name": "img_000.png", "text": "zero", "extra": 1},
        {"file_name": "img_001.png", "text": "one a"},
        {"file_name": "img_001.png", "text": "one b"},
        {"file_name": "img_002.png", "text": ["two a", "two b"], "note": "ünïcode"},
    ]
    manifest = tmp_path / "captions.jsonl"
    original = "".join(json.dumps(r) + "\n" for r in rows)
    manifest.write_text(original)
    ds = open_review(manifest)
    assert isinstance(ds, ManifestDataset) and [e.name for e in ds.entries] == [
        "img_000.png", "img_001.png", "img_002.png",
    ]  # fmt: skip
    session = ReviewSession(ds)
    assert session.captions(1) == ["one a", "one b"]
    session.edit({1: ["ONE a", "ONE b"], 2: ["only one now"]})
    session.save()
    lines = manifest.read_text().splitlines()
    assert lines[0] == json.dumps(rows[0])  # untouched row: byte for byte
    assert json.loads(lines[1]) == {"file_name": "img_001.png", "text": "ONE a"}
    assert json.loads(lines[2]) == {"file_name": "img_001.png", "text": "ONE b"}
    assert json.loads(lines[3]) == {
        "file_name": "img_002.png", "text": "only one now", "note": "ünïcode",
    }  # fmt: skip
    assert backups(tmp_path) == {"captions.jsonl": original}
    session.edit({1: ["merged"]})  # fewer captions than rows: one row keeps them
    session.save()
    lines = manifest.read_text().splitlines()
    assert len(lines) == 3 and json.loads(lines[1])["text"] == "merged"
    from captioner.data.sources import load_all_rows

    loaded = load_all_rows(str(manifest))
    assert sorted(map(tuple, loaded["captions"])) == [("merged",), ("only one now",), ("zero",)]


def test_csv_manifest_edit_keeps_crlf_quoting_and_other_rows(tmp_path):
    make_images(tmp_path, 3)
    manifest = tmp_path / "captions.csv"
    original = (
        "image,caption,source\r\n"
        'img_000.png,"zero, with a comma",web\r\n'
        'img_001.png,"multi\r\nline",scan\r\n'
        "img_002.png,two,web\r\n"
    )
    manifest.write_bytes(original.encode())
    session = ReviewSession(open_review(manifest))
    assert session.captions(1) == ["multi line"]  # as the loaders read it
    session.edit({2: ["two, edited", 'with "quotes"']})
    session.save()
    text = manifest.read_bytes().decode()
    assert text.startswith(original[: original.index("img_002")])  # header and rows 0-1 kept
    rows = list(csv.reader(io.StringIO(text, newline="")))
    assert rows[3] == ["img_002.png", json.dumps(["two, edited", 'with "quotes"']), "web"]
    assert text.endswith("\r\n")
    assert ReviewSession(open_review(manifest)).captions(2) == ["two, edited", 'with "quotes"']
    assert backups(tmp_path) == {"captions.csv": original}


def test_imagefolder_metadata_edit_and_an_unlisted_image_gets_a_row(tmp_path):
    make_images(tmp_path, 3)
    meta = tmp_path / "metadata.jsonl"
    meta.write_text(
        json.dumps({"file_name": "img_000.png", "text": "zero"})
        + "\n"
        + json.dumps({"file_name": "img_001.png", "text": "one"})
        + "\n"
    )
    ds = open_review(tmp_path)
    assert isinstance(ds, ImagefolderDataset)
    session = ReviewSession(ds)
    names = [e.name for e in ds.entries]
    assert names == ["img_000.png", "img_001.png", "img_002.png"]
    assert session.captions(2) == []  # not listed: shown, without caption
    session.edit({0: ["ZERO"], 2: ["two, new"]})
    session.save()
    rows = [json.loads(line) for line in meta.read_text().splitlines()]
    assert rows == [
        {"file_name": "img_000.png", "text": "ZERO"},
        {"file_name": "img_001.png", "text": "one"},
        {"file_name": "img_002.png", "text": "two, new"},
    ]
    from captioner.data.sources import load_all_rows

    assert len(load_all_rows(str(tmp_path))) == 3


# ---- nothing outside the source ----


def test_paths_outside_the_source_are_refused_or_ignored(tmp_path):
    outside = tmp_path / "outside"
    make_images(outside, 1)
    (outside / "secret.txt").write_text("secret\n")
    src = tmp_path / "src"
    make_images(src, 2)
    (src / "img_000.txt").write_text("inside\n")
    (src / "linked.png").symlink_to(outside / "img_000.png")  # a symlinked image
    (src / "img_001.txt").symlink_to(outside / "secret.txt")  # a symlinked sidecar
    (src / "sub").symlink_to(outside, target_is_directory=True)  # a symlinked folder
    before_outside = snapshot(outside)
    ds = open_review(src)
    names = [e.name for e in ds.entries]
    assert names == ["img_000.png", "img_001.png"]  # the links are not followed
    assert any("linked.png" in n for n in ds.notes) and any("sub" in n for n in ds.notes)
    session = ReviewSession(ds)
    assert session.captions(1) == []  # the symlinked sidecar is not read...
    assert "symlink" in ds.entries[1].locked
    with pytest.raises(ReviewError):  # ...nor written through
        session.edit({1: ["overwrite"]})

    manifest = src / "m.jsonl"
    rows = [
        {"image": "img_000.png", "text": "ok"},
        {"image": "../outside/img_000.png", "text": "dotdot"},
        {"image": str(outside / "img_000.png"), "text": "absolute"},
        {"image": "linked.png", "text": "through a link"},
        {"image": "sub/img_000.png", "text": "through a linked folder"},
        {"image": "file:///etc/passwd", "text": "url"},
    ]
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ds = open_review(manifest)
    assert [e.name for e in ds.entries] == ["img_000.png"]
    assert len(ds.notes) == 5 and all("refused" in n for n in ds.notes)
    session = ReviewSession(ds)
    session.edit({0: ["edited"]})
    session.save()
    assert [json.loads(x) for x in manifest.read_text().splitlines()][1:] == rows[1:]
    assert snapshot(outside) == before_outside
    # the image route reads only checked paths; a file swapped for a link later is refused
    (src / "img_000.png").unlink()
    (src / "img_000.png").symlink_to(outside / "img_000.png")
    with pytest.raises(ReviewError):
        ds.image_bytes(0)


def test_manifest_write_refuses_a_symlinked_manifest_target(tmp_path):
    make_images(tmp_path, 1)
    real = tmp_path / "real.jsonl"
    real.write_text(json.dumps({"image": "img_000.png", "text": "a"}) + "\n")
    ds = open_review(real)
    real.rename(tmp_path / "moved.jsonl")
    (tmp_path / "real.jsonl").symlink_to(tmp_path / "moved.jsonl")
    session = ReviewSession(ds)
    session.edit({0: ["b"]})
    with pytest.raises(ReviewError, match="symlink"):
        session.save()
    assert json.loads((tmp_path / "moved.jsonl").read_text())["text"] == "a"


# ---- read-only sources ----


def _tar_shard(path: Path, images: list[Path]) -> None:
    with tarfile.open(path, "w") as tar:
        for i, img in enumerate(images):
            for ext, data in (("png", img.read_bytes()), ("txt", f"shard caption {i}".encode())):
                info = tarfile.TarInfo(f"{i:04d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_read_only_sources_open_with_a_note_and_export_as_a_folder(tmp_path):
    images = make_images(tmp_path / "imgs", 3)
    shard = tmp_path / "data.tar"
    _tar_shard(shard, images)
    ds = open_review(shard)
    assert ds.read_only and "webdataset" in ds.kind and "read-only" in ds.notes[-1]
    session = ReviewSession(ds)
    assert session.captions(1) == ["shard caption 1"]
    assert ds.image_bytes(1) == images[1].read_bytes()
    with pytest.raises(ReviewError, match="read-only"):
        session.edit({0: ["x"]})
    out = tmp_path / "editable"
    assert ds.export(out, session.captions) == 3
    exported = ReviewSession(open_review(out))
    assert [exported.captions(i) for i in range(3)] == [[f"shard caption {i}"] for i in range(3)]

    # save_to_disk and parquet go through datasets, as the loaders read them
    from captioner.data.sources import load_all_rows

    rows = load_all_rows(str(shard))
    rows.save_to_disk(str(tmp_path / "saved"))
    rows.to_parquet(str(tmp_path / "rows.parquet"))
    for src, kind in ((tmp_path / "saved", "save_to_disk"), (tmp_path / "rows.parquet", "parquet")):
        ds = open_review(src)
        assert ds.read_only and kind in ds.kind and len(ds.entries) == 3
        assert ReviewSession(ds).captions(2) == ["shard caption 2"]
        assert ds.image_bytes(0) == images[0].read_bytes()


# ---- bulk edits and undo ----


def test_bulk_edits_preview_apply_and_undo(tmp_path):
    sidecar_folder(tmp_path, n=3, uncaptioned=1)
    session = ReviewSession(open_review(tmp_path))
    edit = BulkEdit("replace", find=r"caption (\d)", replace=r"pic \1", regex=True)
    preview = session.bulk(edit)
    assert preview["count"] == 3 and not session.pending  # a preview stages nothing
    assert preview["changes"][0]["after"] == ["pic 0", "second 0"]
    session.bulk(edit, apply=True)
    session.bulk(BulkEdit("add_prefix", text="ohwx, "), apply=True)
    assert session.captions(0) == ["ohwx, pic 0", "ohwx, second 0"]
    assert session.captions(3) == []  # no caption: nothing to prefix
    again = session.bulk(BulkEdit("add_prefix", text="ohwx, "))
    assert again["count"] == 0  # a trigger word is added once
    plain = session.bulk(BulkEdit("replace", find="(", replace="\\1"))  # plain: no regex
    assert plain["count"] == 0
    assert session.bulk(BulkEdit("remove_word", text="second"), [0])["changes"][0]["after"] == [
        "ohwx, pic 0", "ohwx, 0",
    ]  # fmt: skip
    session.undo()
    assert session.captions(0) == ["pic 0", "second 0"]
    session.undo()
    assert not session.pending and session.captions(0) == ["caption 0", "second 0"]
    with pytest.raises(ReviewError, match="regular expression"):
        BulkEdit("replace", find="(", regex=True)
    session.exclude([1])
    name = session.write_cleaned()
    kept = [json.loads(x)["file_name"] for x in (tmp_path / name).read_text().splitlines()]
    assert kept == ["img_000.png", "img_002.png"]


def test_search_filters_and_paging(tmp_path):
    sidecar_folder(tmp_path, n=5, uncaptioned=2)
    session = ReviewSession(open_review(tmp_path))
    assert session.page(0, 3) == (7, [0, 1, 2])
    assert session.page(0, 10, "CAPTION 3") == (1, [3])
    assert session.page(0, 10, r"caption [24]", regex=True) == (2, [2, 4])
    assert session.page(0, 10, finding="no caption") == (2, [5, 6])
    session.edit({5: ["x"]})
    assert session.page(0, 10, finding="unsaved") == (1, [5])


# ---- the HTTP API ----


class FakeCaptioner:
    """caption_iter like the engine's: a caption per image from its size, or its error."""

    def caption_iter(self, images, decoding=None, *, batch_size=None, num_workers=None):
        from captioner.data.images import load_image

        for i, data in enumerate(images):
            try:
                img = load_image(data)
            except BadImageError as err:
                yield i, err
                continue
            yield i, f"a picture of {img.size[0]} by {img.size[1]} pixels"


def wait_for(fn, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = fn()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError("timed out")


def test_api_edit_save_undo_thumbnails_and_model_suggestions(tmp_path):
    src = tmp_path / "src"
    sidecar_folder(src, n=3, uncaptioned=2)
    app = create_review_app(
        open_review(src), FakeCaptioner(), model_name="fake", thumbs=tmp_path / "thumbs"
    )
    with TestClient(app) as client:
        info = client.get("/api/info").json()
        assert info["total"] == 5 and not info["read_only"] and info["model"] == "fake"
        page = client.get("/api/items", params={"limit": 2}).json()
        assert page["total"] == 5 and [x["id"] for x in page["items"]] == [0, 1]
        thumb = client.get("/api/thumb/0")
        assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
        assert len(list((tmp_path / "thumbs").rglob("*.jpg"))) == 1
        assert client.get("/api/image/1").headers["content-type"] == "image/png"
        r = client.put("/api/items/0", json={"captions": ["edited\nsecond line", " "]})
        assert r.json()["unsaved"] == 1 and r.json()["item"]["captions"] == [
            "edited",
            "second line",
        ]
        assert client.post("/api/undo").json()["unsaved"] == 0
        client.put("/api/items/1", json={"captions": ["one edited"]})
        job = client.post("/api/caption", json={"uncaptioned": True}).json()
        assert job["total"] == 2
        done = wait_for(lambda: (s := client.get("/api/caption").json())["running"] is False and s)
        assert set(done["suggestions"]) == {"3", "4"}
        assert done["suggestions"]["3"]["caption"] == "a picture of 48 by 48 pixels"
        client.post("/api/caption", json={"ids": [0]})
        scored = wait_for(
            lambda: (s := client.get("/api/caption").json())["running"] is False and s
        )
        assert scored["suggestions"]["0"]["wer"] is not None  # scored against its captions
        assert scored["suggestions"]["0"]["cider"] is not None
        assert client.post("/api/suggestions/3/accept").json()["unsaved"] == 2
        assert client.post("/api/suggestions/4/reject").status_code == 200
        saved = client.post("/api/save").json()
        assert saved["files"] == ["img_001.txt", "img_003.txt"] and len(saved["backups"]) == 1
    assert (src / "img_003.txt").read_text() == "a picture of 48 by 48 pixels\n"
    assert not (src / "img_004.txt").exists()


def test_api_errors_are_json_4xx_and_guards_apply(tmp_path):
    sidecar_folder(tmp_path / "src", n=2)
    ds = open_review(tmp_path / "src")
    app = create_review_app(
        ds, api_key="sekret", allowed_hosts=["127.0.0.1", "testserver"], thumbs=tmp_path / "t"
    )
    with TestClient(app) as client:
        page = client.get("/")
        assert page.status_code == 200 and "review.js" in page.text
        assert "http://" not in page.text and "https://" not in page.text
        js = client.get("/review.js")
        assert js.status_code == 200 and "http://" not in js.text and "https://" not in js.text
        assert client.get("/api/info").status_code == 401
        key = {"X-API-Key": "sekret"}
        answers = [
            client.get("/api/items/99", headers=key),
            client.get("/api/items", params={"limit": 10_000}, headers=key),
            client.get("/api/items", params={"q": "(", "regex": "true"}, headers=key),
            client.put("/api/items/0", json={"captions": "not a list"}, headers=key),
            client.put(
                "/api/items/0", content=b"{", headers={**key, "content-type": "application/json"}
            ),
            client.post("/api/bulk", json={"op": "nope"}, headers=key),
            client.post(
                "/api/bulk", json={"op": "replace", "find": "(", "regex": True}, headers=key
            ),
            client.post("/api/exclude", json={"ids": [5]}, headers=key),
            client.post("/api/caption", json={"uncaptioned": True}, headers=key),  # no model
            client.post("/api/export", headers=key),  # no export folder
            client.get("/api/thumb/-1", headers=key),
            client.post("/api/suggestions/0/accept", headers=key),
            client.get("/api/info", headers={**key, "host": "evil.example"}),
            client.post("/api/save", headers={**key, "origin": "http://evil.example"}),
        ]
        for r in answers:
            assert 400 <= r.status_code < 500, (r.request.url, r.status_code, r.text)
            assert "detail" in r.json()
        login = client.post("/api/login", json={"key": "sekret"})
        assert login.status_code == 200
        assert client.get("/api/info").status_code == 200  # the cookie the page got
        assert client.post("/api/save", headers={"origin": "http://testserver"}).status_code == 200


def test_read_only_source_api_refuses_edits_and_exports(tmp_path):
    images = make_images(tmp_path / "imgs", 2)
    _tar_shard(tmp_path / "d.tar", images)
    app = create_review_app(
        open_review(tmp_path / "d.tar"), export_dir=tmp_path / "out", thumbs=tmp_path / "t"
    )
    with TestClient(app) as client:
        assert client.get("/api/info").json()["read_only"] is True
        assert client.put("/api/items/0", json={"captions": ["x"]}).status_code == 409
        assert (
            client.post(
                "/api/bulk", json={"op": "add_prefix", "text": "a", "apply": True}
            ).status_code
            == 409
        )
        assert client.get("/api/thumb/1").status_code == 200
        r = client.post("/api/export")
        assert r.status_code == 200 and r.json()["images"] == 2
        assert client.post("/api/export").status_code == 409  # not over an existing folder
    assert sorted(p.name for p in (tmp_path / "out").iterdir())[:2] == [
        "00000-0000.png",
        "00000-0000.txt",
    ]


# ---- the page in a browser ----


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_browser_review_edit_bulk_and_model_captions(tmp_path, chatty_model_dir):
    if not Path(CHROMIUM).exists():
        assert not os.environ.get("CI"), f"{CHROMIUM} missing in CI: `make browser` failed"
        pytest.skip(f"{CHROMIUM} not installed (`make browser` installs Debian's chromium)")
    sync_api = pytest.importorskip("playwright.sync_api")
    import uvicorn

    from captioner.engine import Captioner

    src = tmp_path / "photos"
    images = make_images(src, 33)
    for i, p in enumerate(images[:30]):
        p.with_suffix(".txt").write_text(f"a shape number {i}\n")
    before = snapshot(src)
    captioner = Captioner.from_pretrained(chatty_model_dir, device="cpu")
    app = create_review_app(
        open_review(src), captioner, model_name="chatty", thumbs=tmp_path / "thumbs",
        allowed_hosts=["127.0.0.1"],
    )  # fmt: skip
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_for(lambda: server.started, timeout=20)
    base = f"http://127.0.0.1:{port}/"
    accepted = []
    try:
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(
                executable_path=CHROMIUM,
                args=["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                      "--disable-component-update", "--disable-sync", "--no-first-run"],
            )  # fmt: skip
            try:
                page = browser.new_page(viewport={"width": 1280, "height": 900})
                remote = []
                page.on("request", lambda req: remote.append(req.url))
                page.goto(base)
                page.wait_for_selector("body[data-ready='1']")
                assert page.locator(".card").count() == 33
                kb = page.keyboard
                # edit image 0 and image 1 with the keyboard only, then save
                kb.press("e")
                kb.press("Control+a")
                kb.type("a hand-edited caption")
                kb.press("Enter")
                page.wait_for_function("document.getElementById('unsaved').textContent === '1'")
                kb.press("j")
                kb.press("Enter")
                kb.press("Control+a")
                kb.type("second edit")
                kb.press("Shift+Enter")
                kb.type("with a second caption")
                kb.press("Enter")
                page.wait_for_function("document.getElementById('unsaved').textContent === '2'")
                kb.press("Control+s")
                page.wait_for_function(
                    "document.getElementById('msg').textContent.startsWith('saved 2')"
                )
                assert page.text_content("#unsaved") == "0"
                # bulk: add a trigger word to every caption, preview first
                page.click("#bulk summary")
                page.select_option("#bulkop", "add_prefix")
                page.fill("#bulktext", "ohwx, ")
                page.click("#bulkpreview")
                page.wait_for_selector("#bulkcount[data-count='30']")
                page.click("#bulkapply")
                page.wait_for_function("document.getElementById('unsaved').textContent === '30'")
                page.click("#save")
                page.wait_for_function(
                    "document.getElementById('msg').textContent.startsWith('saved 30')"
                )
                # caption the three uncaptioned images with the model, accept two
                page.click("#model summary")
                page.click("#capmissing")
                page.wait_for_function(
                    "document.getElementById('capstate').textContent.startsWith('3/3')",
                    timeout=120_000,
                )
                page.select_option("#finding", "no caption")
                page.wait_for_function("document.querySelectorAll('.card').length === 3")
                page.focus("#grid")
                for _ in range(2):
                    page.wait_for_selector("#suggestion:not([hidden])")
                    accepted.append(page.text_content("#sugcaption"))
                    kb.press("a")
                    page.wait_for_function(
                        "document.getElementById('msg').textContent.startsWith('accepted')"
                    )
                    page.evaluate("document.getElementById('msg').textContent = ''")
                    kb.press("j")
                page.wait_for_function("document.getElementById('unsaved').textContent === '2'")
                kb.press("Control+s")
                page.wait_for_function(
                    "document.getElementById('msg').textContent.startsWith('saved 2')"
                )
                page.select_option("#finding", "")
                page.wait_for_function("document.querySelectorAll('.card').length === 33")
                ARTIFACTS.mkdir(exist_ok=True)
                page.screenshot(path=str(ARTIFACTS / "review_page.png"), full_page=True)
            finally:
                browser.close()
    finally:
        server.should_exit = True
        thread.join(timeout=10)

    assert all(u.startswith(base) for u in remote), [u for u in remote if not u.startswith(base)]
    assert all(c.strip() for c in accepted) and len(accepted) == 2
    expected = {f"img_{i:03d}.txt": f"ohwx, a shape number {i}\n" for i in range(2, 30)}
    expected["img_000.txt"] = "ohwx, a hand-edited caption\n"
    expected["img_001.txt"] = "ohwx, second edit\nohwx, with a second caption\n"
    expected["img_030.txt"] = accepted[0] + "\n"
    expected["img_031.txt"] = accepted[1] + "\n"
    for name, text in expected.items():
        assert (src / name).read_text() == text, name
    assert not (src / "img_032.txt").exists()
    after = snapshot(src)
    changed = {k for k in set(before) | set(after) if before.get(k) != after.get(k)}
    assert changed == set(expected)  # nothing else changed: images, other files
    kept = backups(src)  # the first backup of each file is its original
    assert kept == {f"img_{i:03d}.txt": f"a shape number {i}\n" for i in range(30)}
    assert len(list((src / BACKUP_DIR).iterdir())) == 2  # one folder per save that replaced files
    assert (ARTIFACTS / "review_page.png").stat().st_size > 5_000


def test_data_check_findings_run_in_the_background_and_filter_the_grid(tmp_path):
    src = tmp_path / "src"
    images = sidecar_folder(src, n=6, uncaptioned=1)
    images[1].write_bytes(images[0].read_bytes())  # an exact duplicate
    (src / "img_002.png").write_bytes(b"not an image")  # unreadable
    app = create_review_app(open_review(src), thumbs=tmp_path / "t")
    with TestClient(app) as client:
        assert client.get("/api/findings").json()["status"] == "not run"
        client.post("/api/findings")
        state = wait_for(
            lambda: (s := client.get("/api/findings").json())["status"] != "running" and s
        )
        assert state["status"] == "done", state
        dup = client.get("/api/items", params={"finding": "exact duplicate"}).json()
        bad = client.get("/api/items", params={"finding": "unreadable image"}).json()
        none = client.get("/api/items", params={"finding": "no caption"}).json()
        thumb = client.get("/api/thumb/2")
    assert [x["id"] for x in dup["items"]] == [0, 1]
    assert [x["id"] for x in bad["items"]] == [2]
    assert [x["id"] for x in none["items"]] == [6]
    assert thumb.status_code == 422 and "detail" in thumb.json()


def test_the_review_command_refuses_a_missing_source_in_one_line(tmp_path):
    from typer.testing import CliRunner

    from captioner.cli import app
    from captioner.errors import CaptionerError

    result = CliRunner().invoke(app, ["review", str(tmp_path / "nowhere")])
    # main() prints a CaptionerError as one `error:` line
    assert isinstance(result.exception, CaptionerError), result.output
    assert "nowhere" in str(result.exception) and "\n" not in str(result.exception)
