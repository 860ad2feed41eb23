"""Reading images with errors that name the file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from conditions.base import to_uint8_hwc


class ImageDecodeError(ValueError):
    """An image file is missing or cannot be decoded; the message names the file."""


def read_image(path: str | Path) -> np.ndarray:
    """Read an image file as an HxWx3 uint8 RGB array (grayscale repeated, alpha composited on white).

    Raises:
        ImageDecodeError: the file does not exist or is not a decodable image.
    """
    path = Path(path)
    if not path.is_file():
        raise ImageDecodeError(f"image file not found: {path}")
    try:
        with Image.open(path) as image:
            image.load()
            if image.mode in ("I;16", "I;16B", "I", "F"):
                # 16-bit and float images: scale to 8 bit instead of letting PIL clip them.
                array = np.asarray(image, dtype=np.float64)
                peak = array.max() if array.size else 0.0
                array = (array / peak * 255.0) if peak > 0 else array
                return to_uint8_hwc(array.clip(0, 255).astype(np.uint8))
            if image.mode not in ("RGB", "RGBA", "L"):
                image = image.convert("RGBA" if "A" in image.mode or "transparency" in image.info else "RGB")
            return to_uint8_hwc(np.asarray(image))
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise ImageDecodeError(f"cannot decode image {path}: {error}") from error
