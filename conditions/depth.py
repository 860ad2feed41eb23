"""Monocular depth (a DPT / MiDaS-style model through transformers), near = bright, at the input's size."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from conditions.base import NetworkExtractor
from conditions.resize import Resize
from conditions.weights import load_transformers_model


class DepthExtractor(NetworkExtractor):
    """Relative depth map from a transformers depth-estimation model (e.g. ``Intel/dpt-hybrid-midas``, the model
    behind controlnet_aux's ``MidasDetector``), normalised per image to 0..255 with near bright, as depth
    ControlNets were trained on.

    The model's own image processor prepares the input; its prediction is resized back to the input's size
    (bicubic) before normalising, so the map has the image's size whatever the model's working resolution.

    Args:
        model: a local transformers model folder (``config.json``, weights, ``preprocessor_config.json``), or a
            hub id given explicitly.
        channels: 3 (repeated to RGB) or 1.
        device: torch device the model runs on.
        resize: detection resolution / output size (``conditions.resize.Resize`` or its fields); default: none.
    """

    name = "depth"
    kind = "image"

    def __init__(
        self, model: str | Path, channels: int = 3, device: str = "cpu", resize: Resize | dict | None = None
    ) -> None:
        if channels not in (1, 3):
            raise ValueError(f"depth channels must be 1 or 3, got {channels}")
        source = "a transformers depth-estimation model folder (e.g. Intel/dpt-hybrid-midas)"
        self.processor, self.network = load_transformers_model(model, "AutoModelForDepthEstimation", source, device)
        self.model = str(model)
        self.channels = channels
        self.device = device
        self.resize = Resize.coerce(resize)

    @torch.no_grad()
    def run_network(self, images: list[np.ndarray]) -> list[np.ndarray]:
        """Same-sized HxWx3 uint8 RGB -> HxWx``channels`` uint8 depth (255 = nearest in each image, 0 = farthest)."""
        # channels_last said outright: the processor would guess channels-first for an image 1 or 3 pixels high
        inputs = self.processor(images=list(images), return_tensors="pt", input_data_format="channels_last")
        inputs = inputs.to(self.device)
        predicted = self.network(**inputs).predicted_depth  # (B, h, w): relative inverse depth, large = near
        height, width = images[0].shape[:2]
        depth = F.interpolate(predicted[:, None].float(), size=(height, width), mode="bicubic", align_corners=False)
        maps = []
        for single in depth[:, 0].cpu().numpy().astype(np.float64):
            span = single.max() - single.min()
            normalised = (single - single.min()) / span if span > 0 else np.zeros_like(single)
            map_ = (normalised * 255.0).round().astype(np.uint8)
            maps.append(np.repeat(map_[:, :, None], self.channels, axis=2))
        return maps
