"""The value ranges images travel in, converted in one place.

Model side: pixels in [-1, 1] (what the VAE reads), images in [0, 1] (what the VAE decodes to, after scaling);
file side: uint8 in [0, 255]. Every conversion rounds to nearest, as PIL and diffusers' ``VaeImageProcessor`` do.
"""

from __future__ import annotations

import numpy as np
import torch


def signed_to_unit(pixels: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> [0, 1], clamped."""
    return (pixels / 2 + 0.5).clamp(0, 1)


def unit_to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[0, 1] (clamped) -> uint8 in [0, 255], rounded; the layout is kept."""
    return (images.clamp(0, 1) * 255).round().to(torch.uint8)


def images_to_numpy(images: torch.Tensor) -> np.ndarray:
    """(B, C, H, W) in [0, 1] -> (B, H, W, C) uint8 numpy, on the CPU."""
    return unit_to_uint8(images).permute(0, 2, 3, 1).cpu().numpy()


def uint8_to_unit(array: np.ndarray) -> torch.Tensor:
    """HxWxC (or HxW) uint8 -> float (C, H, W) in [0, 1]."""
    # a float32 copy: a read-only array (np.asarray of a PIL image) is fine and torch does not warn
    tensor = torch.from_numpy(np.array(array, dtype=np.float32)).div(255.0)
    return (tensor[..., None] if tensor.ndim == 2 else tensor).permute(2, 0, 1)
