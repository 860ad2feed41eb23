"""The extractor registry beyond Canny: HED against controlnet_aux, resize modes, shapes ground truth."""

from __future__ import annotations

import pickle

import cv2
import numpy as np
import pytest
import torch

from conditions import EXTRACTORS, CannyExtractor, HEDExtractor, Resize, ShapesTruthExtractor, WeightsNotFoundError
from conditions.base import ConditionExtractor
from conditions.resize import fit_map, pixel_perfect_resolution
from conditions.shapes import render_scene
from lightning_modules.data.shapes import ShapesDataset
from tests.conditions.test_conditions import photographs


def test_registry_names_match_classes():
    assert set(EXTRACTORS) >= {"canny", "hed", "shapes_truth"}
    assert all(cls.name == name for name, cls in EXTRACTORS.items())


@pytest.mark.parametrize("size", [(512, 512), (101, 67), (3, 5)])
@pytest.mark.parametrize(("low", "high"), [(100, 200), (0, 0), (20, 60)])
def test_fast_canny_equals_opencv_on_the_rgb_image(size, low, high):
    rng = np.random.default_rng(size[0] * 1000 + low)
    noise = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
    ties = (rng.integers(0, 3, (*size, 1)) * 60).astype(np.uint8).repeat(3, axis=2)  # equal channels: tie-breaking
    photo = cv2.resize(photographs()["coffee"], size[::-1])
    for image in (noise, ties, photo):
        ours = CannyExtractor(low, high, channels=1).extract(image)
        np.testing.assert_array_equal(ours[:, :, 0], cv2.Canny(image, low, high))


def test_canny_survives_pickling_for_worker_processes():
    extractor = pickle.loads(pickle.dumps(CannyExtractor(50, 120)))
    photo = photographs()["rocket"]
    np.testing.assert_array_equal(extractor.extract(photo)[:, :, 0], cv2.Canny(photo, 50, 120))


@pytest.mark.parametrize("name", ["astronaut", "coffee"])
@pytest.mark.parametrize(("safe", "scribble"), [(False, False), (True, False), (False, True)])
def test_hed_equals_controlnet_aux(hed_weights_dir, name, safe, scribble):
    from controlnet_aux import HEDdetector

    photo = photographs()[name][:192, :256]  # sides multiple of 64: controlnet_aux keeps them
    reference = HEDdetector.from_pretrained(str(hed_weights_dir))(
        photo, detect_resolution=192, image_resolution=192, safe=safe, scribble=scribble, output_type="np"
    )
    ours = HEDExtractor(weights_dir=hed_weights_dir, safe=safe, scribble=scribble).process(photo)
    assert ours.shape == reference.shape == photo.shape
    np.testing.assert_array_equal(ours, reference)
    assert 0 < ours.mean() < 255 and ours.std() > 1  # not a constant map


def test_hed_contract_any_size_batch_and_determinism(hed_weights_dir):
    extractor = HEDExtractor(weights_dir=hed_weights_dir, channels=1)
    photos = [photographs()["chelsea"][:100, :130], photographs()["rocket"][:100, :130]]
    single = extractor(photos[0])
    assert single.shape == (1, 100, 130) and single.dtype == torch.float32
    assert 0 <= single.min() < single.max() <= 1
    assert torch.equal(single, extractor(photos[0]))
    batch = extractor(torch.stack([torch.from_numpy(p).permute(2, 0, 1) for p in photos]))
    assert batch.shape == (2, 1, 100, 130)
    assert torch.equal(batch[0], single) and torch.equal(batch[1], extractor(photos[1]))


def test_hed_missing_weights_names_the_file(tmp_path):
    with pytest.raises(WeightsNotFoundError, match=rf"weights file not found: {tmp_path}/ControlNetHED\.pth; put"):
        HEDExtractor(weights_dir=tmp_path)
    with pytest.raises(WeightsNotFoundError, match="no weights_dir given"):
        HEDExtractor()


