"""Safe image loading: one function that turns anything image-like into an RGB PIL image.

Every path into a model (training, eval, captioning, the server) goes through `load_image`, so a
bad file fails here with `BadImageError(file, reason)` instead of deep inside a processor.
"""

from __future__ import annotations

import contextlib
import io
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from captioner.errors import BadImageError

DEFAULT_MAX_PIXELS = 50_000_000  # ~7000 x 7000; far beyond what any captioning model looks at
DEFAULT_MIN_SIZE = 2  # a 0x0 or 1x1 image has nothing to caption
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
WHITE = (255, 255, 255)


def load_image(
    src: Any,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    min_size: int = DEFAULT_MIN_SIZE,
) -> Image.Image:
    """Open `src` (path, bytes, PIL image or a datasets image dict) as an upright RGB image.

    The pixel count is checked from the header, before anything is decoded, so a decompression
    bomb costs nothing. `max_pixels=None` turns our limit off (PIL's own limit still applies).
    """
    name, opener = _opener(src)
    with _reasons(name), opener() as img:
        _check_size(name, img.size, max_pixels, min_size)
        img.load()
        return to_rgb(ImageOps.exif_transpose(img))


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
        raise BadImageError(name, "not an image (unrecognised format)") from None
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


def _open_path(path: Path) -> Image.Image:
    if path.is_file() and path.stat().st_size == 0:
        raise BadImageError(path, "empty file (0 bytes)")
    return Image.open(path)


def _open_bytes(data: bytes, name: str) -> Image.Image:
    if not data:
        raise BadImageError(name, "empty file (0 bytes)")
    return Image.open(io.BytesIO(data))


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
