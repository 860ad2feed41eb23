"""Write a ControlNet trained by `ctrlkit train` in the original single-file layout (control_model.* keys, as
lllyasviel's releases, A1111 and ComfyUI use) and read it back.

Usage:   python examples/controlnet_single_file.py outputs/train/runs/<run>
Prints:  "wrote <run>/control_tiny.safetensors (N tensors, control_model.* keys)",
         "read it back as: original single file (...)", "weights identical: True" and a largest residual
         difference of 0 or ~1e-6 (diffusers' folder loader leaves tensors memory-mapped at unaligned addresses,
         which changes the CPU kernels' rounding; the weights themselves are bit-identical)
"""

import sys
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from adapters.controlnet_formats import FORMATS, load_controlnet, save_controlnet_single_file

run = Path(sys.argv[1])
backbone = instantiate(OmegaConf.load(run / "config.yaml").model)
trained, _ = load_controlnet(run / "adapter", backbone.unet)

single_file = run / "control_tiny.safetensors"
save_controlnet_single_file(trained.controlnet, single_file)
print(f"wrote {single_file} ({len(trained.controlnet.state_dict())} tensors, control_model.* keys)")

reloaded, found = load_controlnet(single_file, backbone.unet)
print(f"read it back as: {FORMATS[found]}")
before_state, after_state = trained.controlnet.state_dict(), reloaded.controlnet.state_dict()
print(f"weights identical: {all(torch.equal(before_state[k], after_state[k]) for k in before_state)}")

generator = torch.Generator().manual_seed(0)
inputs = {
    "noisy_latents": torch.randn(1, 4, 16, 16, generator=generator),
    "timesteps": torch.tensor([500]),
    "encoder_hidden_states": backbone.encode_prompts(["a red circle on a blue background"]),
}
condition = torch.rand(1, 3, 64, 64, generator=generator)
with torch.no_grad():
    before, after = trained(condition, **inputs), reloaded(condition, **inputs)
difference = (before["mid_block_additional_residual"] - after["mid_block_additional_residual"]).abs().max()
print(f"largest residual difference: {difference.item()}")
