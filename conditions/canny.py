"""Canny edges (OpenCV), the condition of the original canny ControlNet."""

from __future__ import annotations

import cv2
import numpy as np

from conditions.base import ConditionExtractor


class CannyExtractor(ConditionExtractor):
    """Canny edge map, pixel-identical to controlnet_aux's ``CannyDetector`` at the input's own resolution.

    Like the reference annotator (lllyasviel/ControlNet ``annotator/canny``, controlnet_aux ``canny``) it runs
    ``cv2.Canny`` on the RGB image (the gradient of the strongest channel), not on a grayscale copy, so released
    canny ControlNets see the edges they were trained on. Unlike ``CannyDetector`` it never resizes: the map has the
    input's height and width (no rounding to multiples of 64).

    Args:
        low_threshold: hysteresis low threshold, 0..255 gradient units (controlnet_aux default 100).
        high_threshold: hysteresis high threshold (default 200); must be >= low_threshold.
        channels: 3 (edge map repeated to RGB, what released canny ControlNets and diffusers pipelines take) or 1.
    """

    name = "canny"
    kind = "image"

    def __init__(self, low_threshold: int = 100, high_threshold: int = 200, channels: int = 3) -> None:
        if not 0 <= low_threshold <= high_threshold:
            raise ValueError(
                "canny thresholds must satisfy 0 <= low_threshold <= high_threshold, "
                f"got {low_threshold}, {high_threshold}"
            )
        if channels not in (1, 3):
            raise ValueError(f"canny channels must be 1 or 3, got {channels}")
        self.low_threshold = low_threshold
        self.high_threshold = high_threshold
        self.channels = channels

    def extract(self, image: np.ndarray) -> np.ndarray:
        """HxWx3 uint8 RGB -> HxWx``channels`` uint8 edge map with values 0 or 255."""
        edges = cv2.Canny(image, self.low_threshold, self.high_threshold)
        if self.channels == 3:
            return np.repeat(edges[:, :, None], 3, axis=2)
        return edges[:, :, None]
