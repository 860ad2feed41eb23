"""The base model's samples for ``ctrlkit evaluate``, kept on disk between evaluations (``base_cache_dir``).

The base model's images depend only on its weights, its noise schedule, the prompts, the sampler and the seed, not
on the adapter or the condition: evaluating several adapters, or each subset of a multi-condition adapter, on one
evaluation set samples them once. The key hashes all of those, with the device and the torch / diffusers versions
(a sampler change in either must not reuse old images); an entry that cannot be read is sampled again, and one that
cannot be written is left out with a warning (the evaluation goes on).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import diffusers
import torch
from omegaconf import DictConfig

from lightning_modules.callbacks.base_model import read_base_images, write_base_images
from lightning_modules.feature_cache import FeatureCache, module_fingerprint

log = logging.getLogger(__name__)


class BaseImageCache:
    """Base-model images (B, 3, H, W) in [0, 1] per (prompts, sampling, seed) under ``folder``, for ``backbone`` as
    it is now (its weights are hashed once, before any adapter is loaded into its UNet)."""

    def __init__(self, folder: Path, backbone, device: str) -> None:
        self.folder = Path(folder)
        scheduler = dict(backbone.noise_scheduler.config)
        self.model_key = FeatureCache.key(
            module_fingerprint(backbone),
            json.dumps(
                [scheduler, str(device), torch.__version__, diffusers.__version__], sort_keys=True, default=str
            ),
        )
        self.read_count = 0

    def key(self, prompts: list[str], sampling: dict, seed: int) -> str:
        return FeatureCache.key(self.model_key, json.dumps([prompts, sampling, seed], sort_keys=True, default=str))

    def read(self, prompts: list[str], sampling: dict, seed: int) -> torch.Tensor | None:
        images = read_base_images(self.folder, self.key(prompts, sampling, seed))
        if images is not None and images.shape[0] != len(prompts):
            images = None  # not this batch's (a hash collision is not expected; a damaged file is)
        self.read_count += images is not None
        return images

    def write(self, prompts: list[str], sampling: dict, seed: int, images: torch.Tensor) -> None:
        try:
            write_base_images(self.folder, self.key(prompts, sampling, seed), images)
        except OSError as error:
            log.warning("base_cache_dir=%s: the base model's images not kept (%s)", self.folder, error)

    def report(self, batches: int) -> None:
        if self.read_count:
            log.info(
                "base model: %d of %d batches of samples read from %s (an earlier evaluation's; base_cache_dir=null "
                "samples them again)",
                self.read_count,
                batches,
                self.folder,
            )


def base_cache(cfg: DictConfig, backbone) -> BaseImageCache | None:
    """The cache ``base_cache_dir`` names, for the backbone as loaded (before any adapter); None where it is null."""
    folder = cfg.get("base_cache_dir")
    return BaseImageCache(Path(str(folder)), backbone, cfg.device) if folder else None
