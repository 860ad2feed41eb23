"""Several conditions in one map (conditions/multi.py): each part's map where its extractor puts it, a presence
plane per part, the parts left out zero in both, and scores that equal the dedicated condition's."""

from __future__ import annotations

import numpy as np
import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf

from conditions.canny import CannyExtractor
from conditions.controllability import EvalSample, primary_metric, reextraction_scores
from conditions.multi import MultiConditionExtractor
from conditions.shapes import render_scene
from conditions.shapes_truth import ShapesTruthExtractor
from lightning_modules.commands.config_checks import load_condition_config


def shipped_multi(use=None) -> MultiConditionExtractor:
    condition = OmegaConf.create({"condition": load_condition_config("multi")}).condition
    return instantiate(condition.extractor, use=use, _convert_="all")


def scenes(count: int = 3):
    return [render_scene(np.random.default_rng(seed), 64, 2) for seed in range(count)]


def test_the_map_stacks_each_part_then_its_presence_plane():
    extractor = shipped_multi()
    assert extractor.channels == 6 and list(extractor.parts) == ["canny", "shapes_depth", "shapes_mask"]
    scene = scenes(1)[0]
    stacked = (extractor.from_scene(scene).numpy() * 255).round().astype(np.uint8)
    assert np.array_equal(stacked[0], CannyExtractor(channels=1).process(scene.image)[:, :, 0])
    assert np.array_equal(stacked[1], ShapesTruthExtractor("depth", 1).scene_map(scene)[:, :, 0])
    assert np.array_equal(stacked[2], ShapesTruthExtractor("mask", 1).scene_map(scene)[:, :, 0])
    assert (stacked[3:] == 255).all()


def test_parts_left_out_are_zero_in_map_and_presence():
    scene = scenes(1)[0]
    full = shipped_multi().from_scene(scene)
    only_canny = shipped_multi(use=["canny"]).from_scene(scene)
    assert np.array_equal(only_canny[0], full[0]) and (only_canny[3] == 1).all()
    assert (only_canny[[1, 2, 4, 5]] == 0).all()
    # an image-only subset runs on image files too (no scene needed)
    assert not shipped_multi(use=["canny"]).reads_scene and shipped_multi().reads_scene
    assert np.array_equal(shipped_multi(use=["canny"])(scene.image).numpy(), only_canny.numpy())
    split = shipped_multi().split((only_canny.numpy().transpose(1, 2, 0) * 255).astype(np.uint8))
    assert list(split) == ["canny"] and split["canny"].shape == (64, 64, 1)


def test_a_single_part_scores_exactly_as_its_dedicated_condition():
    found = scenes(4)
    generated = [s.image for s in reversed(found)]  # other scenes' images: scores well below perfect
    for part, dedicated in [
        ("canny", CannyExtractor(channels=1)),
        ("shapes_depth", ShapesTruthExtractor("depth", 1)),
        ("shapes_mask", ShapesTruthExtractor("mask", 1)),
    ]:
        multi = shipped_multi(use=[part])
        own = [
            EvalSample(
                g,
                (dedicated.from_scene(s) if hasattr(dedicated, "from_scene") else dedicated(s.image))
                .mul(255)
                .round()
                .byte()
                .permute(1, 2, 0)
                .numpy(),
                scene=s,
            )
            for g, s in zip(generated, found)
        ]
        stacked = [
            EvalSample(g, (multi.from_scene(s).mul(255).round().byte().permute(1, 2, 0).numpy()), scene=s)
            for g, s in zip(generated, found)
        ]
        assert reextraction_scores(multi, stacked) == reextraction_scores(dedicated, own)
        assert primary_metric(multi) == primary_metric(dedicated)
    everything = shipped_multi()
    stacked = [
        EvalSample(g, everything.from_scene(s).mul(255).round().byte().permute(1, 2, 0).numpy(), scene=s)
        for g, s in zip(generated, found)
    ]
    assert set(reextraction_scores(everything, stacked)[0]) == {"canny_f1", "canny_ssim", "depth_rmse", "mask_iou"}


def test_bad_settings_are_one_line_errors():
    parts = shipped_multi().parts
    with pytest.raises(ValueError, match=r"use=\['edges'\]: give one or more distinct parts .*: canny, shapes_depth"):
        MultiConditionExtractor(parts, use=["edges"])
    with pytest.raises(ValueError, match=r"condition channels=9, but parts .* make 6"):
        MultiConditionExtractor(parts, channels=9)
    with pytest.raises(ValueError, match="at least one part"):
        MultiConditionExtractor({})
