"""Scores that compare a re-extracted condition with the one the adapter was given (ControlNet++ ``eval/*``).

Every function takes one image's maps and returns a float; ``conditions.controllability`` applies the right one
to each condition. Built on torchmetrics where it has the metric (F1, SSIM, mIoU, box IoU); PCK and AP are
written here (torchmetrics has no PCK, and its mAP needs pycocotools, which ctrlkit does not depend on).
"""

from __future__ import annotations

import numpy as np
import torch
from torchmetrics.functional.classification import binary_f1_score
from torchmetrics.functional.image import structural_similarity_index_measure
from torchmetrics.functional.segmentation import mean_iou

from conditions.metrics import box_iou


def edge_f1(predicted: np.ndarray, target: np.ndarray) -> float:
    """Pixel-exact F1 of two HxW boolean edge maps (ControlNet++'s ``BinaryF1Score`` on Canny edges): an edge one
    pixel off counts as a miss. 1.0 when neither map has an edge."""
    predicted, target = np.asarray(predicted, bool), np.asarray(target, bool)
    if not predicted.any() and not target.any():
        return 1.0
    return float(binary_f1_score(torch.from_numpy(predicted).flatten(), torch.from_numpy(target).flatten()))


def map_ssim(predicted: np.ndarray, target: np.ndarray) -> float:
    """SSIM (11x11 Gaussian window, data range 1) of two HxW float maps in [0, 1]; 1.0 for identical maps."""
    pair = [torch.as_tensor(np.asarray(m, np.float32))[None, None] for m in (predicted, target)]
    return float(structural_similarity_index_measure(pair[0], pair[1], data_range=1.0))


def aligned_rmse(predicted: np.ndarray, target: np.ndarray) -> float:
    """RMSE between ``s * predicted + t`` and ``target`` (HxW, same units), with the scale ``s`` and shift ``t``
    fitted per image by least squares.

    Relative depth estimators (MiDaS, DPT) give depth up to an unknown scale and shift, so the map is aligned to
    the target before comparing (the MiDaS evaluation protocol); ControlNet++ compares 8-bit maps unaligned. The
    result is in the target's units (0..255 for 8-bit maps).
    """
    x = np.asarray(predicted, np.float64).ravel()
    y = np.asarray(target, np.float64).ravel()
    design = np.stack([x, np.ones_like(x)], axis=1)
    (scale, shift), *_ = np.linalg.lstsq(design, y, rcond=None)
    return float(np.sqrt(np.mean((scale * x + shift - y) ** 2)))


def segmentation_miou(predicted: np.ndarray, target: np.ndarray, num_classes: int) -> float:
    """Mean IoU of two HxW integer label maps over the classes present in either (torchmetrics ``mean_iou``)."""
    pair = [torch.as_tensor(np.asarray(m, np.int64))[None] for m in (predicted, target)]
    return float(mean_iou(pair[0], pair[1], num_classes=num_classes, input_format="index")[0])


def palette_labels(colour_map: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """HxWx3 uint8 colour-coded segmentation -> HxW int64 labels: each pixel's nearest palette colour (exact for
    maps the seg extractor drew; nearest also survives lossy re-encoding)."""
    pixels = colour_map.reshape(-1, 1, 3).astype(np.int32)
    distances = ((pixels - palette.astype(np.int32)[None]) ** 2).sum(-1)
    return distances.argmin(-1).reshape(colour_map.shape[:2]).astype(np.int64)


Keypoint = tuple[float, float] | None


def keypoint_pck(predicted: list[list[Keypoint]], reference: list[list[Keypoint]], alpha: float = 0.2) -> float:
    """Percentage of Correct Keypoints: the fraction of the reference people's found keypoints that the matching
    generated person has within ``alpha`` times the reference person's bounding-box size (its larger side).

    People are lists of (x, y) normalised keypoints (None where a part was not found). Each reference person is
    matched to the generated person (unused so far) that gets the most keypoints right. 1.0 when the reference has
    no keypoint at all.
    """
    total = sum(k is not None for person in reference for k in person)
    if total == 0:
        return 1.0
    available = list(range(len(predicted)))
    correct = 0
    for person in reference:
        points = [k for k in person if k is not None]
        if not points or not available:
            continue
        xs, ys = zip(*points)
        threshold = alpha * max(max(xs) - min(xs), max(ys) - min(ys), 1e-6)

        def hits(candidate: list[Keypoint], person=person, threshold=threshold) -> int:
            return sum(
                r is not None and c is not None and np.hypot(r[0] - c[0], r[1] - c[1]) <= threshold
                for r, c in zip(person, candidate)
            )

        best = max(available, key=lambda index: hits(predicted[index]))
        correct += hits(predicted[best])
        available.remove(best)
    return correct / total


def average_precision(
    detections: list[list[tuple[np.ndarray, float, str]]],
    ground_truth: list[list[tuple[np.ndarray, str]]],
    iou_threshold: float = 0.5,
) -> float:
    """AP at one IoU threshold over a set of images, averaged over labels (VOC all-point interpolation).

    Args:
        detections: per image, (box xyxy, confidence, label) of each detected object.
        ground_truth: per image, (box xyxy, label) of each true object.
    A detection is a true positive when it overlaps an unmatched true box of its label by ``iou_threshold``;
    detections are ranked by confidence over all images.
    """
    labels = sorted({label for image in ground_truth for _, label in image})
    precisions = []
    for label in labels:
        ranked = sorted(
            ((confidence, image, box) for image, found in enumerate(detections) for box, confidence, lab in found
             if lab == label),
            key=lambda entry: -entry[0],
        )  # fmt: skip
        truths = {image: [box for box, lab in found if lab == label] for image, found in enumerate(ground_truth)}
        count = sum(len(boxes) for boxes in truths.values())
        used = {image: [False] * len(boxes) for image, boxes in truths.items()}
        hits = []
        for _, image, box in ranked:
            ious = [box_iou(box, truth) for truth in truths.get(image, [])]
            best = int(np.argmax(ious)) if ious else -1
            matched = best >= 0 and ious[best] >= iou_threshold and not used[image][best]
            if matched:
                used[image][best] = True
            hits.append(matched)
        true_positives = np.cumsum(hits)
        recall = true_positives / count
        precision = true_positives / np.arange(1, len(hits) + 1)
        # all-point interpolation: precision made monotone from the right, integrated over recall
        envelope = np.maximum.accumulate(np.concatenate([precision, [0.0]])[::-1])[::-1]
        steps = np.diff(np.concatenate([[0.0], recall]))
        precisions.append(float((steps * envelope[:-1]).sum()) if len(hits) else 0.0)
    return float(np.mean(precisions)) if precisions else 1.0
