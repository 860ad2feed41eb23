"""Re-extraction controllability metrics on crafted inputs with known answers."""

import math
from types import SimpleNamespace

import numpy as np
import pytest

from conditions import CannyExtractor, DepthExtractor, HEDExtractor, PoseExtractor, SegExtractor
from conditions.boxes import GroundingRecord
from conditions.controllability import (
    METRICS,
    EvalSample,
    detector_box_scores,
    mean_scores,
    named_object_ious,
    primary_metric,
    scene_scores,
    score_samples,
    shapes_boxes,
)
from conditions.detected_boxes import DetectedBoxes
from conditions.map_metrics import (
    aligned_rmse,
    average_precision,
    edge_f1,
    keypoint_pck,
    map_ssim,
    palette_labels,
    segmentation_miou,
)
from conditions.metrics import box_iou
from conditions.shapes import render_scene
from conditions.shapes_truth import ShapesTruthExtractor

# ------------------------------------------------------------------ the metric functions


def test_edge_f1_known_values():
    target = np.zeros((8, 8), bool)
    target[2, 0:4] = True
    assert edge_f1(target, target) == 1.0
    predicted = np.zeros((8, 8), bool)
    predicted[2, 2:6] = True  # 2 of 4 right: precision 1/2, recall 1/2
    assert edge_f1(predicted, target) == pytest.approx(0.5)
    assert edge_f1(np.roll(target, 1, axis=0), target) == 0.0  # one pixel off is a miss
    assert edge_f1(np.zeros((4, 4), bool), np.zeros((4, 4), bool)) == 1.0


def test_shifted_edges_lower_f1():
    image = render_scene(np.random.default_rng(3), size=64).image
    canny = CannyExtractor(channels=1)
    edges = canny.process(image)[:, :, 0] > 127
    shifted = canny.process(np.roll(image, 3, axis=1))[:, :, 0] > 127
    assert edge_f1(edges, edges) == 1.0
    assert edge_f1(shifted, edges) < 0.5


def test_ssim_identical_and_different():
    rng = np.random.default_rng(0)
    a = rng.random((32, 32)).astype(np.float32)
    assert map_ssim(a, a) == pytest.approx(1.0, abs=1e-5)
    assert map_ssim(rng.random((32, 32)), a) < 0.2


def test_aligned_rmse_removes_scale_and_shift():
    target = np.random.default_rng(0).random((16, 16)) * 255
    assert aligned_rmse(2 * target + 3, target) == pytest.approx(0.0, abs=1e-9)
    # y = [0, 0, 1, 1] from x = [0, 1, 2, 3]: least squares gives s = 0.4, t = -0.1, residuals +-0.1, +-0.3
    x = np.array([[0.0, 1.0], [2.0, 3.0]])
    y = np.array([[0.0, 0.0], [1.0, 1.0]])
    assert aligned_rmse(x, y) == pytest.approx(math.sqrt(0.05))


def test_segmentation_miou_known_values():
    target = np.array([[0, 0, 1, 1]])
    assert segmentation_miou(target, target, num_classes=150) == 1.0
    # class 0: 2 / 3, class 1: 1 / 2; classes absent from both do not count
    assert segmentation_miou(np.array([[0, 0, 0, 1]]), target, num_classes=150) == pytest.approx((2 / 3 + 1 / 2) / 2)


def test_palette_labels_inverts_a_colour_map():
    palette = np.array([[0, 0, 0], [255, 0, 0], [0, 255, 0]], np.uint8)
    labels = np.array([[0, 1], [2, 1]])
    assert (palette_labels(palette[labels], palette) == labels).all()


def test_keypoint_pck_known_values():
    person = [(0.1, 0.1), (0.5, 0.5), (0.9, 0.9), None]
    assert keypoint_pck([person], [person]) == 1.0
    moved = [(0.1, 0.1), (0.5, 0.5), (0.1, 0.9), None]  # one of three found parts far off
    assert keypoint_pck([moved], [person]) == pytest.approx(2 / 3)
    assert keypoint_pck([], [person]) == 0.0
    assert keypoint_pck([person], []) == 1.0


def test_box_iou_and_average_precision():
    assert box_iou(np.array([0, 0, 2, 2]), np.array([1, 0, 3, 2])) == pytest.approx(1 / 3)
    truth = [[(np.array([0.1, 0.1, 0.5, 0.5]), "red circle")]]
    right = (np.array([0.1, 0.1, 0.5, 0.5]), 0.9, "red circle")
    wrong = (np.array([0.6, 0.6, 0.9, 0.9]), 0.8, "red circle")
    assert average_precision([[right]], truth) == 1.0
    assert average_precision([[wrong]], truth) == 0.0
    assert average_precision([[right, wrong]], truth) == 1.0  # the false positive ranks below full recall
    wrong_first = (wrong[0], 0.95, wrong[2])
    assert average_precision([[right, wrong_first]], truth) == pytest.approx(0.5)


# ------------------------------------------------------------------ scorers: the condition picks the metric


def _sample(extractor, image, generated=None, scene=None):
    return EvalSample(
        generated=image if generated is None else generated,
        condition=extractor.process(image),
        reference=image,
        scene=scene,
    )


def test_canny_scorer_perfect_on_the_source_and_lower_when_shifted():
    scene = render_scene(np.random.default_rng(7), size=64)
    canny = CannyExtractor()
    assert primary_metric(canny) == "canny_f1"
    exact, shifted = score_samples(
        canny, [_sample(canny, scene.image), _sample(canny, scene.image, np.roll(scene.image, 4, axis=0))]
    )
    assert exact["canny_f1"] == 1.0 and exact["canny_ssim"] == pytest.approx(1.0, abs=1e-5)
    assert shifted["canny_f1"] < 0.6 and shifted["canny_ssim"] < exact["canny_ssim"]


