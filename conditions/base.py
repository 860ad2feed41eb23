"""The extractor contract shared by every condition."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import asdict
from typing import ClassVar, Literal

import cv2
import numpy as np
import torch

from conditions.ranges import unit_to_uint8
from conditions.resize import Resize, fit_map, resize_short_side, resize_to


def to_uint8_hwc(image: np.ndarray | torch.Tensor) -> np.ndarray:
    """Return an HxWx3 uint8 RGB array from an HxW(x1|3|4) uint8 array or a (3,H,W) float tensor in [0, 1].

    Grayscale is repeated to three channels and RGBA is composited on white, as controlnet_aux's ``HWC3`` does, so
    extractors see the same pixels as the reference annotators.
    """
    if isinstance(image, torch.Tensor):
        if image.ndim != 3 or image.shape[0] not in (1, 3):
            raise ValueError(f"expected a (C,H,W) tensor with C in (1, 3), got shape {tuple(image.shape)}")
        if image.dtype != torch.uint8:
            image = unit_to_uint8(image)
        image = image.permute(1, 2, 0).cpu().numpy()
    if not isinstance(image, np.ndarray):
        raise TypeError(f"expected a numpy array or torch tensor, got {type(image).__name__}")
    if image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image, got dtype {image.dtype}")
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3 or image.shape[2] not in (1, 3, 4):
        raise ValueError(f"expected an HxW, HxWx1, HxWx3 or HxWx4 image, got shape {image.shape}")
    if image.shape[2] == 1:
        return np.repeat(image, 3, axis=2)
    if image.shape[2] == 4:
        color = image[:, :, :3].astype(np.float32)
        alpha = image[:, :, 3:4].astype(np.float32) / 255.0
        return (color * alpha + 255.0 * (1.0 - alpha)).clip(0, 255).astype(np.uint8)
    return np.ascontiguousarray(image)


class ConditionExtractor(ABC):
    """Turns an image into the condition an adapter consumes.

    Class attributes:
        name: registry name, also the Hydra option in ``conf/condition/``.
        kind: ``"image"`` (a map the size of the image) or ``"grounding"`` (boxes + phrases).
        map_interpolation: how a map is resized back (linear for soft maps, nearest for label colours).
    Instance attributes:
        channels: channels of the returned map (image kind).
        resize: detection resolution and output size (``conditions.resize.Resize``); the default keeps the input's
            size end to end.
    """

    name: ClassVar[str]
    kind: ClassVar[Literal["image", "grounding"]]
    map_interpolation: ClassVar[int] = cv2.INTER_LINEAR
    channels: int
    resize: Resize = Resize()

    @abstractmethod
    def extract(self, image: np.ndarray) -> np.ndarray:
        """One HxWx3 uint8 RGB image -> HxWxC uint8 map (0..255), same H and W."""

    def extract_batch(self, images: Sequence[np.ndarray]) -> list[np.ndarray]:
        """HxWx3 uint8 images -> their maps. Neural extractors override this to run one forward pass per size."""
        return [self.extract(image) for image in images]

    def settings(self) -> dict:
        """The extractor's name and settings as plain values (written into ``ctrlkit extract`` manifests)."""
        plain = (bool, int, float, str, type(None))
        values = {key: value for key, value in vars(self).items() if isinstance(value, plain) and key[0] != "_"}
        return {"name": self.name, **values, "resize": asdict(self.resize)}

    def process_batch(self, images: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Images (any of ``to_uint8_hwc``'s inputs) -> HxWxC uint8 maps, sized as ``self.resize`` says."""
        images = [to_uint8_hwc(image) for image in images]
        if self.resize.is_identity:
            return self.extract_batch(images)
        inputs = []
        for image in images:
            resolution = self.resize.detection_resolution(*image.shape[:2])
            inputs.append(image if resolution is None else resize_short_side(image, resolution))
        maps = self.extract_batch(inputs)
        if self.resize.output_size is not None:
            return [fit_map(m, self.resize.output_size, self.resize.mode, self.map_interpolation) for m in maps]
        return [resize_to(m, *image.shape[:2], self.map_interpolation) for m, image in zip(maps, images)]

    def process(self, image: np.ndarray | torch.Tensor) -> np.ndarray:
        """One image -> its HxWxC uint8 map (what ``ctrlkit extract`` writes)."""
        return self.process_batch([image])[0]

    def __call__(self, image: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Image(s) -> condition map(s) as float32 in [0, 1].

        Args:
            image: an HxW(xC) uint8 array -> returns (channels, H, W); or a (B, 3, H, W) tensor (uint8, or float in
                [0, 1]) -> returns (B, channels, H, W), extracted as one batch.
        """
        if isinstance(image, torch.Tensor) and image.ndim == 4:
            return torch.stack([_to_chw_float(m) for m in self.process_batch(list(image))])
        return _to_chw_float(self.process(image))


class NetworkExtractor(ConditionExtractor):
    """An extractor backed by a network that runs on batches of same-sized images; subclasses implement
    ``run_network`` (a list of HxWx3 uint8 images of one size -> their HxWxC uint8 maps)."""

    def extract(self, image: np.ndarray) -> np.ndarray:
        return self.extract_batch([image])[0]

    def extract_batch(self, images: Sequence[np.ndarray]) -> list[np.ndarray]:
        return batched_by_size(images, self.run_network)

    @abstractmethod
    def run_network(self, images: list[np.ndarray]) -> list[np.ndarray]:
        """Same-sized HxWx3 uint8 images -> HxWxC uint8 maps, one network batch."""


def batched_by_size(images: Sequence[np.ndarray], run: Callable[[list[np.ndarray]], list[np.ndarray]]) -> list:
    """Call ``run`` once per group of same-sized images (a network takes one size per batch); results in order."""
    results: list = [None] * len(images)
    groups: dict[tuple[int, ...], list[int]] = {}
    for index, image in enumerate(images):
        groups.setdefault(image.shape, []).append(index)
    for indices in groups.values():
        for index, result in zip(indices, run([images[i] for i in indices])):
            results[index] = result
    return results


def _to_chw_float(condition_map: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(condition_map.transpose(2, 0, 1))).float().div_(255.0)
