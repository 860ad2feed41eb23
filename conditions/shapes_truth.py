"""Exact ground-truth conditions for the procedural ``shapes`` scenes: masks, depth from the drawing order, boxes.

These read the drawn scene (``conditions.shapes.ShapeScene``), not pixels: the ``shapes`` dataset hands them the
scene it drew, so the condition is what the drawing used rather than an estimate of it.
"""

from __future__ import annotations

import numpy as np
import torch

from conditions.base import ConditionExtractor, _to_chw_float
from conditions.shapes import ShapeScene

TARGETS = ("mask", "depth")


class ShapesTruthExtractor(ConditionExtractor):
    """Ground-truth map of a ``shapes`` scene.

    - ``mask``: 255 where any object was drawn, 0 on the background.
    - ``depth``: near is bright, as MiDaS maps are: the background is 0 and object ``k`` of ``n`` (drawing order,
      later occludes earlier) is ``round(255 * (k + 1) / n)`` wherever it is visible.

    Args:
        target: one of ``TARGETS``.
        channels: 3 (repeated to RGB) or 1.
    """

    name = "shapes_truth"
    kind = "image"
    reads_scene = True  # the shapes dataset calls from_scene() instead of __call__(image)

    def __init__(self, target: str = "mask", channels: int = 3) -> None:
        if target not in TARGETS:
            raise ValueError(f"unknown shapes ground truth '{target}'; choose one of: {', '.join(TARGETS)}")
        if channels not in (1, 3):
            raise ValueError(f"shapes_truth channels must be 1 or 3, got {channels}")
        self.target = target
        self.channels = channels

    def extract(self, image: np.ndarray) -> np.ndarray:
        raise TypeError(
            f"the shapes ground-truth extractor ({self.target}) reads the drawn scene, not pixels: use it with "
            "data=shapes, or pick an image extractor (e.g. condition=canny) for image files"
        )

    def scene_map(self, scene: ShapeScene) -> np.ndarray:
        """The scene's HxWx``channels`` uint8 ground-truth map."""
        truth = np.zeros(scene.image.shape[:2], dtype=np.uint8)
        count = len(scene.objects)
        for index, obj in enumerate(scene.objects):  # drawing order: later objects cover earlier ones
            truth[obj.mask] = 255 if self.target == "mask" else round(255 * (index + 1) / count)
        return np.repeat(truth[:, :, None], self.channels, axis=2)

    def from_scene(self, scene: ShapeScene) -> torch.Tensor:
        """(channels, H, W) float32 in [0, 1]."""
        return _to_chw_float(self.scene_map(scene))
