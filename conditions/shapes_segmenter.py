"""A small segmentation network for ``shapes`` scenes: the differentiable reward model for ``condition=shapes_mask``.

ControlNet++ rewards a segmentation condition with a segmentation network run on the generated image; the shapes
default has no such network to borrow, so the project trains this one (``python -m
lightning_modules.reward_models``) and ships it (``lightning_modules/assets/reward_models/shapes_mask_segmenter``,
~100 KB). It maps an image (B, 3, H, W) in [0, 1] to foreground logits (B, 1, H, W): where any object is, as
``ShapesTruthExtractor(target="mask")`` draws it. Whether a pixel is foreground depends on the background colour, a
global fact a local window cannot see inside a large object, so the network is handed it: the per-channel median of
the image's border pixels (the background fills the border of almost every scene), broadcast, and each pixel's
squared distance to it. Then two levels of 3x3 convolutions with a skip (a two-level U-Net), which keeps the
gradient it hands the reward local.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn


def _conv(in_channels: int, out_channels: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1), nn.SiLU())


class ShapesSegmenter(ModelMixin, ConfigMixin):
    """Foreground logits of shapes scenes. images (B, 3, H, W) in [0, 1], H and W even -> (B, 1, H, W)."""

    @register_to_config
    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.encode = nn.Sequential(_conv(7, width), _conv(width, width))
        self.down = nn.Sequential(_conv(width, 2 * width, stride=2), _conv(2 * width, 2 * width))
        self.up = _conv(2 * width, width)
        self.decode = nn.Sequential(_conv(2 * width, width), nn.Conv2d(width, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        background = border_colour(images)[..., None, None].expand_as(images)  # (B, 3, H, W)
        distance = (images - background).square().sum(dim=1, keepdim=True)
        features = self.encode(torch.cat([images * 2.0 - 1.0, background * 2.0 - 1.0, distance], dim=1))
        coarse = self.up(F.interpolate(self.down(features), size=features.shape[-2:], mode="nearest"))
        return self.decode(torch.cat([features, coarse], dim=1))

    @torch.no_grad()
    def predict_mask(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, 1, H, W) bool foreground."""
        return self(images) > 0


def border_colour(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) -> (B, 3): the per-channel median of the one-pixel border, the background colour of a scene."""
    border = torch.cat(
        [images[..., 0, :], images[..., -1, :], images[..., 1:-1, 0], images[..., 1:-1, -1]], dim=-1
    )  # (B, 3, 2W + 2H - 4)
    return border.median(dim=-1).values


def mask_consistency_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-item (B,) mean binary cross-entropy between the segmenter's logits (B, 1, H, W) and a binary mask
    condition (B, 1, H, W) in {0, 1}: ControlNet++'s segmentation reward (cross-entropy to the input condition)."""
    return F.binary_cross_entropy_with_logits(logits, target, reduction="none").mean(dim=(1, 2, 3))
