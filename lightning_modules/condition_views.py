"""How a condition is seen, one rule per condition form (a map tensor, a ``GroundingCondition``), never per
adapter: paired with generated images for scoring by re-extraction (the controllability callback and ``ctrlkit
evaluate``), and drawn for sample grids (the grid callback and evaluate's report)."""

from __future__ import annotations

import functools

import torch

from adapters.grounding import GroundingCondition
from conditions.boxes import GroundingRecord, draw_boxes
from conditions.controllability import EvalSample
from conditions.ranges import images_to_numpy, signed_to_unit
from lightning_modules.feature_cache import tensor_key_bytes


def evaluation_samples(dataset, batch: dict, generated: torch.Tensor, condition=None) -> list[EvalSample]:
    """Pair generated images (B, 3, H, W) in [0, 1] with the batch's conditions, images and (shapes) scenes.
    ``condition``: this batch's condition from another unit's dataset (a composition), instead of the batch's."""
    condition = batch["condition"] if condition is None else condition
    conditions, groundings = condition_fields(condition)
    references = images_to_numpy(signed_to_unit(batch["pixel_values"].float()))
    has_scenes = hasattr(dataset, "scene")
    return [
        EvalSample(
            generated=image,
            condition=condition,
            reference=reference,
            scene=dataset.scene(int(index)) if has_scenes else None,
            grounding=grounding,
        )
        for image, condition, reference, index, grounding in zip(
            images_to_numpy(generated.float()), conditions, references, batch["index"], groundings
        )
    ]


@functools.singledispatch
def condition_fields(condition) -> tuple[list, list]:
    """A batch's condition -> per item (``EvalSample.condition``, ``EvalSample.grounding``): a map's uint8 image
    and no grounding, or no map and the grounding record (boxes + phrases have no map: scene scores and detectors
    score them)."""
    raise TypeError(f"a condition is a map tensor or a GroundingCondition, got {type(condition).__name__}")


@condition_fields.register
def _map_fields(condition: torch.Tensor) -> tuple[list, list]:
    return list(images_to_numpy(condition.float())), [None] * len(condition)


@condition_fields.register
def _grounding_fields(condition: GroundingCondition) -> tuple[list, list]:
    return [None] * len(condition), grounding_records(condition)


def grounding_records(condition: GroundingCondition) -> list[GroundingRecord]:
    """A batch's padded grounding -> the filled slots of each image as a record."""
    return [GroundingRecord(boxes.cpu().numpy(), phrases) for boxes, phrases in condition.filled_slots()]


@functools.singledispatch
def condition_picture(condition, canvas: torch.Tensor) -> torch.Tensor:
    """A batch's condition as pictures (B, 3, H, W) in [0, 1]: a map as it is (grey maps in RGB), grounding as
    its boxes drawn on ``canvas`` (B, 3, H, W) in [0, 1], which a map ignores."""
    raise TypeError(f"a condition is a map tensor or a GroundingCondition, got {type(condition).__name__}")


@condition_picture.register
def _map_picture(condition: torch.Tensor, canvas: torch.Tensor) -> torch.Tensor:
    if condition.shape[1] == 1:
        condition = condition.expand(-1, 3, -1, -1)
    return condition[:, :3].float()


@condition_picture.register
def _grounding_picture(condition: GroundingCondition, canvas: torch.Tensor) -> torch.Tensor:
    return draw_boxes(canvas, condition.boxes, condition.masks)


@functools.singledispatch
def with_condition_drawn(condition, images: torch.Tensor) -> torch.Tensor:
    """Images (B, 3, H, W) in [0, 1] with what of the condition can be drawn on them: a map nothing, grounding
    its boxes."""
    raise TypeError(f"a condition is a map tensor or a GroundingCondition, got {type(condition).__name__}")


@with_condition_drawn.register
def _map_on_images(condition: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    return images


@with_condition_drawn.register
def _grounding_on_images(condition: GroundingCondition, images: torch.Tensor) -> torch.Tensor:
    return draw_boxes(images, condition.boxes, condition.masks)


def grid_columns(condition, samples: torch.Tensor, target: torch.Tensor) -> list[torch.Tensor]:
    """The grid's columns, each (B, 3, H, W) in [0, 1]: a map condition | sample | target, or, for grounding
    conditions, the boxes on grey | sample with the boxes | target with the boxes."""
    return [
        condition_picture(condition, torch.full_like(samples, 0.5)),
        with_condition_drawn(condition, samples),
        with_condition_drawn(condition, target),
    ]


@functools.singledispatch
def condition_key_bytes(condition) -> bytes:
    """A batch's condition as bytes for a cache key: a map's values, or grounding's boxes, slots and phrases."""
    raise TypeError(f"a condition is a map tensor or a GroundingCondition, got {type(condition).__name__}")


@condition_key_bytes.register
def _map_key(condition: torch.Tensor) -> bytes:
    return tensor_key_bytes(condition)


@condition_key_bytes.register
def _grounding_key(condition: GroundingCondition) -> bytes:
    return tensor_key_bytes(condition.boxes) + tensor_key_bytes(condition.masks) + repr(condition.phrases).encode()
