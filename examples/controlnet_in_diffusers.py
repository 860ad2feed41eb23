"""Load a ControlNet trained by `ctrlkit train` into diffusers' StableDiffusionControlNetPipeline.

Usage:   python examples/controlnet_in_diffusers.py outputs/train/runs/<run>
Prints:  "loaded ControlNetModel with N parameters from <run>/adapter" and "wrote <run>/diffusers_samples.png"
Draws:   <run>/diffusers_samples.png, one row per validation item: condition | diffusers sample.
The base model is rebuilt from the run's config.yaml (the tiny model is built in code, sd15 loads from its path).
"""

import sys
from pathlib import Path

import torch
from diffusers import ControlNetModel, StableDiffusionControlNetPipeline, UniPCMultistepScheduler
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torchvision.utils import make_grid, save_image

run = Path(sys.argv[1])
cfg = OmegaConf.load(run / "config.yaml")
backbone = instantiate(cfg.model)
controlnet = ControlNetModel.from_pretrained(run / "adapter")
parameter_count = sum(p.numel() for p in controlnet.parameters())
print(f"loaded ControlNetModel with {parameter_count} parameters from {run / 'adapter'}")

base = backbone.to_pipeline()
pipeline = StableDiffusionControlNetPipeline(**base.components, controlnet=controlnet)
pipeline.scheduler = UniPCMultistepScheduler.from_config(backbone.noise_scheduler.config)
pipeline.set_progress_bar_config(disable=True)

datamodule = instantiate(cfg.data, extractor=instantiate(cfg.condition.extractor))
batch = datamodule.fixed_batch(4)
size = cfg.data.image_size
images = pipeline(
    list(batch["prompt"]),
    image=batch["condition"],
    height=size,
    width=size,
    num_inference_steps=20,
    guidance_scale=5.0,
    generator=torch.Generator().manual_seed(0),
    output_type="pt",
).images
rows = torch.stack([batch["condition"][:, :3], images.cpu()], dim=1).flatten(0, 1)
save_image(make_grid(rows, nrow=2, padding=2, pad_value=1.0), run / "diffusers_samples.png")
print(f"wrote {run / 'diffusers_samples.png'}")
