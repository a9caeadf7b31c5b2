"""Safe image loading: one function that turns anything image-like into an RGB PIL image.

Every path into a model (training, eval, captioning, the server) goes through `load_image`, so a
bad file fails here with `BadImageError(file, reason)` instead of deep inside a processor.

Hostile files are expected. Only the Pillow plugins in `ALLOWED_FORMATS` ever see the bytes (an
unknown format is `NotAnImageError`, never a guess by every plugin Pillow has), the pixel limit
is checked from the header before anything is decoded, and a TIFF whose tiles are larger than the
image (a small header over a huge tile: the decoder allocates the tile, not the image) is refused.
Only the first frame of an animated or multi-page file is ever decoded. Paths are opened
without blocking and must be regular files, so a FIFO or a device is a bad image, not a hang.
"""

from __future__ import annotations

import contextlib
import io
import os
import stat
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageMode, ImageOps, PngImagePlugin, UnidentifiedImageError

from captioner.errors import BadImageError

DEFAULT_MAX_PIXELS = 50_000_000  # ~7000 x 7000; far beyond what any captioning model looks at
DEFAULT_MIN_SIZE = 2  # a 0x0 or 1x1 image has nothing to caption
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
# Formats a browser, a camera or a dataset produces (JPEG's plugin also opens the MPO files many
# phones write). Every other Pillow plugin (PSD, EPS, PCD, ICO, ...) never sees the bytes.
ALLOWED_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")
# A tile may overhang the image (tile sides are multiples of 16), but the decoder allocates the
# whole tile: beyond this many pixels, a tile must not be larger than the image it belongs to.
MAX_TILE_OVERHANG_PIXELS = 1024 * 1024
WHITE = (255, 255, 255)
_TIFF_TILE_WIDTH, _TIFF_TILE_LENGTH = 322, 323
# Pillow inflates every PNG text chunk while it reads the header, before any check of ours, up
# to 64 MB per image by default (100 zTXt chunks of 1 MB each); real metadata (XMP, comments)
# is far smaller. Process-wide on purpose: every image in captioner is opened here.
PngImagePlugin.MAX_TEXT_MEMORY = min(PngImagePlugin.MAX_TEXT_MEMORY, 4 * 1024 * 1024)


class NotAnImageError(BadImageError):
    """Not an image, or a format outside `ALLOWED_FORMATS` (the server answers 415)."""


def load_image(
    src: Any,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    min_size: int = DEFAULT_MIN_SIZE,
) -> Image.Image:
    """Open `src` (path, bytes, PIL image or a datasets image dict) as an upright RGB image.

    The pixel count is checked from the header, before anything is decoded, so a decompression
    bomb costs nothing. `max_pixels=None` turns our limit off (PIL's own limit still applies).
    """
    with open_checked(src, max_pixels, min_size) as img:
        return decode_rgb(img, _opener(src)[0])


@contextlib.contextmanager
def open_checked(
    src: Any,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    min_size: int = DEFAULT_MIN_SIZE,
) -> Iterator[Image.Image]:
    """The image with its header read and checked, nothing decoded yet: for a caller that must
    know the cost of decoding (`decoded_bytes`) before paying it. `decode_rgb` finishes it.
    Exceptions raised by the caller inside the block pass through untouched."""
    name, opener = _opener(src)
    stack = contextlib.ExitStack()
    try:
        with _reasons(name):
            img = stack.enter_context(opener())
            _check_size(name, img.size, max_pixels, min_size)
            _check_layout(name, img, max_pixels)
    except BaseException:
        stack.close()
        raise
    with stack:
        yield img


def decode_rgb(img: Image.Image, name: str | None = None) -> Image.Image:
    """Decode an image from `open_checked` (its first frame only) into an upright RGB image;
    `name` is the file named in errors."""
    with _reasons(name or getattr(img, "filename", "") or "<image>"):
        img.load()
        return to_rgb(ImageOps.exif_transpose(img))


def decoded_bytes(size: tuple[int, int], mode: str) -> int:
    """Memory that decoding an image of `size`/`mode` holds at its peak: the decoded pixels plus
    the RGB copy made from them (an upper bound: a file already in RGB needs no copy)."""
    w, h = size
    try:
        info = ImageMode.getmode(mode)
        per_pixel = len(info.bands) * int(info.typestr[-1])
    except (KeyError, ValueError):
        per_pixel = 4
    return w * h * (max(per_pixel, 1) + 3)


def check_image(
    src: Any,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    min_size: int = DEFAULT_MIN_SIZE,
) -> None:
    """The checks of `load_image` that need no pixel decoding: readable header, size limits, and
    the format's own structural check (`verify`: PNG chunk CRCs and truncation, ...). Cheap enough
    to run over a whole dataset at load time; `load_image` still catches what it cannot see (a
    truncated JPEG body), and every consumer skips such an image when it meets it."""
    name, opener = _opener(src)
    with _reasons(name), opener() as img:
        _check_size(name, img.size, max_pixels, min_size)
        _check_layout(name, img, max_pixels)
        if not isinstance(src, Image.Image):  # verify() leaves an image unusable: never a caller's
            img.verify()


@contextlib.contextmanager
def _reasons(name: str) -> Iterator[None]:
    """Turn whatever PIL raises on a bad file into a BadImageError naming the file and why."""
    try:
        with warnings.catch_warnings():
            # PIL warns above its own limit and raises at twice it; we apply `max_pixels` ourselves.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            yield
    except BadImageError:
        raise
    except FileNotFoundError:
        raise BadImageError(name, "file not found") from None
    except IsADirectoryError:
        raise BadImageError(name, "is a directory, not an image") from None
    except UnidentifiedImageError:
        raise NotAnImageError(name, "not an image (unrecognised format)") from None
    except Image.DecompressionBombError as err:
        raise BadImageError(name, f"too many pixels ({err})") from None
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        raise BadImageError(name, f"truncated or corrupt image ({err})") from None
    except Exception as err:  # hostile files make PIL's decoders raise struct.error, IndexError...
        raise BadImageError(name, f"corrupt image ({type(err).__name__}: {err})") from None


