"""HED soft edges (controlnet_aux ``HEDdetector``'s Apache-2 network and weights), batched, at the input's size."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import torch

from conditions.base import NetworkExtractor
from conditions.resize import Resize
from conditions.weights import load_state_dict_file, weights_file

HED_MIN_SIDE = 16


class HEDExtractor(NetworkExtractor):
    """Soft edge map equal to controlnet_aux's ``HEDdetector`` for the same weights at the same resolution.

    Loads ``ControlNetHED.pth`` (lllyasviel/Annotators) into controlnet_aux's own ``ControlNetHED_Apache2`` and
    post-processes like ``HEDdetector.__call__`` (five side outputs resized bilinearly, mean, sigmoid); unlike it,
    a batch of same-sized images goes through the network at once and nothing is rounded to multiples of 64.

    Args:
        weights_dir: local folder holding ``filename``.
        filename: the upstream checkpoint name.
        hub_id: download ``filename`` from this Hugging Face repo instead (only when given).
        safe: quantise to 3 levels (controlnet_aux ``safe=True``, "softedge_hedsafe").
        scribble: thin and binarise into a scribble (controlnet_aux ``scribble=True``).
        channels: 3 (map repeated to RGB, what HED ControlNets take) or 1.
        device: torch device the network runs on.
        resize: detection resolution / output size (``conditions.resize.Resize`` or its fields); default: none.
    """

    name = "hed"
    kind = "image"

    def __init__(
        self,
        weights_dir: str | Path | None = None,
        filename: str = "ControlNetHED.pth",
        hub_id: str | None = None,
        safe: bool = False,
        scribble: bool = False,
        channels: int = 3,
        device: str = "cpu",
        resize: Resize | dict | None = None,
    ) -> None:
        if channels not in (1, 3):
            raise ValueError(f"hed channels must be 1 or 3, got {channels}")
        path = weights_file(weights_dir, filename, "lllyasviel/Annotators", hub_id)
        from controlnet_aux.hed import ControlNetHED_Apache2  # heavy package import, only when HED is used

        network = ControlNetHED_Apache2()
        network.load_state_dict(load_state_dict_file(path))
        self.network = network.float().eval().requires_grad_(False).to(device)
        self.weights = str(path)
        self.safe = safe
        self.scribble = scribble
        self.channels = channels
        self.device = device
        self.resize = Resize.coerce(resize)

    @torch.no_grad()
    def run_network(self, images: list[np.ndarray]) -> list[np.ndarray]:
        """Same-sized HxWx3 uint8 RGB -> HxWx``channels`` uint8 soft edges (0..255)."""
        from controlnet_aux.util import nms, safe_step

        height, width = images[0].shape[:2]
        # four 2x2 poolings: a side under 16 px would pool away to nothing, so tiny images are padded (edge pixels
        # repeated) and the maps cropped back; larger images run unchanged, as controlnet_aux runs them
        pad_bottom, pad_right = max(0, HED_MIN_SIDE - height), max(0, HED_MIN_SIDE - width)
        if pad_bottom or pad_right:
            images = [cv2.copyMakeBorder(i, 0, pad_bottom, 0, pad_right, cv2.BORDER_REPLICATE) for i in images]
        # contiguous NCHW: the memory layout HEDdetector's single image ends up in, so PyTorch picks the same
        # convolution kernels and the output matches bit for bit
        batch = torch.from_numpy(np.stack(images)).float().permute(0, 3, 1, 2).contiguous().to(self.device)
        projections = [p[:, 0].float().cpu().numpy() for p in self.network(batch)]
        padded_height, padded_width = images[0].shape[:2]
        maps = []
        for index in range(len(images)):
            sides = [
                cv2.resize(p[index], (padded_width, padded_height), interpolation=cv2.INTER_LINEAR)[:height, :width]
                for p in projections
            ]
            edge = 1 / (1 + np.exp(-np.mean(np.stack(sides, axis=2), axis=2).astype(np.float64)))
            if self.safe:
                edge = safe_step(edge)
            edge = (edge * 255.0).clip(0, 255).astype(np.uint8)
            if self.scribble:
                edge = nms(edge, 127, 3.0)
                edge = cv2.GaussianBlur(edge, (0, 0), 3.0)
                edge[edge > 4] = 255
                edge[edge < 255] = 0
            maps.append(np.repeat(edge[:, :, None], self.channels, axis=2))
        return maps
