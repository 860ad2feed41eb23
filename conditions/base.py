"""The extractor contract shared by every condition."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar, Literal

import numpy as np
import torch


def to_uint8_hwc(image: np.ndarray | torch.Tensor) -> np.ndarray:
    """Return an HxWx3 uint8 RGB array from an HxW(x1|3|4) uint8 array or a (3,H,W) float tensor in [0, 1].

    Grayscale is repeated to three channels and RGBA is composited on white, as controlnet_aux's ``HWC3`` does, so
    extractors see the same pixels as the reference annotators.
    """
    if isinstance(image, torch.Tensor):
        if image.ndim != 3 or image.shape[0] not in (1, 3):
            raise ValueError(f"expected a (C,H,W) tensor with C in (1, 3), got shape {tuple(image.shape)}")
        if image.dtype != torch.uint8:
            image = (image.clamp(0, 1) * 255).round().to(torch.uint8)
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
    Instance attribute:
        channels: channels of the returned map (image kind).
    """

    name: ClassVar[str]
    kind: ClassVar[Literal["image", "grounding"]]
    channels: int

    @abstractmethod
    def extract(self, image: np.ndarray) -> np.ndarray:
        """One HxWx3 uint8 RGB image -> HxWxC uint8 map (0..255), same H and W."""

    def __call__(self, image: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Image(s) -> condition map(s) as float32 in [0, 1].

        Args:
            image: an HxW(xC) uint8 array -> returns (channels, H, W); or a (B, 3, H, W) tensor (uint8, or float in
                [0, 1]) -> returns (B, channels, H, W).
        """
        if isinstance(image, torch.Tensor) and image.ndim == 4:
            maps = [self.extract(to_uint8_hwc(single)) for single in image]
            return torch.stack([_to_chw_float(m) for m in maps])
        return _to_chw_float(self.extract(to_uint8_hwc(image)))


def _to_chw_float(condition_map: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(condition_map.transpose(2, 0, 1))).float().div_(255.0)
