"""load_image: every mode to RGB, EXIF applied, and each kind of bad file named with a reason."""

import io

import pytest
from conftest import png_header
from PIL import Image

from captioner.data.images import DEFAULT_MAX_PIXELS, load_image
from captioner.errors import BadImageError


def png_bytes(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


@pytest.mark.parametrize(
    "img, expected",
    [
        (Image.new("RGBA", (4, 4), (255, 0, 0, 0)), (255, 255, 255)),  # transparent -> white
        (Image.new("RGBA", (4, 4), (255, 0, 0, 255)), (255, 0, 0)),
        (Image.new("LA", (4, 4), (0, 0)), (255, 255, 255)),
        (Image.new("CMYK", (4, 4), (0, 255, 255, 0)), (255, 0, 0)),
        (Image.new("I;16", (4, 4), 65535), (255, 255, 255)),  # not clipped garbage
        (Image.new("I;16", (4, 4), 32896), (128, 128, 128)),
        (Image.new("1", (4, 4), 1), (255, 255, 255)),
        (Image.new("L", (4, 4), 7), (7, 7, 7)),
    ],
)
def test_every_mode_becomes_rgb(img, expected):
    out = load_image(img)
    assert out.mode == "RGB" and out.size == (4, 4)
    assert out.getpixel((1, 1)) == expected


def test_palette_transparency_composited_on_white(tmp_path):
    img = Image.new("P", (4, 4), 1)
    img.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)
    img.putpixel((0, 0), 0)
    path = tmp_path / "p.png"
    img.save(path, transparency=0)
    out = load_image(path)
    assert out.getpixel((0, 0)) == (255, 255, 255)
    assert out.getpixel((2, 2)) == (0, 0, 255)


def test_exif_orientation_applied(tmp_path):
    img = Image.new("RGB", (20, 10), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    path = tmp_path / "rotated.jpg"
    img.save(path, exif=exif)
    assert Image.open(path).size == (20, 10)
    assert load_image(path).size == (10, 20)


def test_accepts_bytes_dicts_and_pil(tmp_path):
    data = png_bytes(Image.new("RGB", (5, 3), (1, 2, 3)))
    path = tmp_path / "x.png"
    path.write_bytes(data)
    for src in (data, {"bytes": data, "path": "x.png"}, {"bytes": None, "path": str(path)}, path):
        out = load_image(src)
        assert out.size == (5, 3) and out.getpixel((0, 0)) == (1, 2, 3)


@pytest.mark.parametrize(
    "make, reason",
    [
        (lambda p: p.write_bytes(b""), "empty file"),
        (lambda p: p.write_text("hello, not a picture"), "not an image"),
        (lambda p: p.write_bytes(png_bytes(Image.effect_noise((64, 64), 50))[:300]), "truncated"),
        (
            lambda p: p.write_bytes(png_bytes(Image.effect_noise((64, 64), 50), "JPEG")[:400]),
            "truncated",
        ),
        (lambda p: p.write_bytes(png_header(10_000, 10_000)), "too many pixels"),
        (lambda p: p.write_bytes(png_header(1, 1)), "too small"),
        (lambda p: p.write_bytes(png_header(0, 0)), "not an image"),  # PIL refuses a 0x0 header
        (lambda p: None, "file not found"),
        (lambda p: p.mkdir(), "directory"),
    ],
)
def test_bad_files_name_file_and_reason(tmp_path, make, reason):
    path = tmp_path / "bad.png"
    make(path)
    with pytest.raises(BadImageError) as info:
        load_image(path)
    assert info.value.path == str(path)
    assert reason in info.value.reason
    assert str(path) in str(info.value)


def test_pixel_limit_is_configurable_and_checked_before_decoding():
    assert DEFAULT_MAX_PIXELS == 50_000_000
    small = png_bytes(Image.new("RGB", (100, 100)))
    with pytest.raises(BadImageError, match="too many pixels"):
        load_image(small, max_pixels=9_999)
    assert load_image(small, max_pixels=10_000).size == (100, 100)
    # beyond PIL's own bomb limit the header alone is refused, even with our limit off
    with pytest.raises(BadImageError, match="too many pixels"):
        load_image(png_header(20_000, 20_000), max_pixels=None)


def test_min_size_is_a_parameter():
    tiny = png_bytes(Image.new("RGB", (3, 3)))
    assert load_image(tiny).size == (3, 3)
    with pytest.raises(BadImageError, match="too small"):
        load_image(tiny, min_size=4)


def test_dict_bytes_are_named_by_their_path():
    with pytest.raises(BadImageError) as info:
        load_image({"bytes": b"junk", "path": "shard.tar/k.jpg"})
    assert info.value.path == "shard.tar/k.jpg"
    with pytest.raises(BadImageError, match="cannot read an image from a int"):
        load_image(42)


def test_check_image_needs_no_decoding_but_sees_headers_and_png_truncation(tmp_path):
    from captioner.data.images import check_image

    noise = Image.effect_noise((64, 64), 60).convert("RGB")
    png, jpg = png_bytes(noise), png_bytes(noise, "JPEG")
    check_image(png)  # a good image passes, and stays usable afterwards
    assert load_image(png).size == (64, 64)
    for data, reason in [
        (png[:500], "truncated"),  # PNG's structural check reads every chunk
        (png_header(10_000, 10_000), "too many pixels"),
        (png_header(1, 1), "too small"),
        (b"just text", "not an image"),
    ]:
        with pytest.raises(BadImageError, match=reason):
            check_image(data)
    # a JPEG cut inside its pixel data has a valid header: only decoding finds it
    cut = jpg[: len(jpg) * 2 // 3]
    check_image(cut)
    with pytest.raises(BadImageError, match="truncated"):
        load_image(cut)
