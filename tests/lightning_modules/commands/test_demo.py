"""``ctrlkit demo``'s logic without a browser: the adapters it offers, the condition it picks for each, boxes from a
sketch, unit errors, and a generation whose downloaded composition reruns to the same image in ``ctrlkit generate``.
(The page itself, in a real browser: test_demo_browser.py, ``-m browser``.)"""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
from omegaconf import open_dict
from PIL import Image

from conditions.shapes import render_scene
from lightning_modules.commands.demo import (
    DRAWN_BOXES,
    SOURCE_IS_MAP,
    Demo,
    UnitChoice,
    boxes_from_sketch,
    extractor_previews,
    find_adapters,
    map_conditions,
    parse_phrases,
    trained_condition,
)
from lightning_modules.commands.generate import run_generate
from lightning_modules.errors import CtrlkitError
from lightning_modules.shipped_adapters import SHIPPED_TINY_ADAPTERS
from tests.conftest import compose_config

SHIPPED = ["tiny/controlnet_canny", "tiny/gligen_masked_boxes", "tiny/t2i_adapter_canny"]


@pytest.fixture
def source_image(tmp_path):
    """A shapes scene as a 64x64 PNG (the source the page's extractors run on)."""
    path = tmp_path / "scene.png"
    Image.fromarray(render_scene(np.random.default_rng(5), 64).image).save(path)
    return path


def demo_config(tmp_path, *overrides):
    cfg = compose_config("demo", tmp_path / "run", ["num_inference_steps=6", *overrides])
    with open_dict(cfg):
        cfg.output_dir = str(tmp_path / "run")
    return cfg


def test_offers_shipped_adapters_then_exported_ones_newest_first(tmp_path):
    for index, name in enumerate(["older", "newer"]):
        folder = tmp_path / "train" / "runs" / name / "adapter"
        shutil.copytree(SHIPPED_TINY_ADAPTERS / "controlnet_canny", folder)
        os.utime(folder, (1_000_000 + index, 1_000_000 + index))
    (tmp_path / "train" / "runs" / "crashed" / "adapter").mkdir(parents=True)  # no weights: not offered

    found = find_adapters(tmp_path)

    assert found[:3] == SHIPPED
    assert [path.split("/")[-2] for path in found[3:]] == ["newer", "older"]
    assert find_adapters(tmp_path / "missing") == SHIPPED


def test_picks_the_condition_each_adapter_was_trained_on(tmp_path):
    assert [trained_condition(name) for name in SHIPPED] == ["canny", DRAWN_BOXES, "canny"]
    # a run trained on the shapes masks (no extractor draws them from a photo): the source image is the map
    folder = tmp_path / "run" / "adapter"
    shutil.copytree(SHIPPED_TINY_ADAPTERS / "controlnet_canny", folder)
    (folder / "train_config.yaml").write_text("condition: {name: shapes_mask, kind: image}\n")
    assert trained_condition(str(folder)) == SOURCE_IS_MAP
    (folder / "train_config.yaml").unlink()
    assert trained_condition(str(folder)) is None  # a diffusers download: the user chooses


def test_extractor_previews_draw_the_photo_extractors_and_say_which_cannot_run(source_image):
    names = map_conditions()
    assert "canny" in names and "shapes_mask" not in names and "boxes" not in names

    previews = extractor_previews(source_image, names, (64, 64))

    captions = dict((caption.split(":")[0], caption) for _, caption in previews)
    assert list(captions) == names
    canny = previews[names.index("canny")][0]
    assert canny.shape == (64, 64, 3) and canny.dtype == np.uint8 and canny.max() == 255
    assert "not available here" in captions["hed"]  # its annotator weights are not on this machine


def test_boxes_from_sketch_one_box_per_stroke_in_layer_then_left_to_right_order():
    first, second = np.zeros((200, 100, 4), np.uint8), np.zeros((200, 100), np.uint8)
    first[100:150, 60:90, 3] = 255  # right stroke of the first layer
    first[20:60, 10:30, 3] = 255  # left stroke of the first layer
    first[0, 0, 3] = 255  # a slip of the pen: ignored
    second[10:20, 50:100] = 128

    boxes = boxes_from_sketch([first, second])

    assert boxes == [[0.1, 0.1, 0.3, 0.3], [0.6, 0.5, 0.9, 0.75], [0.5, 0.05, 1.0, 0.1]]
    assert parse_phrases(" a red circle ;a blue square; ") == ["a red circle", "a blue square"]


def test_unit_errors_name_what_is_missing(source_image):
    with pytest.raises(CtrlkitError, match="2 boxes, 1 phrases"):
        UnitChoice("tiny/gligen_masked_boxes", DRAWN_BOXES).spec(None, [[0, 0, 1, 1]] * 2, ["a circle"])
    with pytest.raises(CtrlkitError, match="load a source image"):
        UnitChoice("tiny/controlnet_canny", "canny").spec(None, [], [])
    with pytest.raises(CtrlkitError, match="choose its condition"):
        UnitChoice("tiny/controlnet_canny", None).spec(str(source_image), [], [])
    spec = UnitChoice("tiny/controlnet_canny", SOURCE_IS_MAP, scale=0.5).spec(str(source_image), [], [])
    assert spec == {"adapter": "tiny/controlnet_canny", "scale": 0.5, "start": 0.0, "end": 1.0,
                    "condition_image": str(source_image)}  # fmt: skip


def test_generation_downloads_a_composition_that_ctrlkit_generate_reruns_to_the_same_image(tmp_path, source_image):
    demo = Demo(demo_config(tmp_path))
    units = [
        UnitChoice("tiny/controlnet_canny", "canny", end=0.8),
        UnitChoice("tiny/gligen_masked_boxes", DRAWN_BOXES),
    ]

    first = demo.generate("a red circle", "", 3, units, str(source_image), [[0.1, 0.2, 0.6, 0.7]], ["a red circle"])
    without_units = demo.generate("a red circle", "", 3, [])

    assert first["image"].parent.name == "generation_001" and without_units["image"].parent.name == "generation_002"
    image = np.asarray(Image.open(first["image"]))
    assert image.shape == (64, 64, 3) and image.std() > 10
    assert np.abs(image.astype(int) - np.asarray(Image.open(without_units["image"]))).mean() > 5  # the units act
    # the download names a copy of the upload, so it reruns after Gradio's temporary files are gone
    assert (first["image"].parent / "source.png").is_file()
    rerun = compose_config("generate", tmp_path / "rerun", [f"composition={first['composition']}",
                                                          "num_inference_steps=6"])  # fmt: skip
    with open_dict(rerun):
        rerun.output_dir = str(tmp_path / "rerun")
    (again,) = run_generate(rerun)
    np.testing.assert_array_equal(np.asarray(Image.open(again)), image)


def test_a_corrupt_source_image_is_a_one_line_error_naming_the_file(tmp_path):
    from lightning_modules.errors import USER_ERRORS

    corrupt = tmp_path / "broken.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    demo = Demo(demo_config(tmp_path))

    for attempt in (
        lambda: extractor_previews(corrupt, ["canny"], (64, 64)),
        lambda: demo.generate("a red circle", "", 0, [UnitChoice("tiny/controlnet_canny", "canny")], str(corrupt)),
    ):
        with pytest.raises(USER_ERRORS) as raised:
            attempt()
        assert str(corrupt.name) in str(raised.value) and "\n" not in str(raised.value)
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())  # no half-made generation
