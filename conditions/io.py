"""Reading images with errors that name the file."""

from __future__ import annotations

import io
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

from conditions.base import to_uint8_hwc

# The largest image read_image decodes, in pixels (width x height): 8192x8192, the largest a ControlNet user feeds.
# It is checked from the file's header before any pixel is decoded, so a decompression bomb (a small file whose
# header claims 100000x100000) costs nothing. ``read_image(..., max_pixels=...)`` and the data/extract configs'
# ``max_image_pixels`` change it.
MAX_IMAGE_PIXELS = 8192 * 8192


class ImageDecodeError(ValueError):
    """An image file is missing, too large or cannot be decoded; the message names the file."""


def read_image(path: str | Path, max_pixels: int | None = None) -> np.ndarray:
    """Read an image file as an HxWx3 uint8 RGB array (grayscale repeated, alpha composited on white).

    Args:
        max_pixels: the largest width x height decoded (default ``MAX_IMAGE_PIXELS``); larger images are refused
            from their header, before decoding.
    Raises:
        ImageDecodeError: the file does not exist, is larger than ``max_pixels``, or does not decode (truncated,
            corrupt, not an image, anything the decoder raises).
    """
    path = Path(path)
    if not path.is_file():
        raise ImageDecodeError(f"image file not found: {path}")
    return _decode(path, str(path), max_pixels)


def decode_image(data: bytes, name: str, max_pixels: int | None = None) -> np.ndarray:
    """``read_image`` for an encoded image in memory (a tar member); ``name`` names it in errors."""
    return _decode(io.BytesIO(data), name, max_pixels)


def _decode(source, name: str, max_pixels: int | None) -> np.ndarray:
    limit = MAX_IMAGE_PIXELS if max_pixels is None else int(max_pixels)
    try:
        with warnings.catch_warnings():
            # our own limit decides; PIL's bomb warning/error between its limits is not a second opinion we need
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(source) as image:
                width, height = image.size
                if width * height > limit:
                    raise ImageDecodeError(
                        f"image {name} is {width}x{height} = {width * height} pixels, over the limit of {limit} "
                        f"(max_image_pixels); a decompression bomb or an image to shrink first"
                    )
                image.load()
                return _to_rgb_array(image)
    except ImageDecodeError:
        raise
    except Exception as error:  # PIL raises many types for bad files (OSError, SyntaxError, DecompressionBombError...)
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        reason = reason.replace(repr(source), repr(name))  # PIL names an in-memory file by its repr
        raise ImageDecodeError(f"cannot decode image {name}: {type(error).__name__}: {reason}") from error


def _to_rgb_array(image: Image.Image) -> np.ndarray:
    if image.mode in ("I;16", "I;16B", "I", "F"):
        # 16-bit and float images: scale to 8 bit instead of letting PIL clip them.
        array = np.asarray(image, dtype=np.float64)
        peak = array.max() if array.size else 0.0
        array = (array / peak * 255.0) if peak > 0 else array
        return to_uint8_hwc(array.clip(0, 255).astype(np.uint8))
    if image.mode not in ("RGB", "RGBA", "L"):
        image = image.convert("RGBA" if "A" in image.mode or "transparency" in image.info else "RGB")
    return to_uint8_hwc(np.asarray(image))


class UnwritableFolderError(ValueError):
    """A folder that output should go to cannot be written; the message names it and the reason."""


def check_writable_dir(folder: str | Path, what: str) -> None:
    """Raise a one-line error when ``folder`` (or, if it does not exist yet, the nearest existing folder above it)
    cannot be written: tried for real with a temporary folder, since root passes ``os.access`` on read-only file
    systems and in ``/sys``."""
    folder = Path(folder).expanduser().absolute()
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UnwritableFolderError(f"cannot write {what} {folder}: {existing} is a file, not a folder")
    try:
        Path(tempfile.mkdtemp(prefix=".ctrlkit-write-check-", dir=existing)).rmdir()
    except OSError as error:
        raise UnwritableFolderError(
            f"cannot write {what} {folder}: {error.strerror or error} in {existing}"
        ) from error


def write_atomically(path: Path, content: str | bytes) -> None:
    """Write ``content`` to ``path`` through a temporary file and a rename: readers see the old or the new file."""
    temporary = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        temporary.write_bytes(content.encode() if isinstance(content, str) else content)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