def test_scene_scores_on_the_drawn_image_are_perfect():
    for seed in range(10):
        scene = render_scene(np.random.default_rng(seed), size=64, num_objects=(1, 3))
        scores = scene_scores(scene.image, scene)
        assert scores["mask_iou"] == 1.0
        if len(scene.objects) == 1:  # occlusion can split or reshape an object's region in multi-object scenes
            assert scores["box_iou"] == pytest.approx(1.0) and scores["caption_accuracy"] == 1.0
    scene = render_scene(np.random.default_rng(0), size=64)
    blank = np.zeros_like(scene.image)
    blank[:] = scene.image[0, 0]  # background only
    assert scene_scores(blank, scene)["mask_iou"] == 0.0 and scene_scores(blank, scene)["box_iou"] == 0.0
    truth = [[(np.array(obj.box), obj.phrase) for obj in scene.objects]]
    assert average_precision([shapes_boxes(scene.image, scene)], truth) == 1.0


@pytest.mark.parametrize("target", ["mask", "depth"])
def test_shapes_truth_scorer(target):
    scene = render_scene(np.random.default_rng(2), size=64, num_objects=2)
    extractor = ShapesTruthExtractor(target=target)
    sample = EvalSample(scene.image, extractor.scene_map(scene), scene.image, scene)
    metric = primary_metric(extractor)
    assert metric == ("mask_iou" if target == "mask" else "depth_rmse")
    (scores,) = score_samples(extractor, [sample])
    assert scores[metric] == pytest.approx(METRICS[metric].perfect, abs=1e-9)
    sample.generated = np.roll(scene.image, 10, axis=1)
    (moved,) = score_samples(extractor, [sample])
    worse = moved[metric] < 1.0 if METRICS[metric].higher_is_better else moved[metric] > 1.0
    assert worse  # the drawing moved away from the condition


def test_network_scorers_are_perfect_when_regenerating_the_source(hed_weights_dir, dpt_dir, segformer_dir):
    image = render_scene(np.random.default_rng(4), size=64).image
    for extractor, key in (
        (HEDExtractor(weights_dir=hed_weights_dir), "hed_ssim"),
        (DepthExtractor(model=dpt_dir), "depth_rmse"),
        (SegExtractor(model=segformer_dir), "seg_miou"),
    ):
        assert primary_metric(extractor) == key
        (scores,) = score_samples(extractor, [_sample(extractor, image)])
        assert scores[key] == pytest.approx(METRICS[key].perfect, abs=1e-3), key  # float32 SSIM


def test_pose_scorer_needs_the_reference_image(openpose_weights_dir):
    pose = PoseExtractor(weights_dir=openpose_weights_dir)
    image = render_scene(np.random.default_rng(4), size=64).image
    with_reference, without = score_samples(pose, [_sample(pose, image), EvalSample(image, pose.process(image), None)])
    assert 0.0 <= with_reference["pose_pck"] <= 1.0
    assert math.isnan(without["pose_pck"])
    assert mean_scores([with_reference, without]) == {"pose_pck": with_reference["pose_pck"]}


def test_gain_is_the_fraction_of_the_possible_improvement():
    assert METRICS["canny_f1"].gain(0.6, base=0.2) == pytest.approx(0.5)
    assert METRICS["depth_rmse"].gain(10.0, base=40.0) == pytest.approx(0.75)
    assert METRICS["mask_iou"].gain(0.5, base=1.0) == 0.0


class _FakeDetector:
    """Finds fixed boxes and records the phrases it was asked for."""

    def __init__(self, found: DetectedBoxes) -> None:
        self.found, self.asked = found, []

    def detect(self, images, phrases):
        self.asked.append(list(phrases))
        return [self.found for _ in images]


def test_detector_box_scores_known_values():
    found = DetectedBoxes(
        boxes=np.array([[0, 0, 0.5, 0.5], [0.5, 0.5, 1, 1], [0, 0, 0.5, 0.5]]),
        phrases=["red circle", "blue square", "green square"],
        scores=np.array([0.9, 0.8, 0.7]),
    )
    detector = _FakeDetector(found)
    image = np.zeros((8, 8, 3), np.uint8)
    given = GroundingRecord(
        # red circle: found exactly; blue square: half of its box found (IoU 0.5); yellow: not found at all
        np.array([[0, 0, 0.5, 0.5], [0.5, 0, 1, 1], [0, 0, 1, 1]]),
        ["red circle", "blue square", "yellow circle"],
    )
    samples = [
        EvalSample(generated=image, condition=None, grounding=given),
        EvalSample(generated=image, condition=None, grounding=None),
    ]
    scores = detector_box_scores(detector, samples)
    assert scores[0]["detected_box_iou"] == pytest.approx((1.0 + 0.5 + 0.0) / 3)
    assert scores[0]["detected_box_recall50"] == pytest.approx(2 / 3)
    assert math.isnan(scores[1]["detected_box_iou"])  # no grounding: skipped in means
    assert detector.asked == [["red circle", "blue square", "yellow circle"]]  # each sample's own phrases
    # a found box with another phrase does not count: green square sits on the red circle's box
    assert named_object_ious(found, GroundingRecord(np.array([[0, 0, 0.5, 0.5]]), ["green square"])) == [1.0]
    assert named_object_ious(found, GroundingRecord(np.array([[0, 0, 0.5, 0.5]]), ["blue circle"])) == [0.0]
    assert primary_metric(SimpleNamespace(name="detected_boxes")) == "detected_box_iou"
