"""depth, seg, pose extractors on real photographs with tiny random networks loaded through the real loading path;
grounding records from annotation files and shapes scenes."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch

from conditions import (
    AnnotationError,
    DepthExtractor,
    GroundingRecord,
    PoseExtractor,
    SegExtractor,
    WeightsNotFoundError,
    read_grounding,
    shapes_grounding,
)
from conditions.shapes import render_scene
from conditions.weights import model_folder
from tests.conditions.test_conditions import photographs


@pytest.fixture
def extractors(request):
    return {
        "depth": lambda: DepthExtractor(request.getfixturevalue("dpt_dir")),
        "seg": lambda: SegExtractor(request.getfixturevalue("segformer_dir")),
        "pose": lambda: PoseExtractor(weights_dir=request.getfixturevalue("openpose_weights_dir")),
    }


# pose: the OpenPose body network is VGG-sized (~1 min for this test on 2 cores), so it runs with -m slow; the
# default suite checks pose through test_pose_equals_controlnet_aux_and_gives_keypoints.
@pytest.mark.parametrize("name", ["depth", "seg", pytest.param("pose", marks=pytest.mark.slow)])
def test_contract_on_photographs(extractors, name):
    extractor = extractors[name]()
    photos = [photographs()["astronaut"][:120, :170], photographs()["coffee"][:120, :170]]
    single = extractor(photos[0])
    assert single.shape == (extractor.channels, 120, 170) and single.dtype == torch.float32
    assert 0 <= single.min() and single.max() <= 1
    assert torch.equal(single, extractor(photos[0]))
    batch = extractor(torch.stack([torch.from_numpy(p).permute(2, 0, 1) for p in photos]))
    assert batch.shape == (2, extractor.channels, 120, 170)
    assert torch.equal(batch[1], extractor(photos[1]))
    assert extractor.process(photographs()["rocket"][:77, :91]).shape == (77, 91, extractor.channels)


def test_depth_is_normalised_per_image(dpt_dir):
    depth = DepthExtractor(dpt_dir, channels=1).process(photographs()["chelsea"][:96, :128])
    assert depth.min() == 0 and depth.max() == 255 and depth.std() > 5


def test_seg_paints_ade20k_palette_colours(segformer_dir):
    from controlnet_aux.util import ade_palette

    extractor = SegExtractor(segformer_dir)
    photo = photographs()["astronaut"][:96, :128]
    (labels,) = extractor.labels([photo])
    painted = extractor.process(photo)
    np.testing.assert_array_equal(painted, np.asarray(ade_palette(), np.uint8)[labels])
    assert len(np.unique(labels)) > 1


def test_pose_equals_controlnet_aux_and_gives_keypoints(openpose_weights_dir):
    from controlnet_aux import OpenposeDetector
    from controlnet_aux.open_pose.body import Body

    photo = photographs()["astronaut"][:256, :192]
    # the same file through the upstream loader (from_pretrained would also want the hand and face models)
    reference = OpenposeDetector(Body(str(openpose_weights_dir / "body_pose_model.pth")))
    expected = reference(photo, detect_resolution=192, image_resolution=192, output_type="np")
    extractor = PoseExtractor(weights_dir=openpose_weights_dir)
    np.testing.assert_array_equal(extractor.process(photo), expected)
    people = extractor.keypoints(photo)
    assert all(len(person) == 18 for person in people)
    assert all(0 <= v <= 1 for person in people for point in person if point for v in point)


def test_pose_on_a_long_strip_pads_it_instead_of_hanging_or_failing(openpose_weights_dir):
    """A 1 x 700 image would be a 184 x 128,800 network input upstream (minutes, gigabytes), a 600 x 2 one a width
    under a pixel (an OpenCV assertion); padded to 4:1 each takes about a second and gives a map of its own size."""
    from conditions.pose import pad_to_aspect

    wide, tall = np.full((1, 700, 3), 200, np.uint8), np.full((600, 2, 3), 200, np.uint8)
    assert pad_to_aspect(wide).shape == (175, 700, 3) and pad_to_aspect(tall).shape == (600, 150, 3)
    assert (pad_to_aspect(wide)[:1] == wide).all() and not pad_to_aspect(wide)[1:].any()
    photo = photographs()["astronaut"][:96, :192]
    assert pad_to_aspect(photo) is photo  # 2:1 is left alone
    extractor = PoseExtractor(weights_dir=openpose_weights_dir)
    for strip in (wide, tall):
        started = time.perf_counter()
        assert extractor(strip).shape == (3, *strip.shape[:2]) and time.perf_counter() - started < 20
        assert extractor.keypoints(strip) == []


def test_missing_weights_and_model_folders_are_named(tmp_path):
    with pytest.raises(WeightsNotFoundError, match=rf"weights file not found: {tmp_path}/body_pose_model\.pth"):
        PoseExtractor(weights_dir=tmp_path)
    with pytest.raises(WeightsNotFoundError, match=rf"model folder {tmp_path} has no config.json"):
        DepthExtractor(tmp_path)
    with pytest.raises(WeightsNotFoundError, match="model folder not found: /no/such/dpt"):
        DepthExtractor("/no/such/dpt")
    assert model_folder("Intel/dpt-hybrid-midas", "x") == "Intel/dpt-hybrid-midas"  # a hub id only when written


def test_grounding_from_coco_and_jsonl(tmp_path):
    coco = {
        "images": [{"id": 7, "file_name": "a.jpg", "width": 200, "height": 100}],
        "annotations": [{"image_id": 7, "category_id": 1, "bbox": [50, 25, 100, 50]}],
        "categories": [{"id": 1, "name": "dog"}],
    }
    (tmp_path / "coco.json").write_text(json.dumps(coco))
    record = read_grounding(tmp_path / "coco.json")["a.jpg"]
    np.testing.assert_allclose(record.boxes, [[0.25, 0.25, 0.75, 0.75]])
    assert record.phrases == ["dog"]
    (tmp_path / "g.jsonl").write_text(
        json.dumps({"file_name": "b.png", "boxes": [[0.1, 0.2, 0.3, 0.4]], "phrases": ["a cat"]})
        + "\n"
        + json.dumps({"file_name": "c.png", "boxes": [[0.5, 0.2, 0.3, 0.4]], "phrases": ["x"]})
        + "\n"
    )
    with pytest.raises(AnnotationError, match=r"g\.jsonl line 2: boxes must be normalised xyxy"):
        read_grounding(tmp_path / "g.jsonl")


def test_shapes_grounding_is_the_drawing():
    scene = render_scene(np.random.default_rng(2), size=64, num_objects=2)
    record = shapes_grounding(scene)
    assert isinstance(record, GroundingRecord) and record.phrases == [obj.phrase for obj in scene.objects]
    np.testing.assert_allclose(record.boxes, [obj.box for obj in scene.objects], rtol=0, atol=1e-7)
    assert record.to_json()["phrases"] == record.phrases
