"""Datasets people already have on disk: ControlNet's ``fill50k`` layout and diffusers' ``imagefolder`` layout.

- ``fill50k``: ``<root>/prompt.json`` as JSON lines ``{"source": "source/0.png", "target": "target/0.png",
  "prompt": "..."}``; ``source`` is the condition map, ``target`` the image (lllyasviel/ControlNet ``docs/train.md``).
- ``imagefolder``: ``<root>/metadata.jsonl``, one JSON object per line with the image file (``file_name``), the
  caption (``text``) and the condition map (``conditioning_image``); column names are settings, as in diffusers'
  ``train_controlnet.py`` (``--image_column``, ``--caption_column``, ``--conditioning_image_column``).

Either way the condition comes from the files (``conditions: files``) or from the configured extractor applied to
the image on the fly (``conditions: extractor``). Bad data -- a malformed line, a missing file, an empty caption, an
image that does not decode -- is reported by file and line and skipped and counted (``on_error: skip``, the
default), or stops the run with a one-line error (``on_error: raise``). Index lines are checked when the data
module is built; images are decoded when their item is loaded (then the training system counts the skip).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from conditions import ConditionExtractor, ImageDecodeError, read_image
from conditions.io import MAX_IMAGE_PIXELS
from lightning_modules.data.common import ConditionedDataModule, check_on_error
from lightning_modules.errors import BadDataError, CtrlkitError

log = logging.getLogger(__name__)
CONDITION_SOURCES = ("files", "extractor")


def check_condition_source(conditions: str, extractor: ConditionExtractor, maps_from: str) -> None:
    """One-line errors for a ``data.conditions`` that is not a known source, and for ``extractor`` with a condition
    that reads drawn ``shapes`` scenes (shapes_mask, shapes_depth, boxes, multi with such a part), which files do
    not hold; ``maps_from`` says where such maps come from for this data."""
    if conditions not in CONDITION_SOURCES:
        raise CtrlkitError(f"unknown data.conditions '{conditions}'; choose one of: {', '.join(CONDITION_SOURCES)}")
    if conditions == "extractor" and getattr(extractor, "reads_scene", False):
        raise CtrlkitError(
            f"the '{extractor.name}' condition extractor reads drawn shapes scenes, not pixels: {maps_from}"
        )


@dataclass(frozen=True)
class PairRecord:
    """One training pair; ``where`` (``file:line``) names the index line it came from in errors."""

    image: Path
    condition: Path | None
    prompt: str
    where: str


def read_index(
    index_file: Path, columns: tuple[str, str, str], need_condition: bool, on_error: str = "raise"
) -> tuple[list[PairRecord], int]:
    """Parse a JSON-lines index with (image, condition, prompt) ``columns``; paths are relative to its folder.

    A bad line (malformed, missing key, empty caption, missing file) raises ``BadDataError`` naming the file and
    line under ``on_error="raise"``; under ``"skip"`` it is logged by name, skipped and counted.
    Returns (records, number of skipped lines).
    """
    if not index_file.is_file():
        raise CtrlkitError(f"dataset index not found: {index_file}")
    image_key, condition_key, prompt_key = columns
    root, records, skipped = index_file.parent, [], 0
    for number, line in enumerate(index_file.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{index_file} line {number}"
        try:
            entry = json.loads(line)
            if not isinstance(entry, dict):
                raise ValueError("not a JSON object")
            missing = [k for k in (image_key, prompt_key, *([condition_key] * need_condition)) if k not in entry]
            if missing:
                raise ValueError(f"missing key(s) {', '.join(missing)}")
            if not isinstance(entry[prompt_key], str):
                raise ValueError(f"'{prompt_key}' is not a string")
            if not entry[prompt_key].strip():
                raise ValueError(f"empty caption ('{prompt_key}')")
            record = PairRecord(
                image=root / str(entry[image_key]),
                condition=root / str(entry[condition_key]) if need_condition else None,
                prompt=entry[prompt_key],
                where=where,
            )
            for path in (record.image, record.condition):
                if path is not None and not path.is_file():
                    raise ValueError(f"file not found: {path}")
        except ValueError as error:  # json.JSONDecodeError is a ValueError
            if on_error == "raise":
                raise BadDataError(f"{where}: {error} (set data.on_error=skip to skip such lines)") from error
            log.warning("skipping %s: %s", where, error)
            skipped += 1
            continue
        records.append(record)
    if skipped:
        log.warning("%s: skipped %d invalid line(s) (data.on_error=skip)", index_file, skipped)
    if not records:
        raise CtrlkitError(f"{index_file} has no usable lines")
    return records, skipped


def centre_crop_geometry(height: int, width: int, size: int) -> tuple[int, int, int, int]:
    """(resized height, resized width, crop top, crop left) of ``resize_and_centre_crop`` for a height x width
    image: the short side scaled to ``size``, then the centre ``size`` x ``size`` square."""
    scale = size / min(height, width)
    new_height, new_width = max(size, round(height * scale)), max(size, round(width * scale))
    return new_height, new_width, (new_height - size) // 2, (new_width - size) // 2


def resize_and_centre_crop(image: np.ndarray, size: int, interpolation: int) -> np.ndarray:
    """Short side to ``size``, then the centre ``size`` x ``size`` square (diffusers' Resize + CenterCrop)."""
    height, width = image.shape[:2]
    new_height, new_width, top, left = centre_crop_geometry(height, width, size)
    if (new_height, new_width) != (height, width):
        image = cv2.resize(image, (new_width, new_height), interpolation=interpolation)
    return image[top : top + size, left : left + size].copy()  # a writable array of its own (torch warns otherwise)


def micro_conditioning(height: int, width: int, size: int) -> torch.Tensor:
    """SDXL's ``time_ids`` for an item made by ``resize_and_centre_crop`` from a height x width image: (6,) float =
    (original height, original width, crop top, crop left, target height, target width), the crop in the resized
    image's pixels, as diffusers' train_controlnet_sdxl.py computes them. UNets without micro-conditioning ignore
    them."""
    _, _, top, left = centre_crop_geometry(height, width, size)
    return torch.tensor([height, width, top, left, size, size], dtype=torch.float32)


def pair_tensors(
    image: np.ndarray, condition_map: np.ndarray | None, extractor: ConditionExtractor, image_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """A decoded pair -> (``pixel_values`` (3, S, S) float in [-1, 1], ``condition`` (C, S, S) float in [0, 1]).

    Both are resized (short side) and centre-cropped to S = ``image_size``; ``condition_map`` (HxWx3 uint8) is the
    precomputed map, or None to apply ``extractor`` to the resized image (``conditions: extractor``).
    """
    image = resize_and_centre_crop(image, image_size, cv2.INTER_AREA)
    if condition_map is None:
        condition = extractor(image)
    else:
        # nearest: a precomputed map (edges, labels) keeps its values instead of blending them
        condition_map = resize_and_centre_crop(condition_map, image_size, cv2.INTER_NEAREST)
        condition_map = condition_map[:, :, : extractor.channels]
        condition = torch.from_numpy(condition_map).permute(2, 0, 1).float().div(255.0)
    pixel_values = torch.from_numpy(image).permute(2, 0, 1).float().div(127.5).sub(1.0)
    return pixel_values, condition


class PairedImageDataset(Dataset):
    """Items: ``pixel_values`` (3, S, S) float in [-1, 1]; ``condition`` (C, S, S) float in [0, 1]; ``prompt`` str;
    ``time_ids`` (6,) SDXL's micro-conditioning (``micro_conditioning``).

    Args:
        records: the pairs (``read_index``).
        extractor: gives the condition when ``conditions == "extractor"``, and its ``channels`` always.
        image_size: side S; images are resized (short side) and centre-cropped, condition maps the same way.
        conditions: ``files`` (precomputed maps) or ``extractor`` (computed from the image on the fly).
        max_image_pixels: larger images (width x height, read from the header) are bad data, never decoded.
    """

    def __init__(
        self,
        records: list[PairRecord],
        extractor: ConditionExtractor,
        image_size: int,
        conditions: str,
        max_image_pixels: int = MAX_IMAGE_PIXELS,
    ) -> None:
        self.records = records
        self.extractor = extractor
        self.image_size = image_size
        self.conditions = conditions
        self.max_image_pixels = max_image_pixels

    def __len__(self) -> int:
        return len(self.records)

    def describe(self, index: int) -> str:
        return self.records[index].where

    def __getitem__(self, index: int) -> dict:
        record = self.records[index]
        try:
            image = read_image(record.image, self.max_image_pixels)
            condition_map = None
            if self.conditions == "files":
                condition_map = read_image(record.condition, self.max_image_pixels)
        except ImageDecodeError as error:
            raise ImageDecodeError(f"{record.where}: {error}") from error
        pixel_values, condition = pair_tensors(image, condition_map, self.extractor, self.image_size)
        # index: the key of the training system's latent cache (items are deterministic: resize + centre crop)
        return {
            "index": index,
            "pixel_values": pixel_values,
            "condition": condition,
            "prompt": record.prompt,
            "time_ids": micro_conditioning(*image.shape[:2], self.image_size),
        }


class FileDataModule(ConditionedDataModule):
    """Pairs listed in an index file; the last ``val_size`` lines form the fixed validation split.

    Args:
        root: dataset folder (holds the index file).
        extractor: the configured condition (``conf/condition``).
        layout: ``fill50k`` or ``imagefolder`` (see module docstring).
        conditions: ``files`` or ``extractor``.
        image_column, caption_column, conditioning_image_column: ``imagefolder`` column names.
        on_error: ``skip`` (default): a bad line or an undecodable image is reported by file and line, skipped and
            counted; ``raise``: it stops the run with a one-line error.
        seed: the shuffling seed (``${seed}``).
        max_image_pixels: the largest image (width x height, checked from the file header) decoded; larger ones are
            bad data (skipped or raised per ``on_error``), so a decompression bomb never reaches the decoder.
    """

    LAYOUTS = {
        "fill50k": ("prompt.json", ("target", "source", "prompt")),
        "imagefolder": ("metadata.jsonl", None),
    }

    def __init__(
        self,
        root: str,
        extractor: ConditionExtractor,
        layout: str = "fill50k",
        conditions: str = "files",
        image_size: int = 64,
        val_size: int = 16,
        batch_size: int = 16,
        num_workers: int = 0,
        on_error: str = "skip",
        seed: int = 0,
        image_column: str = "file_name",
        caption_column: str = "text",
        conditioning_image_column: str = "conditioning_image",
        max_image_pixels: int = MAX_IMAGE_PIXELS,
    ) -> None:
        super().__init__()
        if layout not in self.LAYOUTS:
            raise CtrlkitError(f"unknown data.layout '{layout}'; choose one of: {', '.join(self.LAYOUTS)}")
        check_condition_source(
            conditions, extractor, "train it on data=shapes, or pick an image extractor (e.g. condition=canny)"
        )
        if batch_size < 1:
            raise CtrlkitError(f"data.batch_size must be >= 1, got {batch_size}")
        if not Path(root).is_dir():
            raise CtrlkitError(f"data.root {root} is not a folder")
        check_on_error(on_error)
        self.on_error = on_error
        self.shuffle_seed = seed
        index_name, columns = self.LAYOUTS[layout]
        columns = columns or (image_column, conditioning_image_column, caption_column)
        records, self.skipped_lines = read_index(Path(root) / index_name, columns, conditions == "files", on_error)
        if not 1 <= val_size < len(records):
            raise CtrlkitError(
                f"data.val_size={val_size} must be >= 1 and below the {len(records)} usable pairs in {root}"
            )
        self.image_size = image_size
        self.batch_size = batch_size
        self.num_workers = num_workers
        split = len(records) - val_size
        if max_image_pixels < 1:
            raise CtrlkitError(f"data.max_image_pixels={max_image_pixels} must be >= 1")
        self.train_dataset = PairedImageDataset(records[:split], extractor, image_size, conditions, max_image_pixels)
        self.val_dataset = PairedImageDataset(records[split:], extractor, image_size, conditions, max_image_pixels)
