"""Grounding records from an open-vocabulary detector in transformers (OWL-ViT, OWLv2): boxes for given phrases.

``conditions.boxes`` reads grounding records from annotation files and from the ``shapes`` ground truth; this file
makes them for any photograph: the detector scores every predicted box against each phrase, and the boxes that
clear ``threshold`` (after per-phrase non-maximum suppression) become the record, best first.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from conditions.base import ConditionExtractor, to_uint8_hwc
from conditions.boxes import GroundingRecord
from conditions.weights import load_transformers_model

# model_type (config.json) -> how its processor frames the image: OWL-ViT stretches it to a square, OWLv2 pads it
# to a square at the bottom and right first, so OWLv2's boxes are fractions of the padded square's side.
SUPPORTED_MODELS = ("owlvit", "owlv2")
SOURCE = (
    "a transformers OWL-ViT or OWLv2 model folder (config.json, weights, preprocessor_config.json and tokenizer "
    "files, e.g. google/owlvit-base-patch32 or google/owlv2-base-patch16-ensemble saved with save_pretrained)"
)


@dataclass
class DetectedBoxes(GroundingRecord):
    """A ``GroundingRecord`` with each box's detector score: ``scores`` (N,) float32 in [0, 1], descending."""

    scores: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32), repr=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.scores = np.asarray(self.scores, dtype=np.float32).reshape(-1)
        if len(self.scores) != len(self.phrases):
            raise ValueError(f"{len(self.scores)} scores but {len(self.phrases)} boxes")

    def to_json(self) -> dict:
        return {**super().to_json(), "scores": self.scores.round(6).tolist()}


