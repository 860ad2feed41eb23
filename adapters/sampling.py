"""The denoising loop shared by validation grids and generation: a frozen UNet, an optional adapter, CFG.

It follows the order of operations of diffusers' ``StableDiffusionControlNetPipeline`` (scale the model input,
run the adapter on the same input, run the UNet, guide, step) so results can be compared with it.
"""

from __future__ import annotations

import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    UNet2DConditionModel,
    UniPCMultistepScheduler,
)
from diffusers.configuration_utils import FrozenDict

from adapters.base import ConditioningAdapter
from adapters.composition import Composition, ControlUnit

SCHEDULERS = {
    "ddim": DDIMScheduler,
    "euler": EulerDiscreteScheduler,
    "dpmpp": DPMSolverMultistepScheduler,
    "unipc": UniPCMultistepScheduler,
}


def make_scheduler(name: str, training_scheduler_config: FrozenDict | dict):
    """A sampling scheduler of type ``name`` with the betas and prediction type of the training scheduler."""
    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler '{name}'; choose one of: {', '.join(SCHEDULERS)}")
    return SCHEDULERS[name].from_config(training_scheduler_config)


@torch.no_grad()
def sample_latents(
    unet: UNet2DConditionModel,
    scheduler,
    encoder_hidden_states: torch.Tensor,
    latents_shape: tuple[int, int, int, int],
    *,
    adapter: ConditioningAdapter | None = None,
    condition: torch.Tensor | None = None,
    composition: Composition | None = None,
    uncond_hidden_states: torch.Tensor | None = None,
    guidance_scale: float = 1.0,
    num_inference_steps: int = 20,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Denoise from Gaussian noise to latents.

    Args:
        encoder_hidden_states: (B, L, D) text embeddings of the prompts.
        latents_shape: (B, C, h, w) of the result.
        adapter, condition: optional adapter and its condition (B, ...); with guidance the adapter sees both halves
            of the batch, as in diffusers' pipelines. Shorthand for a composition of one balanced unit.
        composition: several units (adapters + conditions with scale, window, mode, region); not with ``adapter``.
        uncond_hidden_states: (B, L, D) embeddings of the negative/empty prompt; guidance needs them.
        guidance_scale: classifier-free guidance weight; <= 1 disables guidance.
        generator: CPU generator for the initial noise, so results do not depend on the device.
    Returns:
        latents (B, C, h, w), not yet scaled back for the VAE.
    """
    device, dtype = encoder_hidden_states.device, encoder_hidden_states.dtype
    do_guidance = guidance_scale > 1.0
    if do_guidance and uncond_hidden_states is None:
        raise ValueError("classifier-free guidance (guidance_scale > 1) needs uncond_hidden_states")
    scheduler.set_timesteps(num_inference_steps, device=device)
    latents = torch.randn(latents_shape, generator=generator, dtype=torch.float32).to(device=device, dtype=dtype)
    latents = latents * scheduler.init_noise_sigma
    hidden_states = torch.cat([uncond_hidden_states, encoder_hidden_states]) if do_guidance else encoder_hidden_states
    if adapter is not None:
        if composition is not None:
            raise ValueError("pass an adapter or a composition, not both")
        composition = Composition([ControlUnit(adapter, condition)])
    num_steps = len(scheduler.timesteps)
    for step_index, timestep in enumerate(scheduler.timesteps):
        model_input = torch.cat([latents, latents]) if do_guidance else latents
        model_input = scheduler.scale_model_input(model_input, timestep)
        unet_kwargs = {}
        if composition is not None:
            unet_kwargs = composition(
                model_input, timestep, hidden_states, step_index=step_index, num_steps=num_steps, guided=do_guidance
            )
        noise_pred = unet(model_input, timestep, encoder_hidden_states=hidden_states, **unet_kwargs).sample
        if do_guidance:
            noise_uncond, noise_text = noise_pred.chunk(2)
            noise_pred = noise_uncond + guidance_scale * (noise_text - noise_uncond)
        latents = scheduler.step(noise_pred, timestep, latents).prev_sample
    return latents
