"""Semantic segmentation (a transformers model, e.g. an ADE20K Segformer/UperNet) rendered with the ADE20K palette."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from conditions.base import NetworkExtractor, batched_by_size
from conditions.resize import Resize
from conditions.weights import load_transformers_model


class SegExtractor(NetworkExtractor):
    """Colour-coded segmentation map: class ``k`` is painted with ADE20K palette colour ``k``, the encoding seg
    ControlNets (lllyasviel's ``control_*_seg``, uniformer/OneFormer annotators) were trained on.

    The model's logits are resized to the input's size (bilinear) before the per-pixel argmax, so the map has the
    image's size; resizing a map back uses nearest neighbour so no blended, palette-less colours appear.

    Args:
        model: a local transformers semantic-segmentation model folder with ADE20K's 150 classes (e.g.
            ``nvidia/segformer-b0-finetuned-ade-512-512``), or a hub id given explicitly.
        device: torch device the model runs on.
        resize: detection resolution / output size (``conditions.resize.Resize`` or its fields); default: none.
    """

    name = "seg"
    kind = "image"
    map_interpolation = cv2.INTER_NEAREST

    def __init__(self, model: str | Path, device: str = "cpu", resize: Resize | dict | None = None) -> None:
        source = (
            "a transformers ADE20K semantic-segmentation model folder (e.g. nvidia/segformer-b0-finetuned-ade-512-512)"
        )
        self.processor, self.network = load_transformers_model(
            model, "AutoModelForSemanticSegmentation", source, device
        )
        from controlnet_aux.util import ade_palette  # the palette controlnet_aux and ControlNet's annotators use

        self.palette = np.asarray(ade_palette(), dtype=np.uint8)
        labels = self.network.config.num_labels
        if labels > len(self.palette):
            raise ValueError(f"seg model {model} has {labels} classes; the ADE20K palette colours {len(self.palette)}")
        self.model = str(model)
        self.channels = 3
        self.device = device
        self.resize = Resize.coerce(resize)

    def labels(self, images: Sequence[np.ndarray]) -> list[np.ndarray]:
        """HxWx3 uint8 images -> HxW int64 class indices (same size as each image)."""
        return batched_by_size(images, self._labels)

    def run_network(self, images: list[np.ndarray]) -> list[np.ndarray]:
        """Same-sized HxWx3 uint8 RGB -> HxWx3 uint8 ADE20K palette colours."""
        return [self.palette[label] for label in self._labels(images)]

    @torch.no_grad()
    def _labels(self, images: list[np.ndarray]) -> list[np.ndarray]:
        # channels_last said outright: the processor would guess channels-first for an image 1 or 3 pixels high
        inputs = self.processor(images=list(images), return_tensors="pt", input_data_format="channels_last")
        inputs = inputs.to(self.device)
        logits = self.network(**inputs).logits  # (B, classes, h, w)
        logits = F.interpolate(logits.float(), size=images[0].shape[:2], mode="bilinear", align_corners=False)
        return list(logits.argmax(dim=1).cpu().numpy())