class DetectedBoxesExtractor(ConditionExtractor):
    """Boxes of the given phrases found by an OWL-ViT / OWLv2 detector: a grounding record per image.

    Each of the detector's predicted boxes gets the phrase it scores highest (sigmoid of the logit, as transformers'
    ``post_process_object_detection``); boxes scoring at least ``threshold`` are kept, overlapping boxes of one
    phrase are suppressed (IoU above ``nms_iou``), and the ``max_boxes`` best remain, best first. Boxes are
    normalised xyxy of the input image (whatever its aspect ratio), clipped to [0, 1]; boxes less than one pixel
    wide or high once clipped are dropped.

    Args:
        model: a local transformers OWL-ViT/OWLv2 folder (see ``SOURCE``), or a hub id given explicitly.
        phrases: what to look for, e.g. ``["a cat", "a remote control"]``.
        threshold: minimum score in [0, 1] of a kept box (OWL-ViT's examples use 0.1).
        nms_iou: a box overlapping a better box of the same phrase by more than this IoU is dropped (1 = keep all).
        max_boxes: at most this many boxes per image (GLIGEN takes up to 30).
        device: torch device the model runs on.
    """

    name = "detected_boxes"
    kind = "grounding"
    channels = 0

    def __init__(
        self,
        model: str | Path,
        phrases: Sequence[str],
        threshold: float = 0.1,
        nms_iou: float = 0.3,
        max_boxes: int = 30,
        device: str = "cpu",
    ) -> None:
        phrases = [str(phrase) for phrase in phrases]
        if not phrases or not all(phrase.strip() for phrase in phrases):
            raise ValueError(f"detected_boxes needs at least one non-empty phrase, got {phrases}")
        if not 0 <= threshold <= 1 or not 0 <= nms_iou <= 1:
            raise ValueError(f"threshold and nms_iou must lie in [0, 1], got {threshold} and {nms_iou}")
        if max_boxes < 1:
            raise ValueError(f"max_boxes must be >= 1, got {max_boxes}")
        self.processor, self.network = load_transformers_model(
            model,
            "AutoModelForZeroShotObjectDetection",
            SOURCE,
            device,
            processor_class="AutoProcessor",
            # hub folders hold preprocessor_config.json; transformers 5 saves a processor as processor_config.json
            required_files=(("preprocessor_config.json", "processor_config.json"), "tokenizer_config.json"),
        )
        model_type = self.network.config.model_type
        if model_type not in SUPPORTED_MODELS:
            raise ValueError(f"detected_boxes supports {', '.join(SUPPORTED_MODELS)} models; {model} is {model_type}")
        self._padded_square = model_type == "owlv2"
        self.model = str(model)
        self.phrases = phrases
        self.threshold = threshold
        self.nms_iou = nms_iou
        self.max_boxes = max_boxes
        self.device = device

    def settings(self) -> dict:
        """Name and settings as plain values, the phrases included (they decide the output)."""
        return {**super().settings(), "phrases": list(self.phrases)}

    def extract(self, image: np.ndarray) -> DetectedBoxes:
        """One HxWx3 uint8 RGB image -> its record (boxes, phrases, scores)."""
        return self.detect([image])[0]

    def process_batch(self, images: Sequence[np.ndarray]) -> list[DetectedBoxes]:
        """Images (any of ``to_uint8_hwc``'s inputs, any sizes) -> one record each, in one forward pass."""
        return self.detect([to_uint8_hwc(image) for image in images])

    def process(self, image: np.ndarray | torch.Tensor) -> DetectedBoxes:
        return self.process_batch([image])[0]

    def __call__(self, image: np.ndarray | torch.Tensor) -> DetectedBoxes | list[DetectedBoxes]:
        """An HxW(xC) uint8 array -> its record; a (B, 3, H, W) tensor (uint8, or float in [0, 1]) -> B records."""
        if isinstance(image, torch.Tensor) and image.ndim == 4:
            return self.process_batch(list(image))
        return self.process(image)

    @torch.no_grad()
    def detect(self, images: Sequence[np.ndarray], phrases: Sequence[str] | None = None) -> list[DetectedBoxes]:
        """HxWx3 uint8 RGB images (sizes may differ: the processor brings each to the model's size) -> records.
        ``phrases``: what to look for this time instead of the configured phrases (re-extraction asks for the
        phrases a sample was grounded on)."""
        if not images:
            return []
        phrases = self.phrases if phrases is None else [str(phrase) for phrase in phrases]
        # the processor hands the arrays to torch, which warns on read-only ones (decoded files can be)
        images = [image if image.flags.writeable else image.copy() for image in images]
        inputs = self.processor(text=[phrases] * len(images), images=images, return_tensors="pt")
        outputs = self.network(**inputs.to(self.device))
        # (B, boxes): each box's best phrase by logit, then its sigmoid score (transformers' order: a sigmoid first
        # would tie saturated logits and pick another phrase)
        logits, labels = outputs.logits.float().max(dim=-1)
        scores = logits.sigmoid()
        return [
            self._record(image.shape[:2], box_scores, box_labels, boxes, phrases)
            for image, box_scores, box_labels, boxes in zip(images, scores, labels, outputs.pred_boxes.float())
        ]

    def _record(
        self,
        size: tuple[int, int],
        scores: torch.Tensor,
        labels: torch.Tensor,
        boxes: torch.Tensor,
        phrases: Sequence[str],
    ) -> DetectedBoxes:
        """One image's (boxes,) scores and phrase indices and (boxes, 4) normalised cxcywh -> its record."""
        from torchvision.ops import batched_nms

        height, width = size
        center, extent = boxes[:, :2], boxes[:, 2:] / 2
        corners = torch.cat([center - extent, center + extent], dim=1)  # xyxy, fractions of the model's frame
        if self._padded_square:  # fractions of a max(H, W) square -> fractions of the image
            side = max(height, width)
            corners = corners * torch.tensor([side / width, side / height] * 2)
        corners = corners.clamp(0, 1)
        # a box under one pixel wide or high (once clipped to the image) marks nothing
        extent = (corners[:, 2:] - corners[:, :2]) * torch.tensor([width, height])
        keep = (scores >= self.threshold) & (extent >= 1).all(dim=1)
        scores, labels, corners = scores[keep], labels[keep], corners[keep]
        kept = batched_nms(corners, scores, labels, self.nms_iou)[: self.max_boxes]  # best first
        return DetectedBoxes(
            boxes=corners[kept].cpu().numpy(),
            phrases=[phrases[i] for i in labels[kept].tolist()],
            scores=scores[kept].cpu().numpy(),
        )
