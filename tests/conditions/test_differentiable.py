"""Differentiable extractors for reward losses: soft Canny's gradients are cv2's, its edges sit where Canny's do,
and the edge-consistency loss ranks a matching image above a shifted one and has a gradient."""

from __future__ import annotations

import cv2
import numpy as np
import torch

from conditions.canny import CannyExtractor
from conditions.differentiable import edge_consistency_loss, sobel_magnitude, soft_canny
from conditions.shapes import render_scene


def scene_image(seed: int = 3, size: int = 64) -> np.ndarray:
    return render_scene(np.random.default_rng(seed), size).image


def as_tensor(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255


def test_sobel_magnitude_is_cv2_cannys_gradient():
    image = np.random.default_rng(0).integers(0, 256, (20, 24, 3), dtype=np.uint8)
    per_channel = [
        np.abs(cv2.Sobel(image[:, :, c], cv2.CV_32F, 1, 0, ksize=3))
        + np.abs(cv2.Sobel(image[:, :, c], cv2.CV_32F, 0, 1))
        for c in range(3)
    ]
    ours = sobel_magnitude(as_tensor(image))[0, 0].numpy()
    np.testing.assert_allclose(ours, np.max(per_channel, axis=0), atol=1e-3)


def test_soft_canny_is_high_on_cannys_edges_and_low_elsewhere():
    image = scene_image()
    canny = CannyExtractor()(image)[0] > 0.5  # (H, W) bool
    soft = soft_canny(as_tensor(image))[0, 0]
    assert canny.sum() > 50
    assert soft[canny].mean() > 0.9
    far = ~torch.nn.functional.max_pool2d(canny[None, None].float(), 5, 1, 2)[0, 0].bool()
    assert soft[far].mean() < 0.05


def test_edge_consistency_prefers_the_matching_image_and_has_a_gradient():
    image = scene_image()
    target = (CannyExtractor()(image)[:1] > 0.5).float()[None]  # (1, 1, H, W)
    shifted = as_tensor(np.roll(image, 6, axis=1))
    loss = edge_consistency_loss(soft_canny(as_tensor(image)), target)
    assert loss.shape == (1,)
    assert loss.item() < 0.5 * edge_consistency_loss(soft_canny(shifted), target).item()
    assert float(edge_consistency_loss(target, target)) < 1e-4  # a perfect edge map costs nothing
    # a generated image is never flat: the loss has a gradient on a slightly noisy one
    noisy = as_tensor(image) + 0.02 * torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    noisy.requires_grad_()
    edge_consistency_loss(soft_canny(noisy), target).sum().backward()
    assert noisy.grad.abs().sum() > 0