class ShapeSpy(ConditionExtractor):
    """Records the size each image reaches ``extract`` with; returns a horizontal ramp."""

    name = "spy"
    kind = "image"

    def __init__(self, resize=None) -> None:
        self.channels = 1
        self.resize = Resize.coerce(resize)
        self.seen: list[tuple[int, int]] = []

    def extract(self, image: np.ndarray) -> np.ndarray:
        self.seen.append(image.shape[:2])
        ramp = np.linspace(0, 255, image.shape[1]).round().astype(np.uint8)
        return np.broadcast_to(ramp, image.shape[:2])[:, :, None].copy()


def test_default_keeps_input_size_and_detect_resolution_is_exact():
    image = photographs()["astronaut"][:300, :451]
    spy = ShapeSpy()
    assert spy.process(image).shape == (300, 451, 1) and spy.seen == [(300, 451)]
    spy = ShapeSpy({"detect_resolution": 200})
    assert spy.process(image).shape == (300, 451, 1)
    assert spy.seen == [(200, 301)]  # short side 200, long side rounded to a pixel, not to 64


def test_pixel_perfect_resolution_as_sd_webui():
    assert pixel_perfect_resolution((512, 768), (512, 512), "crop_and_resize") == 512
    assert pixel_perfect_resolution((512, 768), (512, 512), "resize_and_fill") == 341
    assert pixel_perfect_resolution((1024, 1024), (512, 768), "just_resize") == 768
    spy = ShapeSpy({"output_size": (64, 96), "pixel_perfect": True})
    assert spy.process(photographs()["astronaut"]).shape == (64, 96, 1) and spy.seen == [(96, 96)]


def test_resize_modes_fit_the_output_size():
    ramp = np.tile(np.arange(200, dtype=np.uint8), (100, 1))[:, :, None]  # 100x200, value = column
    stretched = fit_map(ramp, (50, 50), "just_resize", cv2.INTER_NEAREST)
    assert stretched.shape == (50, 50, 1) and stretched[0, -1, 0] >= 195
    cropped = fit_map(ramp, (50, 50), "crop_and_resize", cv2.INTER_NEAREST)  # scale 0.5 -> 50x100, centre crop
    assert cropped.shape == (50, 50, 1) and 45 <= cropped[0, 0, 0] <= 55 and 145 <= cropped[0, -1, 0] <= 155
    filled = fit_map(ramp, (50, 50), "resize_and_fill", cv2.INTER_NEAREST)  # scale 0.25 -> 25x50, padded
    assert filled.shape == (50, 50, 1)
    assert (filled[:12] == 0).all() and (filled[-13:] == 0).all() and filled[25, -1, 0] >= 195


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"mode": "stretch"}, "unknown resize mode 'stretch'; choose one of: just_resize, crop_and_resize"),
        ({"pixel_perfect": True}, "pixel_perfect needs output_size"),
        ({"output_size": (0, 5)}, "output_size must be"),
    ],
)
def test_resize_rejects_bad_settings(fields, message):
    with pytest.raises(ValueError, match=message):
        Resize(**fields)


def test_shapes_truth_mask_and_depth_follow_the_drawing():
    scene = render_scene(np.random.default_rng(5), size=64, num_objects=3)
    mask = ShapesTruthExtractor("mask", channels=1).scene_map(scene)[:, :, 0]
    np.testing.assert_array_equal(mask == 255, scene.foreground_mask)
    depth = ShapesTruthExtractor("depth", channels=1).scene_map(scene)[:, :, 0]
    assert (depth[~scene.foreground_mask] == 0).all()
    last = scene.objects[-1]
    assert (depth[last.mask] == 255).all()  # the last drawn object is nearest everywhere it was drawn
    first_only = scene.objects[0].mask & ~scene.objects[1].mask & ~scene.objects[2].mask
    assert (depth[first_only] == 85).all()


def test_shapes_dataset_uses_the_scene_and_images_are_refused():
    extractor = ShapesTruthExtractor("mask")
    item = ShapesDataset(extractor, length=2, image_size=32)[1]
    assert torch.equal(item["condition"][0] > 0.5, item["mask"])
    with pytest.raises(TypeError, match="reads the drawn scene, not pixels"):
        extractor(photographs()["coffee"])
