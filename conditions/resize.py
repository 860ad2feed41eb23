"""Detection resolution and resize modes, as sd-webui-controlnet defines them, without rounding to multiples of 64.

By default an extractor runs at the input's own size and returns a map of that size. ``Resize`` asks for something
else: run the detector with the short side at ``detect_resolution`` pixels, and/or return a map of ``output_size``
fitted with one of the three resize modes:

- ``just_resize``: stretch to ``output_size`` (aspect ratio not kept).
- ``crop_and_resize``: scale until the map covers ``output_size``, then crop the centre (sd-webui's default,
  ``INNER_FIT``).
- ``resize_and_fill``: scale until the map fits inside ``output_size``, then pad with 0 (no condition) around it
  (``OUTER_FIT``).

``pixel_perfect`` picks ``detect_resolution`` from the input and output sizes (sd-webui-controlnet
``pixel_perfect_resolution``), so the detector runs at the resolution the map is finally used at.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

RESIZE_MODES = ("just_resize", "crop_and_resize", "resize_and_fill")


@dataclass(frozen=True)
class Resize:
    """How an extractor sizes its work and its output.

    Args:
        detect_resolution: short side, in pixels, the detector runs at; None = the input's own size.
        output_size: (height, width) of the returned map; None = the input's size.
        mode: one of ``RESIZE_MODES``; how the map is fitted to ``output_size``.
        pixel_perfect: derive ``detect_resolution`` from the input and ``output_size`` (needs ``output_size``).
    """

    detect_resolution: int | None = None
    output_size: tuple[int, int] | None = None
    mode: str = "crop_and_resize"
    pixel_perfect: bool = False

    def __post_init__(self) -> None:
        if self.mode not in RESIZE_MODES:
            raise ValueError(f"unknown resize mode '{self.mode}'; choose one of: {', '.join(RESIZE_MODES)}")
        if self.detect_resolution is not None and self.detect_resolution < 1:
            raise ValueError(f"detect_resolution must be >= 1 pixel, got {self.detect_resolution}")
        if self.output_size is not None:
            size = tuple(int(v) for v in self.output_size)
            if len(size) != 2 or min(size) < 1:
                raise ValueError(f"output_size must be (height, width) with both >= 1, got {self.output_size}")
            object.__setattr__(self, "output_size", size)
        if self.pixel_perfect and (self.output_size is None or self.detect_resolution is not None):
            raise ValueError("pixel_perfect needs output_size and derives detect_resolution: set one, not both")

    @classmethod
    def coerce(cls, value: Resize | dict | None) -> Resize:
        """A ``Resize`` from itself, a mapping of its fields (Hydra config) or None (no resizing)."""
        if value is None:
            return cls()
        if isinstance(value, Resize):
            return value
        return cls(**dict(value))

    @property
    def is_identity(self) -> bool:
        return self.detect_resolution is None and self.output_size is None

    def detection_resolution(self, height: int, width: int) -> int | None:
        """Short side to run the detector at for an input of ``height`` x ``width``; None = as is."""
        if self.pixel_perfect:
            return pixel_perfect_resolution((height, width), self.output_size, self.mode)
        return self.detect_resolution


def pixel_perfect_resolution(input_size: tuple[int, int], output_size: tuple[int, int], mode: str) -> int:
    """sd-webui-controlnet's ``pixel_perfect_resolution``: the detection short side that matches the output size.

    ``k = max(tH / H, tW / W)`` (``min`` for ``resize_and_fill``) times ``min(H, W)``, rounded.
    """
    (height, width), (target_height, target_width) = input_size, output_size
    scales = (target_height / height, target_width / width)
    scale = min(scales) if mode == "resize_and_fill" else max(scales)
    return int(np.round(scale * min(height, width)))


def resize_to(image: np.ndarray, height: int, width: int, interpolation: int | None = None) -> np.ndarray:
    """Resize an HxWxC uint8 array to exactly ``height`` x ``width``; channels kept (cv2 drops a single one).

    Default interpolation follows controlnet_aux: area when shrinking, Lanczos when enlarging.
    """
    if image.shape[:2] == (height, width):
        return image
    if interpolation is None:
        shrinking = height * width < image.shape[0] * image.shape[1]
        interpolation = cv2.INTER_AREA if shrinking else cv2.INTER_LANCZOS4
    resized = cv2.resize(image, (width, height), interpolation=interpolation)
    return resized.reshape(height, width, image.shape[2]) if image.ndim == 3 else resized


def resize_short_side(image: np.ndarray, resolution: int) -> np.ndarray:
    """Scale so the short side is ``resolution`` pixels, keeping the aspect ratio (rounded to whole pixels only)."""
    height, width = image.shape[:2]
    scale = resolution / min(height, width)
    return resize_to(image, max(1, int(round(height * scale))), max(1, int(round(width * scale))))


def fit_map(condition_map: np.ndarray, output_size: tuple[int, int], mode: str, interpolation: int) -> np.ndarray:
    """Fit an HxWxC uint8 map to ``output_size`` = (height, width) with a resize ``mode`` (see module docstring)."""
    if mode not in RESIZE_MODES:
        raise ValueError(f"unknown resize mode '{mode}'; choose one of: {', '.join(RESIZE_MODES)}")
    target_height, target_width = output_size
    height, width = condition_map.shape[:2]
    if mode == "just_resize":
        return resize_to(condition_map, target_height, target_width, interpolation)
    scales = (target_height / height, target_width / width)
    scale = max(scales) if mode == "crop_and_resize" else min(scales)
    new_height = target_height if scales[0] == scale else max(1, int(round(height * scale)))
    new_width = target_width if scales[1] == scale else max(1, int(round(width * scale)))
    if mode == "crop_and_resize":
        new_height, new_width = max(new_height, target_height), max(new_width, target_width)
    else:
        new_height, new_width = min(new_height, target_height), min(new_width, target_width)
    scaled = resize_to(condition_map, new_height, new_width, interpolation)
    if mode == "crop_and_resize":
        top, left = (new_height - target_height) // 2, (new_width - target_width) // 2
        return np.ascontiguousarray(scaled[top : top + target_height, left : left + target_width])
    filled = np.zeros((target_height, target_width, condition_map.shape[2]), dtype=condition_map.dtype)
    top, left = (target_height - new_height) // 2, (target_width - new_width) // 2
    filled[top : top + new_height, left : left + new_width] = scaled
    return filled
