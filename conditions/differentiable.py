"""Differentiable condition extractors: what a reward loss (ControlNet++'s cycle consistency) runs on a generated
image so that its distance to the input condition has a gradient.

``soft_canny`` follows ``cv2.Canny``'s gradient measure (3x3 Sobel per colour channel on 0..255 values, L1
magnitude |gx| + |gy|, the strongest channel: what ``conditions.canny.CannyExtractor`` thresholds) and replaces
the hard hysteresis thresholds by a sigmoid. Without non-maximum suppression the soft map is about two pixels wide
where Canny's is one; ``edge_consistency_loss``'s tolerance absorbs that, and so cannot see on which of the two
pixels Canny puts its edge (what pixel-exact F1 scores). ``soft_canny_nms`` adds a soft non-maximum suppression
along cv2's quantised gradient direction, so its map is one pixel wide where Canny's is and a reward can ask for
the edge on the right pixel (tolerance 0).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_SOBEL_X = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])


def sobel_gradients(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, C, H, W) in [0, 1] -> (magnitude, gx, gy), each (B, 1, H, W) in 0..255 units: cv2's Canny gradient
    |gx| + |gy| (3x3 Sobel, border reflected as OpenCV's BORDER_REFLECT_101) of the colour channel where it is
    largest, and that channel's gx, gy (Canny's direction)."""
    channels = images.shape[1]
    kernel_x = _SOBEL_X.to(device=images.device, dtype=images.dtype)
    kernels = torch.stack([kernel_x, kernel_x.T]).unsqueeze(1).repeat(channels, 1, 1, 1)  # (2C, 1, 3, 3)
    padded = F.pad(images * 255.0, (1, 1, 1, 1), mode="reflect")  # torch's "reflect" is OpenCV's REFLECT_101
    gradients = F.conv2d(padded, kernels, groups=channels).unflatten(1, (channels, 2))  # (B, C, 2, H, W)
    magnitude, channel = gradients.abs().sum(dim=2).max(dim=1, keepdim=True)  # (B, 1, H, W)
    chosen = gradients.gather(1, channel[:, :, None].expand(-1, -1, 2, -1, -1))[:, 0]  # (B, 2, H, W)
    return magnitude, chosen[:, :1], chosen[:, 1:]


def sobel_magnitude(images: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) in [0, 1] -> (B, 1, H, W): cv2's Canny gradient |gx| + |gy| in 0..255 units, the largest over
    the colour channels (``sobel_gradients``)."""
    return sobel_gradients(images)[0]


def soft_canny(
    images: torch.Tensor, low_threshold: float = 100.0, high_threshold: float = 200.0, softness: float = 20.0
) -> torch.Tensor:
    """(B, C, H, W) in [0, 1] -> (B, 1, H, W) edge probability in (0, 1): 0.5 where the Sobel magnitude is midway
    between Canny's thresholds, rising over ``softness`` gradient units."""
    centre = (low_threshold + high_threshold) / 2
    return torch.sigmoid((sobel_magnitude(images) - centre) / softness)


_TAN_22_5 = 0.41421356237


def _neighbour_bound(magnitude: torch.Tensor, gx: torch.Tensor, gy: torch.Tensor, tie: float) -> torch.Tensor:
    """(B, 1, H, W): what a pixel's gradient must exceed to survive cv2.Canny's non-maximum suppression: its two
    neighbours along the gradient, the direction quantised as cv2 does (horizontal, vertical, or the diagonal the
    signs of gx, gy pick), 0 outside the image. cv2 keeps a tie with the right / lower neighbour and drops one with
    the left / upper neighbour or on a diagonal; ``tie`` gradient units of slack do the same smoothly."""
    padded = F.pad(magnitude, (1, 1, 1, 1))
    height, width = magnitude.shape[-2:]

    def at(dy: int, dx: int) -> torch.Tensor:  # the neighbour at (y + dy, x + dx)
        return padded[..., 1 + dy : 1 + dy + height, 1 + dx : 1 + dx + width]

    horizontal = torch.maximum(at(0, -1) + tie, at(0, 1) - tie)
    vertical = torch.maximum(at(-1, 0) + tie, at(1, 0) - tie)
    falling = torch.maximum(at(-1, -1), at(1, 1)) + tie  # gx, gy of one sign: up-left and down-right
    rising = torch.maximum(at(-1, 1), at(1, -1)) + tie
    ax, ay = gx.abs(), gy.abs()
    diagonal = torch.where(gx * gy >= 0, falling, rising)
    steep = torch.where(ay > ax * (2 + _TAN_22_5), vertical, diagonal)  # cv2: tan 67.5 = 2 + tan 22.5
    return torch.where(ay < ax * _TAN_22_5, horizontal, steep)


