"""Differentiable extractors for reward losses: soft Canny's gradients are cv2's, its edges sit where Canny's do,
soft Canny with soft non-maximum suppression draws Canny's one-pixel edges, the edge-consistency loss ranks a
matching image above a shifted one and has a gradient, and the soft F1 loss is one minus the pixel-exact F1."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from conditions.canny import CannyExtractor
from conditions.differentiable import (
    edge_consistency_loss,
    sobel_magnitude,
    soft_canny,
    soft_canny_nms,
    soft_f1_loss,
)
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


def edge_f1(found: np.ndarray, truth: np.ndarray) -> float:
    return 2 * float((found & truth).sum()) / max(int(found.sum() + truth.sum()), 1)


def test_soft_canny_nms_draws_cannys_one_pixel_edges_on_sharp_blurred_and_shifted_images():
    image = scene_image()
    blurred = cv2.GaussianBlur(image, (3, 3), 0.7)  # soft transitions, as decoded images have
    shift = np.float32([[1, 0, 0.4], [0, 1, 0.3]])  # and a sub-pixel offset: Canny must pick one of two pixels
    shifted = cv2.warpAffine(blurred, shift, (64, 64), borderMode=cv2.BORDER_REFLECT_101)
    for picture in (image, blurred, shifted):
        canny = CannyExtractor()(picture)[0].numpy() > 0.5
        assert edge_f1(soft_canny_nms(as_tensor(picture))[0, 0].numpy() > 0.5, canny) > 0.97
    # without the suppression the soft map is two pixels wide on the blurred image: half of it off Canny's pixels
    canny = CannyExtractor()(blurred)[0].numpy() > 0.5
    assert edge_f1(soft_canny(as_tensor(blurred))[0, 0].numpy() > 0.5, canny) < 0.8


def test_at_tolerance_0_the_nms_edges_penalise_an_edge_one_pixel_off_and_have_a_gradient():
    image = as_tensor(scene_image())
    target = (CannyExtractor()(scene_image())[:1] > 0.5).float()[None]
    exact = edge_consistency_loss(soft_canny_nms(image), target, tolerance=0)
    one_off = edge_consistency_loss(soft_canny_nms(torch.roll(image, 1, dims=3)), target, tolerance=0)
    assert one_off.item() > 20 * exact.item()
    noisy = (image + 0.02 * torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))).requires_grad_()
    edge_consistency_loss(soft_canny_nms(noisy), target, tolerance=0).sum().backward()
    assert noisy.grad.abs().sum() > 0


def test_soft_f1_loss_is_one_minus_the_pixel_exact_f1_of_hard_maps_and_bounded():
    target = (CannyExtractor()(scene_image())[:1] > 0.5).float()[None]
    shifted = torch.roll(target, 1, dims=3)
    f1 = edge_f1(shifted[0, 0].numpy() > 0.5, target[0, 0].numpy() > 0.5)
    assert float(soft_f1_loss(shifted, target)) == pytest.approx(1 - f1, abs=1e-6)
    assert float(soft_f1_loss(target, target)) == 0.0
    assert float(soft_f1_loss(torch.ones_like(target), target)) <= 1.0
    assert float(soft_f1_loss(torch.zeros_like(target), target)) == 1.0


def test_precision_tolerance_forgives_an_extra_edge_next_to_the_target_only():
    target = torch.zeros(1, 1, 16, 16)
    target[..., 8, 4:12] = 1.0  # a horizontal edge
    beside, far = target.clone(), target.clone()
    beside[..., 9, 4:12] = 1.0  # a second row right under it
    far[..., 2, 4:12] = 1.0  # a stray edge far from it
    soft = lambda edges: edges.clamp(0.01, 0.99)  # noqa: E731 (edge probabilities, never exactly 0 or 1)
    exact = edge_consistency_loss(soft(target), target, tolerance=0)
    assert edge_consistency_loss(soft(beside), target, tolerance=0) > exact + 0.1
    forgiven = edge_consistency_loss(soft(beside), target, 0, precision_tolerance=1)
    assert float(forgiven) == pytest.approx(float(exact), abs=1e-6)
    assert edge_consistency_loss(soft(far), target, 0, precision_tolerance=1) > exact + 0.1
