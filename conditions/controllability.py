"""Controllability by re-extraction: run the condition's own extractor on the generated image and compare.

Each condition names its scorer here (``@reextraction_scorer("canny", primary="canny_f1")``), so code that
evaluates an adapter asks the condition which metric applies and never branches on the adapter or the condition:

| condition | re-extraction | score(s) |
|---|---|---|
| canny | Canny with the same thresholds | ``canny_f1`` (pixel-exact), ``canny_ssim`` |
| hed | HED with the same weights | ``hed_ssim`` |
| depth | the same depth model | ``depth_rmse`` (8-bit units, after per-image least-squares scale/shift alignment) |
| seg | the same segmentation model | ``seg_miou`` (labels of the input map from its palette colours) |
| pose | OpenPose on the generated image and on the reference image | ``pose_pck`` (PCK@0.2 of the person box) |
| shapes_truth | the colours the caption names | ``mask_iou`` (mask) or ``depth_rmse`` (depth) |
| detected_boxes | the same detector, for the record's phrases | ``detected_box_iou``, ``detected_box_recall50`` |

On ``shapes`` scenes (exact ground truth) every condition also gets :func:`scene_scores`: ``mask_iou`` of the
caption's colours against the true foreground, ``box_iou`` of each named object's region against its true box,
and ``caption_accuracy``. Any grounding condition can also be scored by a local detector
(:func:`detector_box_scores`, ``ctrlkit evaluate box_detector=<folder>``). Adding a condition: write its scorer
here with the decorator and a known-answer test.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np

from conditions.base import ConditionExtractor
from conditions.boxes import GroundingRecord
from conditions.map_metrics import aligned_rmse, edge_f1, map_ssim, palette_labels, segmentation_miou
from conditions.metrics import box_iou, colour_mask, largest_component, mask_iou, named_box_ious, score_shapes_image
from conditions.shapes import ShapeScene


@dataclass
class EvalSample:
    """One generated image with what it was conditioned on.

    generated: HxWx3 uint8 image; condition: HxWxC uint8 map the adapter was given (0..255), None for grounding;
    reference: HxWx3 uint8 image the condition was extracted from, where known; scene: the ``shapes`` scene;
    grounding: the boxes and phrases a grounding adapter was given.
    """

    generated: np.ndarray
    condition: np.ndarray | None
    reference: np.ndarray | None = None
    scene: ShapeScene | None = None
    grounding: GroundingRecord | None = None


@dataclass(frozen=True)
class ControlMetric:
    """How to read a score: its best value and direction (for the jump detector and plots)."""

    higher_is_better: bool = True
    perfect: float = 1.0
    # value range, for plotting on a common 0..1 axis
    scale: float = 1.0

    def gain(self, score: float, base: float) -> float:
        """The fraction of the possible improvement over ``base`` that ``score`` achieved (1 = perfect)."""
        room = (self.perfect - base) if self.higher_is_better else (base - self.perfect)
        change = (score - base) if self.higher_is_better else (base - score)
        return change / room if room > 1e-12 else 0.0


METRICS: dict[str, ControlMetric] = {
    "canny_f1": ControlMetric(),
    "canny_ssim": ControlMetric(),
    "hed_ssim": ControlMetric(),
    "depth_rmse": ControlMetric(higher_is_better=False, perfect=0.0, scale=255.0),
    "seg_miou": ControlMetric(),
    "pose_pck": ControlMetric(),
    "mask_iou": ControlMetric(),
    "box_iou": ControlMetric(),
    "caption_accuracy": ControlMetric(),
    "detected_box_iou": ControlMetric(),
    "detected_box_recall50": ControlMetric(),
}


def metric_of(key: str) -> ControlMetric | None:
    """The metric a score key reports: ``canny_f1``, or ``unit1/canny_f1`` (a composition's unit 1); None for
    keys that are not scores."""
    return METRICS.get(key.rsplit("/", 1)[-1])


Scorer = Callable[[ConditionExtractor, list[EvalSample]], list[dict[str, float]]]
_SCORERS: dict[str, tuple[Scorer, Callable[[ConditionExtractor], str]]] = {}


def reextraction_scorer(condition: str, primary: str | Callable[[ConditionExtractor], str]):
    """Register ``scorer(extractor, samples) -> one dict of scores per sample`` for the extractor named
    ``condition``; ``primary`` is the score that tracks control best (or a function of the extractor)."""

    def register(scorer: Scorer) -> Scorer:
        _SCORERS[condition] = (scorer, primary if callable(primary) else (lambda extractor: primary))
        return scorer

    return register


def primary_metric(extractor: ConditionExtractor) -> str | None:
    """The re-extraction score of this condition (e.g. ``canny_f1``), or None when it has no scorer."""
    entry = _SCORERS.get(extractor.name)
    return None if entry is None else entry[1](extractor)


def reextraction_scores(extractor: ConditionExtractor, samples: list[EvalSample]) -> list[dict[str, float]]:
    """Per sample: the condition's re-extraction scores (empty dicts when it has no scorer)."""
    entry = _SCORERS.get(extractor.name)
    return entry[0](extractor, samples) if entry else [{} for _ in samples]


def score_samples(extractor: ConditionExtractor, samples: list[EvalSample]) -> list[dict[str, float]]:
    """Per sample: the condition's re-extraction scores, plus :func:`scene_scores` where the scene is known."""
    scores = reextraction_scores(extractor, samples)
    return [{**scene_scores(s.generated, s.scene), **row} if s.scene else row for s, row in zip(samples, scores)]


def mean_scores(rows: list[dict[str, float]]) -> dict[str, float]:
    """Mean of each score over the rows that have it (NaN rows, e.g. no reference image, are skipped)."""
    keys = sorted({key for row in rows for key in row})
    means = {}
    for key in keys:
        values = [row[key] for row in rows if key in row and not np.isnan(row[key])]
        if values:
            means[key] = float(np.mean(values))
    return means


# ------------------------------------------------------------------ shapes ground truth


def scene_scores(image: np.ndarray, scene: ShapeScene) -> dict[str, float]:
    """Scores of a generated HxWx3 uint8 image against the exact ``shapes`` scene its caption describes."""
    named = np.zeros(image.shape[:2], dtype=bool)
    correct = True
    for obj in scene.objects:
        named |= colour_mask(image, obj.colour)
        correct &= score_shapes_image(image, obj.colour, obj.shape, scene.background).caption_correct
    box_ious = named_box_ious(image, [(obj.colour, obj.box) for obj in scene.objects])
    return {
        "mask_iou": mask_iou(named, scene.foreground_mask),
        "box_iou": float(np.mean(box_ious)),
        "caption_accuracy": float(correct),
    }


def shapes_boxes(image: np.ndarray, scene: ShapeScene) -> list[tuple[np.ndarray, float, str]]:
    """Detections for AP on ``shapes``: per named colour, the box of its largest region in ``image`` (normalised
    xyxy), the region's share of the image as confidence, and the object's phrase as label."""
    height, width = image.shape[:2]
    found = []
    for obj in scene.objects:
        region = largest_component(colour_mask(image, obj.colour))
        if region.any():
            ys, xs = np.nonzero(region)
            box = np.array([xs.min() / width, ys.min() / height, (xs.max() + 1) / width, (ys.max() + 1) / height])
            found.append((box, float(region.mean()), obj.phrase))
    return found


def named_object_ious(found: GroundingRecord, given: GroundingRecord) -> list[float]:
    """Per given (box, phrase): the best IoU of a found box with the same phrase, 0.0 when none was found."""

    return [
        max((box_iou(box, target) for box, label in zip(found.boxes, found.phrases) if label == phrase), default=0.0)
        for target, phrase in zip(given.boxes, given.phrases)
    ]


def detect_named_objects(detector, samples: list[EvalSample]) -> list[GroundingRecord | None]:
    """Run ``detector`` (``DetectedBoxesExtractor``) on each generated image, asking for the phrases that sample
    was grounded on; None for samples without grounding."""
    found = []
    for s in samples:
        if s.grounding is None or not s.grounding.phrases:
            found.append(None)
            continue
        found.append(detector.detect([s.generated], phrases=list(dict.fromkeys(s.grounding.phrases)))[0])
    return found


def found_box_scores(found: list[GroundingRecord | None], samples: list[EvalSample]) -> list[dict[str, float]]:
    """Scores of the boxes a detector found again (``detect_named_objects``): the mean best IoU per given object
    and the share found at IoU >= 0.5; NaN (skipped in means) for a sample without grounding."""
    rows = []
    for s, record in zip(samples, found):
        if record is None:
            rows.append({"detected_box_iou": float("nan"), "detected_box_recall50": float("nan")})
            continue
        ious = np.array(named_object_ious(record, s.grounding))
        rows.append({"detected_box_iou": float(ious.mean()), "detected_box_recall50": float((ious >= 0.5).mean())})
    return rows


def detector_box_scores(detector, samples: list[EvalSample]) -> list[dict[str, float]]:
    """Boxes of the named objects re-found by ``detector``: :func:`found_box_scores` of its detections."""
    return found_box_scores(detect_named_objects(detector, samples), samples)


# ------------------------------------------------------------------ one scorer per condition


@reextraction_scorer("detected_boxes", primary="detected_box_iou")
def detected_boxes_scores(extractor, samples: list[EvalSample]) -> list[dict[str, float]]:
    """The condition's own detector, asked for each sample's phrases, finds its objects again."""
    return detector_box_scores(extractor, samples)


def _grey(map_: np.ndarray) -> np.ndarray:
    """HxWxC uint8 -> HxW float in [0, 1] (first channel: the maps repeat one channel to RGB)."""
    return map_[:, :, 0].astype(np.float32) / 255.0


@reextraction_scorer("canny", primary="canny_f1")
def canny_scores(extractor: ConditionExtractor, samples: list[EvalSample]) -> list[dict[str, float]]:
    edges = extractor.process_batch([s.generated for s in samples])
    return [
        {
            "canny_f1": edge_f1(found[:, :, 0] > 127, s.condition[:, :, 0] > 127),
            "canny_ssim": map_ssim(_grey(found), _grey(s.condition)),
        }
        for found, s in zip(edges, samples)
    ]


@reextraction_scorer("hed", primary="hed_ssim")
def hed_scores(extractor: ConditionExtractor, samples: list[EvalSample]) -> list[dict[str, float]]:
    maps = extractor.process_batch([s.generated for s in samples])
    return [{"hed_ssim": map_ssim(_grey(found), _grey(s.condition))} for found, s in zip(maps, samples)]


@reextraction_scorer("depth", primary="depth_rmse")
def depth_scores(extractor: ConditionExtractor, samples: list[EvalSample]) -> list[dict[str, float]]:
    maps = extractor.process_batch([s.generated for s in samples])
    return [
        {"depth_rmse": aligned_rmse(found[:, :, 0], s.condition[:, :, 0].astype(np.float64))}
        for found, s in zip(maps, samples)
    ]


@reextraction_scorer("seg", primary="seg_miou")
def seg_scores(extractor, samples: list[EvalSample]) -> list[dict[str, float]]:
    labels = extractor.labels([s.generated for s in samples])
    classes = len(extractor.palette)
    return [
        {"seg_miou": segmentation_miou(found, palette_labels(s.condition[:, :, :3], extractor.palette), classes)}
        for found, s in zip(labels, samples)
    ]


@reextraction_scorer("pose", primary="pose_pck")
def pose_scores(extractor, samples: list[EvalSample]) -> list[dict[str, float]]:
    from conditions.map_metrics import keypoint_pck

    rows = []
    for s in samples:
        if s.reference is None:  # the keypoints of a drawn skeleton are not recoverable: NaN, skipped in means
            rows.append({"pose_pck": float("nan")})
            continue
        rows.append({"pose_pck": keypoint_pck(extractor.keypoints(s.generated), extractor.keypoints(s.reference))})
    return rows


def _shapes_truth_primary(extractor) -> str:
    return "mask_iou" if extractor.target == "mask" else "depth_rmse"


@reextraction_scorer("shapes_truth", primary=_shapes_truth_primary)
def shapes_truth_scores(extractor, samples: list[EvalSample]) -> list[dict[str, float]]:
    """Re-extract the ground-truth map from the colours the caption names (needs the scene)."""
    rows = []
    for s in samples:
        if s.scene is None:
            raise ValueError("the shapes ground-truth condition is scored against its scene: evaluate on data=shapes")
        found = np.zeros(s.generated.shape[:2], dtype=np.float64)
        count = len(s.scene.objects)
        for index, obj in enumerate(s.scene.objects):  # later objects cover earlier ones, as when drawn
            value = 255.0 if extractor.target == "mask" else round(255 * (index + 1) / count)
            found[colour_mask(s.generated, obj.colour)] = value
        if extractor.target == "mask":
            rows.append({"mask_iou": mask_iou(found > 127, s.condition[:, :, 0] > 127)})
        else:
            rows.append({"depth_rmse": aligned_rmse(found, s.condition[:, :, 0].astype(np.float64))})
    return rows


# ------------------------------------------------------------------ several conditions in one map


def _multi_primary(extractor) -> str | None:
    """The score of the first part given (a single-part evaluation scores like that part's own adapter)."""
    return primary_metric(extractor.parts[extractor.use[0]])


@reextraction_scorer("multi", primary=_multi_primary)
def multi_scores(extractor, samples: list[EvalSample]) -> list[dict[str, float]]:
    """Each given part scored by its own scorer on its channels of the condition (``conditions.multi``), so a
    multi-condition adapter given one part is scored exactly as that part's dedicated adapter is."""
    rows = [{} for _ in samples]
    for name in extractor.use:
        part = extractor.parts[name]
        part_samples = [replace(s, condition=extractor.split(s.condition)[name]) for s in samples]
        for row, scores in zip(rows, reextraction_scores(part, part_samples)):
            row.update(scores)
    return rows
