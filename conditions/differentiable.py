"""Differentiable condition extractors: what a reward loss (ControlNet++'s cycle consistency) runs on a generated
image so that its distance to the input condition has a gradient.

``soft_canny`` follows ``cv2.Canny``'s gradient measure (3x3 Sobel per colour channel on 0..255 values, L1
magnitude |gx| + |gy|, the strongest channel: what ``conditions.canny.CannyExtractor`` thresholds) and replaces
the hard hysteresis thresholds by a sigmoid. Non-maximum suppression has no smooth form, so the soft map is about
two pixels wide where Canny's is one; ``edge_consistency_loss`` is built to tolerate that.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_SOBEL_X = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])


def sobel_magnitude(images: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) in [0, 1] -> (B, 1, H, W): cv2's Canny gradient |gx| + |gy| in 0..255 units (3x3 Sobel, border
    reflected as OpenCV's BORDER_REFLECT_101), the largest over the colour channels."""
    channels = images.shape[1]
    kernel_x = _SOBEL_X.to(device=images.device, dtype=images.dtype)
    kernels = torch.stack([kernel_x, kernel_x.T]).unsqueeze(1).repeat(channels, 1, 1, 1)  # (2C, 1, 3, 3)
    padded = F.pad(images * 255.0, (1, 1, 1, 1), mode="reflect")  # torch's "reflect" is OpenCV's REFLECT_101
    gradients = F.conv2d(padded, kernels, groups=channels)  # (B, 2C, H, W): gx, gy per channel
    magnitude = gradients.abs().unflatten(1, (channels, 2)).sum(dim=2)  # (B, C, H, W)
    return magnitude.amax(dim=1, keepdim=True)


def soft_canny(
    images: torch.Tensor, low_threshold: float = 100.0, high_threshold: float = 200.0, softness: float = 20.0
) -> torch.Tensor:
    """(B, C, H, W) in [0, 1] -> (B, 1, H, W) edge probability in (0, 1): 0.5 where the Sobel magnitude is midway
    between Canny's thresholds, rising over ``softness`` gradient units."""
    centre = (low_threshold + high_threshold) / 2
    return torch.sigmoid((sobel_magnitude(images) - centre) / softness)


def edge_consistency_loss(edges: torch.Tensor, target: torch.Tensor, tolerance: int = 1) -> torch.Tensor:
    """How far soft ``edges`` (B, 1, H, W) in (0, 1) are from a binary edge map ``target`` (B, 1, H, W) in {0, 1},
    per item (B,): recall (every target edge pixel has a soft edge within ``tolerance`` pixels, the max over the
    window near 1) plus precision (no soft edge farther than ``tolerance`` from every target edge), each a mean
    binary cross-entropy over its pixels. The tolerance absorbs the width difference of soft and Canny edges."""
    window = 2 * tolerance + 1
    near_edge = F.max_pool2d(edges, window, stride=1, padding=tolerance)
    near_target = F.max_pool2d(target, window, stride=1, padding=tolerance)
    eps = 1e-6
    recall = -(target * torch.log(near_edge.clamp_min(eps))).sum(dim=(1, 2, 3))
    recall = recall / target.sum(dim=(1, 2, 3)).clamp_min(1.0)
    outside = 1.0 - near_target
    precision = -(outside * torch.log((1.0 - edges).clamp_min(eps))).sum(dim=(1, 2, 3))
    precision = precision / outside.sum(dim=(1, 2, 3)).clamp_min(1.0)
    return recall + precision
