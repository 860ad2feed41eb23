"""What the callbacks know about the base model without the adapter, so a short run does not recompute it.

The base model's samples and scores on the fixed validation items depend only on its weights, the items, the
sampler and the precision: ``base_model_key`` hashes all of them, and ``base_cache_dir`` keeps them for the next run.
A zero-initialized adapter (ControlNet's zero convolutions, GLIGEN's zero gates) leaves the UNet's prediction
unchanged bit for bit before its first step, so its step-0 samples *are* the base model's: ``adapter_is_inert``
checks that on the batch itself (one UNet forward with and one without the adapter) instead of trusting a flag,
and the callbacks then reuse the base model's samples and scores for step 0.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytorch_lightning as pl
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from adapters.base import run_unet
from conditions.io import write_atomically
from lightning_modules.condition_views import condition_key_bytes
from lightning_modules.feature_cache import FeatureCache, module_fingerprint, tensor_key_bytes


def base_model_key(trainer: pl.Trainer, pl_module: pl.LightningModule, batch: dict, sampling: dict, extra=None) -> str:
    """A key for what the base model computes on ``batch`` with ``sampling``: its weights, the items' pixels,
    conditions and prompts, the sampler, the trainer's precision, and ``extra`` (e.g. the extractor's settings).
    An adapter's layers inside the UNet (GLIGEN's) are not the base model's: they are left out of its weights."""
    return FeatureCache.key(
        module_fingerprint(pl_module.backbone, exclude=pl_module.adapter),
        tensor_key_bytes(batch["pixel_values"]),
        condition_key_bytes(batch["condition"]),
        json.dumps([list(batch["prompt"]), sampling, str(trainer.precision)], sort_keys=True),
        json.dumps(extra, sort_keys=True, default=str),
    )


@torch.no_grad()
def adapter_is_inert(pl_module: pl.LightningModule, batch: dict, seed: int = 0) -> bool:
    """Whether the adapter leaves the UNet's noise prediction unchanged, bit for bit, on ``batch`` (seeded latents
    at a middle timestep): true for a zero-initialized adapter before its first step, false once it has learned."""
    backbone, adapter = pl_module.backbone, pl_module.adapter
    height, width = (side // backbone.vae_scale_factor for side in batch["pixel_values"].shape[-2:])
    size = len(batch["prompt"])
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn(size, backbone.unet.config.in_channels, height, width, generator=generator)
    latents = latents.to(pl_module.device)
    timesteps = torch.full((size,), backbone.noise_scheduler.config.num_train_timesteps // 2, device=pl_module.device)
    was_training = pl_module.training
    pl_module.eval()
    try:
        with pl_module.precision_context():
            text = pl_module.text_embeddings(list(batch["prompt"]))
            pooled = pl_module.pooled_text_embeddings(list(batch["prompt"]))
            added = backbone.added_inputs(pooled, tuple(batch["pixel_values"].shape[-2:]))  # SDXL's; else None
            extra = {} if added is None else {"added_cond_kwargs": added}
            condition = pl_module.prepare_condition(batch["condition"])
            kwargs = adapter(
                condition, noisy_latents=latents, timesteps=timesteps, encoder_hidden_states=text, **extra
            )
            with_adapter = run_unet(backbone.unet, latents, timesteps, text, **extra, **kwargs)
            without = backbone.unet(latents, timesteps, text, **extra).sample
    finally:
        pl_module.train(was_training)
    return torch.equal(with_adapter, without)


def read_base_images(folder: Path, key: str) -> torch.Tensor | None:
    """The base model's images (B, 3, H, W) in [0, 1] kept under ``key``, or None."""
    try:
        return load_file(str(folder / f"{key}.safetensors"))["images"]
    except (OSError, SafetensorError, KeyError, ValueError):
        return None


def write_base_images(folder: Path, key: str, images: torch.Tensor) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    write_atomically(folder / f"{key}.safetensors", save({"images": images.detach().cpu().contiguous()}))
