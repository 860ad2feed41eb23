"""Sampling cost of compositions on the shipped tiny model, measured in one process (issue: `ctrlkit generate`).

Run by hand:  python benchmarks/composition_sampling.py [--repeats 15] [--steps 20]
Prints median seconds of a 20-step guided sampling run (2 prompts) for:
  (a) one ControlNet over the full window, and with its window ending at 0.5 (target ratio <= 0.8);
  (b) our sampling vs diffusers' StableDiffusionControlNetPipeline on the same models (target ratio <= 1.02);
  (c) ControlNet + T2I-Adapter vs ControlNet alone, per step (target ratio <= 1.05), when a T2I-Adapter exists.
One thread, runs interleaved, medians after warm-up (shared/reference/performance.md, "Benchmark hygiene").
"""

import argparse
import statistics
import time

import torch
from diffusers import StableDiffusionControlNetPipeline

from adapters import ControlNetAdapter, make_scheduler, sample_latents
from adapters.composition import Composition, ControlUnit
from lightning_modules.backbone import load_tiny_backbone

PROMPTS = ["a red circle on a blue background", "a green square on a white background"]


def interleaved_medians(functions: dict, repeats: int, warmup: int = 2) -> dict[str, float]:
    """Median seconds of each function, run in turns so machine noise hits all of them alike."""
    for function in functions.values():
        for _ in range(warmup):
            function()
    times = {name: [] for name in functions}
    for _ in range(repeats):
        for name, function in functions.items():
            start = time.perf_counter()
            function()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(1)

    backbone = load_tiny_backbone()
    controlnet = ControlNetAdapter.from_unet(backbone.unet, vae_scale_factor=backbone.vae_scale_factor).eval()
    condition = (torch.rand(len(PROMPTS), 3, 64, 64, generator=torch.Generator().manual_seed(0)) > 0.9).float()
    text, empty = backbone.encode_prompts(PROMPTS), backbone.encode_prompts([""] * len(PROMPTS))

    def ours(*units: ControlUnit):
        def run():
            sample_latents(
                backbone.unet,
                make_scheduler("unipc", backbone.noise_scheduler.config),
                text,
                (len(PROMPTS), 4, 16, 16),
                composition=Composition(list(units)) if units else None,
                uncond_hidden_states=empty,
                guidance_scale=7.5,
                num_inference_steps=args.steps,
                generator=torch.Generator().manual_seed(0),
            )

        return run

    pipeline = StableDiffusionControlNetPipeline(**backbone.to_pipeline().components, controlnet=controlnet.controlnet)
    pipeline.scheduler = make_scheduler("unipc", backbone.noise_scheduler.config)
    pipeline.set_progress_bar_config(disable=True)

    def diffusers_latents():
        pipeline(
            prompt_embeds=text,
            negative_prompt_embeds=empty,
            image=condition,
            height=64,
            width=64,
            num_inference_steps=args.steps,
            guidance_scale=7.5,
            generator=torch.Generator().manual_seed(0),
            output_type="latent",
        )

    functions = {
        "controlnet, full window": ours(ControlUnit(controlnet, condition)),
        "controlnet, window ends at 0.5": ours(ControlUnit(controlnet, condition, end=0.5)),
        "diffusers pipeline": diffusers_latents,
        "base model, no adapter": ours(),
    }
    t2i = None
    try:
        from adapters.t2i_adapter import T2IAdapterAdapter  # noqa: PLC0415  (exists once T2I-Adapter lands)

        t2i = T2IAdapterAdapter.from_unet(backbone.unet, vae_scale_factor=backbone.vae_scale_factor).eval()
    except ImportError:
        print("(c) skipped: adapters.t2i_adapter is not available")
    if t2i is not None:
        functions["controlnet + t2i-adapter"] = ours(ControlUnit(controlnet, condition), ControlUnit(t2i, condition))

    with torch.no_grad():
        medians = interleaved_medians(functions, args.repeats)
    for name, seconds in medians.items():
        print(f"{name:34s} {seconds * 1000:8.1f} ms per {args.steps}-step run")
    full = medians["controlnet, full window"]
    ratios = [("(a) window ends at 0.5 / full window", medians["controlnet, window ends at 0.5"] / full, 0.8)]
    ratios.append(("(b) ours / diffusers pipeline", full / medians["diffusers pipeline"], 1.02))
    if t2i is not None:
        ratios.append(("(c) controlnet + t2i / controlnet", medians["controlnet + t2i-adapter"] / full, 1.05))
    for label, ratio, target in ratios:
        print(f"{label:38s} {ratio:.3f}  (target <= {target}: {'met' if ratio <= target else 'NOT met'})")
    # Skipping a unit saves at most its own cost: with the base model alone taking B and the full-window run F, a
    # window ending at 0.5 can at best take (B + (F - B) / 2) / F of F. Printed so (a) reads against that bound.
    base = medians["base model, no adapter"]
    best = (base + (full - base) / 2) / full
    print(f"best possible (a) on this model: {best:.3f} (the ControlNet costs {(full - base) / base:.2f}x the rest)")


if __name__ == "__main__":
    main()
