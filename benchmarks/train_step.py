"""Time one ControlNet training step on the tiny model, against the frozen UNet's forward alone, in one process.

Run by hand:  python benchmarks/train_step.py [--batch-size 16] [--repeats 30]
Prints the median seconds per step of (a) the full training step (VAE encode, text encode, ControlNet, UNet,
backward, AdamW) and (b) a UNet forward at the same batch, and their ratio. One thread, medians after warm-up,
as this shared 2-core machine needs (see shared/reference/performance.md, "Benchmark hygiene").
"""

import argparse
import statistics
import time

import torch

from adapters import ControlNetAdapter
from conditions import CannyExtractor
from lightning_modules.backbone import build_tiny_backbone
from lightning_modules.data.shapes import ShapesDataModule
from lightning_modules.system import AdapterTrainingSystem, ConditionDropout


def median_seconds(function, repeats: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        function()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    torch.set_num_threads(1)

    backbone = build_tiny_backbone()
    adapter = ControlNetAdapter.from_unet(backbone.unet, vae_scale_factor=backbone.vae_scale_factor)
    system = AdapterTrainingSystem(backbone, adapter)
    optimizer = torch.optim.AdamW(adapter.param_groups(1e-4))
    batch = ShapesDataModule(CannyExtractor(), val_size=args.batch_size).fixed_batch(args.batch_size)

    def train_step() -> None:
        loss = system.compute_loss(batch, dropout=ConditionDropout(text=0.5))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    latents = backbone.encode_images(batch["pixel_values"])
    text = backbone.encode_prompts(list(batch["prompt"]))
    timesteps = torch.randint(0, 1000, (args.batch_size,))

    @torch.no_grad()
    def unet_forward() -> None:
        backbone.unet(latents, timesteps, text)

    step = median_seconds(train_step, args.repeats)
    reference = median_seconds(unet_forward, args.repeats)
    print(f"batch {args.batch_size}, 1 thread, median of {args.repeats}:")
    print(f"  ControlNet training step  {step * 1000:8.1f} ms")
    print(f"  frozen UNet forward       {reference * 1000:8.1f} ms")
    print(f"  ratio                     {step / reference:8.2f}x")


if __name__ == "__main__":
    main()