def source_name(src: Any, fallback: str | None = None) -> str:
    """A short printable name for an image source (errors, output rows, reports)."""
    if isinstance(src, dict) and src.get("path"):
        return str(src["path"])
    if isinstance(src, (str, os.PathLike)):
        return str(src)
    if isinstance(src, Image.Image) and getattr(src, "filename", ""):
        return src.filename
    if fallback is not None:
        return fallback
    if isinstance(src, Image.Image):
        return "<PIL image>"
    return (
        "<image bytes>" if isinstance(src, (dict, bytes, bytearray, memoryview)) else repr(src)[:80]
    )


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB: transparency is composited on white, 16-bit is rescaled."""
    if img.mode == "RGB":
        return img
    if img.mode in ("RGBA", "LA", "PA", "La") or (img.mode == "P" and "transparency" in img.info):
        white = Image.new("RGBA", img.size, WHITE + (255,))
        return Image.alpha_composite(white, img.convert("RGBA")).convert("RGB")
    if img.mode.startswith("I") or img.mode == "F":
        # 16/32-bit greyscale: a plain convert() clips everything above 255 to white.
        arr = np.asarray(img, dtype=np.float64)
        peak = float(arr.max()) if arr.size else 0.0
        scale = 65535.0 if img.mode.startswith("I;16") or 255 < peak <= 65535 else max(peak, 255.0)
        arr = np.clip(arr / scale * 255.0, 0, 255).round()
        return Image.fromarray(arr.astype(np.uint8), "L").convert("RGB")
    return img.convert("RGB")  # L, 1, P, CMYK, YCbCr, ...


def _opener(src: Any) -> tuple[str, Any]:
    """Return (name for messages, zero-argument function that opens the image)."""
    if isinstance(src, dict):  # datasets' Image(decode=False) value: {"bytes": ..., "path": ...}
        path, data = src.get("path"), src.get("bytes")
        if data is not None:
            name = str(path or "<bytes>")
            return name, lambda: _open_bytes(data, name)
        if path is None:
            return "<empty image record>", lambda: _open_bytes(b"", "<empty image record>")
        src = path
    if isinstance(src, (bytes, bytearray, memoryview)):
        return "<bytes>", lambda: _open_bytes(bytes(src), "<bytes>")
    if isinstance(src, Image.Image):
        return getattr(src, "filename", "") or "<image>", lambda: _Borrowed(src)
    if isinstance(src, (str, os.PathLike)):
        return str(src), lambda: _open_path(Path(src))
    raise BadImageError(repr(src)[:80], f"cannot read an image from a {type(src).__name__}")


@contextlib.contextmanager
def _open_path(path: Path) -> Iterator[Image.Image]:
    # O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer forever.
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    with open(fd, "rb") as file:
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode):
            raise BadImageError(path, "is a directory, not an image")
        if not stat.S_ISREG(info.st_mode):
            raise BadImageError(path, f"not a regular file ({_file_kind(info.st_mode)})")
        if info.st_size == 0:
            raise BadImageError(path, "empty file (0 bytes)")
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        with Image.open(file, formats=ALLOWED_FORMATS) as img:
            img.filename = str(path)  # as Image.open(path) would name it
            yield img


def _open_bytes(data: bytes, name: str) -> Image.Image:
    if not data:
        raise NotAnImageError(name, "empty file (0 bytes)")
    return Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)


def _file_kind(mode: int) -> str:
    kinds = [(stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device")]
    kinds += [(stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")]
    return next((what for test, what in kinds if test(mode)), "not a file")


def _check_layout(name: str, img: Image.Image, max_pixels: int | None) -> None:
    """What the decoder will allocate beyond the header's size: a TIFF's tiles."""
    tags = getattr(img, "tag_v2", None)
    if img.format != "TIFF" or tags is None:
        return
    tile_w, tile_h = tags.get(_TIFF_TILE_WIDTH), tags.get(_TIFF_TILE_LENGTH)
    if tile_w is None and tile_h is None:
        return  # striped: the decoder clips strips to the image
    if not isinstance(tile_w, int) or not isinstance(tile_h, int) or min(tile_w, tile_h) < 1:
        raise BadImageError(name, "corrupt TIFF (invalid tile size)")
    w, h = img.size
    tile = tile_w * tile_h
    if tile > max(w * h, MAX_TILE_OVERHANG_PIXELS) or (max_pixels and tile > max_pixels):
        raise BadImageError(
            name, f"TIFF tile {tile_w}x{tile_h} is larger than the {w}x{h} image (refused)"
        )


def _check_size(name: str, size: tuple[int, int], max_pixels: int | None, min_size: int) -> None:
    w, h = size
    if max_pixels is not None and w * h > max_pixels:
        raise BadImageError(name, f"too many pixels ({w}x{h} = {w * h:,} > {max_pixels:,})")
    if min(w, h) < min_size:
        raise BadImageError(name, f"too small ({w}x{h}; at least {min_size} px a side needed)")


class _Borrowed:
    """A context manager around an already-open PIL image that does not close it on exit."""

    def __init__(self, img: Image.Image) -> None:
        self.img = img

    def __enter__(self) -> Image.Image:
        return self.img

    def __exit__(self, *exc: object) -> None:
        return None
