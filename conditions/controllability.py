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

On ``shapes`` scenes (exact ground truth) every condition also gets :func:`scene_scores`: ``mask_iou`` of the
caption's colours against the true foreground, ``box_iou`` of each named object's region against its true box,
and ``caption_accuracy``. Adding a condition: write its scorer here with the decorator and a known-answer test.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from conditions.base import ConditionExtractor
from conditions.map_metrics import aligned_rmse, box_iou, edge_f1, map_ssim, palette_labels, segmentation_miou
from conditions.metrics import colour_mask, largest_component, mask_iou, score_shapes_image
from conditions.shapes import ShapeScene


@dataclass
class EvalSample:
    """One generated image with what it was conditioned on.

    generated: HxWx3 uint8 image; condition: HxWxC uint8 map the adapter was given (0..255);
    reference: HxWx3 uint8 image the condition was extracted from, where known; scene: the ``shapes`` scene.
    """

    generated: np.ndarray
    condition: np.ndarray
    reference: np.ndarray | None = None
    scene: ShapeScene | None = None


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
}

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


def score_samples(extractor: ConditionExtractor, samples: list[EvalSample]) -> list[dict[str, float]]:
    """Per sample: the condition's re-extraction scores, plus :func:`scene_scores` where the scene is known."""
    entry = _SCORERS.get(extractor.name)
    scores = entry[0](extractor, samples) if entry else [{} for _ in samples]
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
    correct, box_ious = True, []
    height, width = image.shape[:2]
    for obj in scene.objects:
        object_mask = colour_mask(image, obj.colour)
        named |= object_mask
        correct &= score_shapes_image(image, obj.colour, obj.shape, scene.background).caption_correct
        region = largest_component(object_mask)
        if region.any():
            ys, xs = np.nonzero(region)
            box = (xs.min() / width, ys.min() / height, (xs.max() + 1) / width, (ys.max() + 1) / height)
            box_ious.append(box_iou(np.array(box), np.array(obj.box)))
        else:
            box_ious.append(0.0)
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


# ------------------------------------------------------------------ one scorer per condition


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
