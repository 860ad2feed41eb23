"""Shapes controllability metrics on inputs with known answers."""

import numpy as np
import pytest

from conditions.metrics import (
    box_iou,
    classify_shape,
    colour_mask,
    mask_box,
    mask_iou,
    named_box_ious,
    score_shapes_image,
)
from conditions.shapes import COLOURS, render_scene


def test_mask_iou_known_values():
    a = np.zeros((10, 10), bool)
    b = np.zeros((10, 10), bool)
    a[:, :5] = True
    b[:, 3:8] = True  # overlap 2 columns, union 8 columns
    assert mask_iou(a, b) == pytest.approx(2 / 8)
    assert mask_iou(a, a) == 1.0 and mask_iou(a, ~a) == 0.0
    assert mask_iou(np.zeros((3, 3), bool), np.zeros((3, 3), bool)) == 1.0


def test_rendered_scenes_score_perfectly():
    """The metric must call every exact rendering right (sizes down to the smallest the dataset draws)."""
    for seed in range(200):
        scene = render_scene(np.random.default_rng(seed), size=64)
        (obj,) = scene.objects
        score = score_shapes_image(scene.image, obj.colour, obj.shape, scene.background, obj.mask)
        assert score.caption_correct, (seed, obj.shape, obj.colour, scene.background)
        assert score.mask_iou == 1.0


def test_wrong_captions_and_noise_score_badly():
    scene = render_scene(np.random.default_rng(0), size=64)
    (obj,) = scene.objects
    other_colour = next(c for c in COLOURS if c not in (obj.colour, scene.background))
    assert not score_shapes_image(scene.image, other_colour, obj.shape, scene.background).colour_correct
    other_shape = next(s for s in ("circle", "square", "triangle") if s != obj.shape)
    assert not score_shapes_image(scene.image, obj.colour, other_shape, scene.background).shape_correct
    noise = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    score = score_shapes_image(noise, obj.colour, obj.shape, scene.background, obj.mask)
    assert not score.caption_correct and score.mask_iou < 0.3


def test_shifted_mask_lowers_iou():
    scene = render_scene(np.random.default_rng(5), size=64)
    (obj,) = scene.objects
    shifted = np.roll(scene.image, 6, axis=1)
    assert mask_iou(colour_mask(shifted, obj.colour), obj.mask) < mask_iou(
        colour_mask(scene.image, obj.colour), obj.mask
    )


def test_classify_shape_on_ideal_masks():
    yy, xx = np.mgrid[:40, :40]
    assert classify_shape((yy - 20) ** 2 + (xx - 20) ** 2 <= 15**2) == "circle"
    assert classify_shape((abs(yy - 20) <= 12) & (abs(xx - 20) <= 12)) == "square"
    assert classify_shape((yy >= 5) & (yy <= 35) & (abs(xx - 20) <= (yy - 5) / 2)) == "triangle"
    assert classify_shape(np.zeros((40, 40), bool)) is None


def test_box_iou_known_values():
    assert box_iou((0, 0, 0.5, 0.5), (0, 0, 0.5, 0.5)) == 1.0
    assert box_iou((0, 0, 0.5, 0.5), (0.25, 0, 0.75, 0.5)) == pytest.approx(1 / 3)
    assert box_iou((0, 0, 0.2, 0.2), (0.5, 0.5, 1, 1)) == 0.0
    assert box_iou(None, (0, 0, 1, 1)) == 0.0
    mask = np.zeros((10, 20), dtype=bool)
    mask[2:5, 4:10] = True
    assert mask_box(mask) == (0.2, 0.2, 0.5, 0.5)
    assert mask_box(np.zeros((4, 4), dtype=bool)) is None


def test_named_box_ious_on_drawn_and_wrong_images():
    scene = render_scene(np.random.default_rng(5), 64, num_objects=1)
    obj = scene.objects[0]
    assert named_box_ious(scene.image, [(obj.colour, obj.box)]) == [1.0]
    # the object drawn elsewhere: low; not drawn at all: 0
    shifted = np.roll(scene.image, 20, axis=1)
    assert named_box_ious(shifted, [(obj.colour, obj.box)])[0] < 0.6
    blank = np.full_like(scene.image, COLOURS[scene.background])
    assert named_box_ious(blank, [(obj.colour, obj.box)]) == [0.0]


def test_objects_of_one_colour_get_one_region_each():
    image = np.zeros((40, 40, 3), dtype=np.uint8)
    image[:] = COLOURS["white"]
    image[2:10, 2:10] = COLOURS["red"]  # small
    image[20:38, 20:38] = COLOURS["red"]  # large
    small, large = (2 / 40, 2 / 40, 10 / 40, 10 / 40), (20 / 40, 20 / 40, 38 / 40, 38 / 40)
    assert named_box_ious(image, [("red", small), ("red", large)]) == [1.0, 1.0]
    assert named_box_ious(image, [("red", small)]) == [0.0]  # one object: judged by the largest region only
