"""Grounding records (normalised xyxy boxes + phrases): from annotation files, and exact ones for ``shapes`` scenes.

A record is what GLIGEN-style adapters consume: ``boxes`` (N, 4) float32 in [0, 1] as (x0, y0, x1, y1) of the
image, and one phrase per box.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from conditions.base import ConditionExtractor
from conditions.shapes import ShapeScene


class AnnotationError(ValueError):
    """A grounding annotation file is malformed; the message names the file and the entry."""


@dataclass
class GroundingRecord:
    """``boxes``: (N, 4) float32 normalised xyxy with x0 < x1, y0 < y1 inside [0, 1]; ``phrases``: N strings."""

    boxes: np.ndarray = field(repr=False)
    phrases: list[str]

    def __post_init__(self) -> None:
        self.boxes = np.asarray(self.boxes, dtype=np.float32).reshape(-1, 4)
        if len(self.boxes) != len(self.phrases):
            raise ValueError(f"{len(self.boxes)} boxes but {len(self.phrases)} phrases")
        x0, y0, x1, y1 = self.boxes.T
        if not ((0 <= x0) & (x0 < x1) & (x1 <= 1) & (0 <= y0) & (y0 < y1) & (y1 <= 1)).all():
            raise ValueError("boxes must be normalised xyxy with 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1")

    def to_json(self) -> dict:
        return {"boxes": self.boxes.round(6).tolist(), "phrases": list(self.phrases)}


def shapes_grounding(scene: ShapeScene) -> GroundingRecord:
    """The exact boxes and phrases ("red circle") of a ``shapes`` scene, in drawing order."""
    return GroundingRecord(np.array([obj.box for obj in scene.objects]), [obj.phrase for obj in scene.objects])


def read_grounding(path: str | Path) -> dict[str, GroundingRecord]:
    """Grounding records by image file name, from a COCO detection json or a JSON-lines file.

    - COCO (``.json``): ``images`` (id, file_name, width, height), ``annotations`` (image_id, category_id, bbox as
      pixel xywh), ``categories`` (id, name); the phrase is the category name.
    - JSON lines (``.jsonl``): ``{"file_name": ..., "boxes": [[x0, y0, x1, y1], ...] normalised, "phrases": [...]}``.
    """
    path = Path(path)
    if not path.is_file():
        raise AnnotationError(f"annotation file not found: {path}")
    if path.suffix == ".jsonl":
        records = {}
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
                records[entry["file_name"]] = GroundingRecord(np.array(entry["boxes"]), list(entry["phrases"]))
            except (ValueError, KeyError, TypeError) as error:
                raise AnnotationError(f"{path} line {number}: {error}") from error
        return records
    if path.suffix != ".json":
        raise AnnotationError(f"{path}: expected a COCO .json or a .jsonl annotation file")
    try:
        coco = json.loads(path.read_text())
        names = {category["id"]: category["name"] for category in coco["categories"]}
        images = {image["id"]: image for image in coco["images"]}
        boxes: dict[int, list] = {image_id: [] for image_id in images}
        for annotation in coco["annotations"]:
            image = images[annotation["image_id"]]
            x, y, w, h = annotation["bbox"]
            box = (x / image["width"], y / image["height"], (x + w) / image["width"], (y + h) / image["height"])
            boxes[annotation["image_id"]].append((np.clip(box, 0, 1), names[annotation["category_id"]]))
        return {
            images[i]["file_name"]: GroundingRecord(np.array([b for b, _ in entries]), [p for _, p in entries])
            for i, entries in boxes.items()
        }
    except (ValueError, KeyError, TypeError) as error:
        raise AnnotationError(f"{path}: not a COCO detection file ({type(error).__name__}: {error})") from error


def pad_grounding(record: GroundingRecord, max_boxes: int) -> dict:
    """A record as fixed-size slots: ``boxes`` (max_boxes, 4) float32, ``masks`` (max_boxes,) float32 (1 for a box,
    0 for an empty slot) and ``phrases`` (max_boxes strings, "" for empty slots)."""
    count = len(record.phrases)
    if count > max_boxes:
        raise ValueError(f"{count} boxes in a grounding record; at most max_boxes={max_boxes}")
    boxes = torch.zeros(max_boxes, 4)
    boxes[:count] = torch.from_numpy(record.boxes)
    masks = torch.zeros(max_boxes)
    masks[:count] = 1.0
    return {"boxes": boxes, "masks": masks, "phrases": list(record.phrases) + [""] * (max_boxes - count)}


class ShapesBoxesExtractor(ConditionExtractor):
    """Exact grounding of a ``shapes`` scene: each object's box and phrase ("red circle"), padded to ``max_boxes``
    slots (``pad_grounding``). Reads the drawn scene, so it works with ``data=shapes`` only.

    Args:
        max_boxes: slots per image (GLIGEN takes up to 30).
    """

    name = "boxes"
    kind = "grounding"
    channels = 0
    reads_scene = True  # the shapes dataset calls from_scene() instead of __call__(image)

    def __init__(self, max_boxes: int = 30) -> None:
        if max_boxes < 1:
            raise ValueError(f"max_boxes must be >= 1, got {max_boxes}")
        self.max_boxes = max_boxes

    def extract(self, image: np.ndarray) -> np.ndarray:
        raise TypeError(
            "the boxes condition reads the boxes of the drawn shapes scene, not pixels: use it with data=shapes"
        )

    def from_scene(self, scene: ShapeScene) -> dict:
        return pad_grounding(shapes_grounding(scene), self.max_boxes)


BOX_COLOUR = (255, 0, 255)  # magenta: in no shapes palette, so boxes stay visible on any scene


def draw_boxes(images: torch.Tensor, boxes: torch.Tensor, masks: torch.Tensor | None = None) -> torch.Tensor:
    """Outline each image's boxes (normalised xyxy, (B, N, 4); slots with mask 0 skipped) in ``BOX_COLOUR`` on
    images (B, 3, H, W) in [0, 1], with ``torchvision.utils.draw_bounding_boxes``; returns new images."""
    from torchvision.utils import draw_bounding_boxes

    from conditions.ranges import unit_to_uint8

    height, width = images.shape[-2:]
    scale = torch.tensor([width, height, width, height], dtype=torch.float32)
    masks = torch.ones(boxes.shape[:2]) if masks is None else masks
    drawn = []
    for image, image_boxes, image_masks in zip(unit_to_uint8(images.cpu()), boxes.cpu(), masks.cpu()):
        present = image_boxes[image_masks > 0].float() * scale - torch.tensor([0.0, 0.0, 1.0, 1.0])  # last pixel in
        drawn.append(draw_bounding_boxes(image, present, colors=[BOX_COLOUR] * len(present), width=1))
    return torch.stack(drawn).float() / 255
