"""Reward models the project trains and ships: the ``shapes`` segmenter (``conditions.shapes_segmenter``).

Train and ship it (1000 steps, about four minutes on a 2-core CPU; the shipped one was made by exactly this):
    python -m lightning_modules.reward_models lightning_modules/assets/reward_models/shapes_mask_segmenter
It learns the foreground of procedural scenes with 1-3 objects, half of each batch passed through the shipped tiny
model's VAE (encode, decode) so that it reads decoded images, the reward's input, as well as drawn ones; it prints
its mask IoU on held-out scenes, drawn and decoded.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from conditions.metrics import mask_iou
from conditions.shapes import render_scene
from conditions.shapes_segmenter import ShapesSegmenter
from lightning_modules.backbone import Backbone, load_tiny_backbone
from lightning_modules.errors import CtrlkitError

SHIPPED_SHAPES_SEGMENTER = Path(__file__).resolve().parent / "assets" / "reward_models" / "shapes_mask_segmenter"
TRAIN_SEED, HELD_OUT_SEED = 0, 1


def load_shapes_segmenter(path: str | Path | None = None) -> ShapesSegmenter:
    """The segmenter saved at ``path`` (a ``save_pretrained`` folder; None: the shipped one), frozen, in eval mode."""
    folder = Path(path) if path is not None else SHIPPED_SHAPES_SEGMENTER
    if not (folder / "config.json").is_file():
        raise CtrlkitError(
            f"no shapes segmenter at {folder} (config.json not found); train one with "
            f"`python -m lightning_modules.reward_models {folder}`"
        )
    try:
        model = ShapesSegmenter.from_pretrained(folder)
    except (OSError, ValueError, RuntimeError, TypeError) as error:  # a corrupt or foreign file: one line
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CtrlkitError(f"cannot load the shapes segmenter from {folder}: {first_line}") from error
    return model.eval().requires_grad_(False)


def scene_batch(rng: np.random.Generator, count: int, size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` scenes with 1-3 objects: images (B, 3, H, W) in [0, 1] and foreground masks (B, 1, H, W) in {0, 1}."""
    scenes = [render_scene(rng, size, (1, 3)) for _ in range(count)]
    images = torch.from_numpy(np.stack([s.image for s in scenes])).permute(0, 3, 1, 2).float() / 255.0
    masks = torch.from_numpy(np.stack([s.foreground_mask for s in scenes]))[:, None].float()
    return images, masks


def decoded_half(backbone: Backbone | None, images: torch.Tensor) -> torch.Tensor:
    """The batch with its first half replaced by VAE round trips (all drawn without a backbone)."""
    if backbone is None:
        return images
    half = images.shape[0] // 2
    return torch.cat([backbone.vae_round_trip(images[:half]), images[half:]])


def train_shapes_segmenter(
    steps: int = 1000,
    batch_size: int = 32,
    learning_rate: float = 2e-3,
    backbone: Backbone | None = None,
    seed: int = TRAIN_SEED,
    progress: bool = True,
) -> ShapesSegmenter:
    """A ``ShapesSegmenter`` trained with binary cross-entropy on fresh scenes each step (``decoded_half``)."""
    torch.manual_seed(seed)
    rng = np.random.default_rng([seed, 7])
    model = ShapesSegmenter()
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    for _ in tqdm(range(steps), desc="shapes segmenter", disable=not progress):
        images, masks = scene_batch(rng, batch_size)
        loss = F.binary_cross_entropy_with_logits(model(decoded_half(backbone, images)), masks)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    return model.eval().requires_grad_(False)


@torch.no_grad()
def held_out_mask_iou(model: ShapesSegmenter, backbone: Backbone | None = None, count: int = 64) -> dict[str, float]:
    """Mean mask IoU on ``count`` held-out scenes, drawn (``drawn``) and, with a backbone, VAE round trips
    (``decoded``)."""
    images, masks = scene_batch(np.random.default_rng([HELD_OUT_SEED, 7]), count)
    inputs = {"drawn": images, **({"decoded": backbone.vae_round_trip(images)} if backbone is not None else {})}
    targets = (masks[:, 0] > 0.5).numpy()
    scores = {}
    for name, batch in inputs.items():
        found = model.predict_mask(batch)[:, 0].numpy()
        scores[name] = float(np.mean([mask_iou(mask, target) for mask, target in zip(found, targets)]))
    return scores


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="train the shapes segmenter (the shapes_mask reward model)")
    parser.add_argument("output_dir", type=Path)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args(argv)
    backbone = load_tiny_backbone()
    model = train_shapes_segmenter(args.steps, args.batch_size, backbone=backbone)
    model.save_pretrained(args.output_dir, safe_serialization=True)
    scores = held_out_mask_iou(model, backbone)
    summary = ", ".join(f"{name} {value:.3f}" for name, value in scores.items())
    print(f"shapes segmenter: {args.steps} steps; held-out mask IoU {summary}")
    print(f"saved to {args.output_dir}")


if __name__ == "__main__":
    main()