def soft_canny_nms(
    images: torch.Tensor,
    low_threshold: float = 100.0,
    high_threshold: float = 200.0,
    softness: float = 20.0,
    nms_softness: float = 10.0,
) -> torch.Tensor:
    """(B, C, H, W) in [0, 1] -> (B, 1, H, W) edge probability in (0, 1), one pixel wide where Canny's edges are:
    ``soft_canny``'s threshold sigmoid times a soft non-maximum suppression, sigmoid((m - m_neighbour) /
    ``nms_softness``) with m_neighbour the larger gradient of the pixel's two neighbours along its (quantised,
    not differentiated) gradient direction, ties broken as cv2 breaks them (``_neighbour_bound``). Its gradient
    moves an edge to the pixel the target puts it on."""
    magnitude, gx, gy = sobel_gradients(images)
    neighbour = _neighbour_bound(magnitude, gx.detach(), gy.detach(), tie=nms_softness)
    centre = (low_threshold + high_threshold) / 2
    return torch.sigmoid((magnitude - centre) / softness) * torch.sigmoid((magnitude - neighbour) / nms_softness)


def edge_consistency_loss(
    edges: torch.Tensor, target: torch.Tensor, tolerance: int = 1, precision_tolerance: int | None = None
) -> torch.Tensor:
    """How far soft ``edges`` (B, 1, H, W) in (0, 1) are from a binary edge map ``target`` (B, 1, H, W) in {0, 1},
    per item (B,): recall (every target edge pixel has a soft edge within ``tolerance`` pixels, the max over the
    window near 1) plus precision (no soft edge farther than ``tolerance`` from every target edge), each a mean
    binary cross-entropy over its pixels. The tolerance absorbs the width difference of soft and Canny edges.
    ``precision_tolerance`` (default ``tolerance``) sets the precision's slack alone: exact recall with one pixel
    of precision slack asks for every Canny edge on its pixel without punishing the gradient Canny drops next to
    it (a square's corners, where non-maximum suppression leaves gaps: punished, the corners round off)."""
    window = 2 * tolerance + 1
    near_edge = F.max_pool2d(edges, window, stride=1, padding=tolerance)
    slack = tolerance if precision_tolerance is None else precision_tolerance
    near_target = F.max_pool2d(target, 2 * slack + 1, stride=1, padding=slack)
    eps = 1e-6
    recall = -(target * torch.log(near_edge.clamp_min(eps))).sum(dim=(1, 2, 3))
    recall = recall / target.sum(dim=(1, 2, 3)).clamp_min(1.0)
    outside = 1.0 - near_target
    precision = -(outside * torch.log((1.0 - edges).clamp_min(eps))).sum(dim=(1, 2, 3))
    precision = precision / outside.sum(dim=(1, 2, 3)).clamp_min(1.0)
    return recall + precision


def soft_f1_loss(edges: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1 - soft F1 (Dice) of soft ``edges`` (B, 1, H, W) in (0, 1) against a binary edge map ``target`` (B, 1, H, W),
    per item (B,), in [0, 1]: pixel-exact like the canny F1 that evaluation scores, and bounded, where the
    cross-entropy of ``edge_consistency_loss`` at tolerance 0 grows without limit on an edge one pixel off."""
    overlap = (edges * target).sum(dim=(1, 2, 3))
    return 1.0 - 2.0 * overlap / (edges.sum(dim=(1, 2, 3)) + target.sum(dim=(1, 2, 3))).clamp_min(1.0)
