"""Controllability metrics on ``shapes``: segment a generated image by the colours its caption names, then score.

A generated image is judged only by what it shows: its pixels are assigned to the nearest palette colour, the
object's colour gives its mask, the mask's geometry gives its shape.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from conditions.shapes import COLOURS, SHAPES

_PALETTE_NAMES = list(COLOURS)
_PALETTE = np.array([COLOURS[name] for name in _PALETTE_NAMES], dtype=np.float32)  # (K, 3)


def nearest_colour_index(image: np.ndarray) -> np.ndarray:
    """HxWx3 uint8 -> HxW int: index into ``COLOURS`` of each pixel's nearest palette colour (RGB distance)."""
    pixels = image.reshape(-1, 1, 3).astype(np.float32)
    distances = ((pixels - _PALETTE[None]) ** 2).sum(-1)
    return distances.argmin(-1).reshape(image.shape[:2])


def colour_mask(image: np.ndarray, colour: str) -> np.ndarray:
    """HxW bool: pixels whose nearest palette colour is ``colour``."""
    return nearest_colour_index(image) == _PALETTE_NAMES.index(colour)


def mask_iou(predicted: np.ndarray, target: np.ndarray) -> float:
    """Intersection over union of two boolean masks; 1.0 when both are empty."""
    union = np.logical_or(predicted, target).sum()
    return 1.0 if union == 0 else float(np.logical_and(predicted, target).sum() / union)


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 8-connected region of ``mask`` (generated images have specks of every colour)."""
    count, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    if count <= 1:
        return np.zeros_like(mask, dtype=bool)
    return labels == 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))


def classify_shape(mask: np.ndarray, min_pixels: int = 12) -> str | None:
    """'circle', 'square' or 'triangle' from how much of its bounding box a region fills (pi/4, 1, 1/2);
    None for a region too small to tell."""
    if mask.sum() < min_pixels:
        return None
    ys, xs = np.nonzero(mask)
    fill = mask.sum() / ((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1))
    if fill > 0.9:
        return "square"
    return "circle" if fill > 0.64 else "triangle"


@dataclass
class ShapesScore:
    """Scores of one generated image against its caption (and, where given, the condition's mask)."""

    colour_correct: bool
    shape_correct: bool
    mask_iou: float | None = None

    @property
    def caption_correct(self) -> bool:
        return self.colour_correct and self.shape_correct


def score_shapes_image(
    image: np.ndarray,
    colour: str,
    shape: str,
    background: str,
    target_mask: np.ndarray | None = None,
    min_fraction: float = 0.02,
) -> ShapesScore:
    """Judge a generated HxWx3 uint8 image of 'a <colour> <shape> on a <background> background'.

    colour_correct: the object colour covers at least ``min_fraction`` of the image and the background colour is the
    most common colour outside it. shape_correct: the largest object-colour region classifies as ``shape``.
    mask_iou: IoU of the object-colour pixels with ``target_mask`` (the condition's ground truth), if given.
    """
    if colour not in COLOURS or background not in COLOURS or shape not in SHAPES:
        raise ValueError(f"unknown colour/shape in '{colour} {shape} on {background}'")
    labels = nearest_colour_index(image)
    object_mask = labels == _PALETTE_NAMES.index(colour)
    outside = labels[~object_mask]
    background_ok = outside.size > 0 and np.bincount(outside, minlength=len(_PALETTE_NAMES)).argmax() == (
        _PALETTE_NAMES.index(background)
    )
    colour_ok = bool(object_mask.mean() >= min_fraction and background_ok)
    shape_ok = colour_ok and classify_shape(largest_component(object_mask)) == shape
    iou = None if target_mask is None else mask_iou(object_mask, target_mask)
    return ShapesScore(colour_correct=colour_ok, shape_correct=bool(shape_ok), mask_iou=iou)


def mask_box(mask: np.ndarray) -> tuple[float, float, float, float] | None:
    """Normalised xyxy bounding box of a HxW bool mask (pixel edges, as ``shapes`` boxes are); None if empty."""
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return None
    height, width = mask.shape
    return (xs.min() / width, ys.min() / height, (xs.max() + 1) / width, (ys.max() + 1) / height)


def box_iou(a, b) -> float:
    """Intersection over union of two xyxy boxes (tuples or arrays, any consistent units); 0.0 when either is
    missing or they do not overlap."""
    if a is None or b is None:
        return 0.0
    width = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    height = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    intersection = width * height
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - intersection
    return float(intersection / union) if union > 0 else 0.0


def largest_components(mask: np.ndarray, count: int) -> list[np.ndarray]:
    """The ``count`` largest 8-connected regions of ``mask``, largest first (fewer if it has fewer)."""
    total, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    order = 1 + np.argsort(-stats[1:, cv2.CC_STAT_AREA], kind="stable")
    return [labels == label for label in order[:count]]


def named_box_ious(image: np.ndarray, objects: list[tuple[str, tuple[float, float, float, float]]]) -> list[float]:
    """Box IoU of each named object in a generated HxWx3 uint8 image, a colour "detector": the pixels nearest the
    object's colour, the bounding box of their largest region, IoU with the object's ground-truth box.

    Args:
        objects: (colour name, normalised xyxy box) per object, e.g. ``[(o.colour, o.box) for o in scene.objects]``.
    Returns one IoU per object, in order. When k objects share a colour, the k largest regions of that colour are
    matched to them greedily by IoU (as detections are matched to ground truth in detection AP).
    """
    labels = nearest_colour_index(image)
    ious = [0.0] * len(objects)
    for colour in dict.fromkeys(colour for colour, _ in objects):
        members = [index for index, (name, _) in enumerate(objects) if name == colour]
        regions = largest_components(labels == _PALETTE_NAMES.index(colour), len(members))
        detected = [mask_box(region) for region in regions]
        pairs = [(box_iou(found, objects[i][1]), i, slot) for i in members for slot, found in enumerate(detected)]
        used_objects, used_slots = set(), set()
        for iou, index, slot in sorted(pairs, reverse=True):
            if index not in used_objects and slot not in used_slots:
                ious[index] = iou
                used_objects.add(index)
                used_slots.add(slot)
    return ious
