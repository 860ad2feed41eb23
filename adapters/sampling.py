"""The denoising loop shared by validation grids and generation: a frozen UNet, an optional adapter, CFG.

It follows the order of operations of diffusers' ``StableDiffusionControlNetPipeline`` (scale the model input,
run the adapter on the same input, run the UNet, guide, step) so results can be compared with it; from an image
(``InitImage``) it follows ``StableDiffusionControlNetImg2ImgPipeline`` (SDEdit) and, with a mask,
``StableDiffusionControlNetInpaintPipeline`` (latent blending, or a 9-channel inpainting UNet's extra inputs).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    UNet2DConditionModel,
    UniPCMultistepScheduler,
)
from diffusers.configuration_utils import FrozenDict
from tqdm.auto import tqdm

from adapters.base import ConditioningAdapter, run_unet
from adapters.composition import Composition, ControlUnit

SCHEDULERS = {
    "ddim": DDIMScheduler,
    "euler": EulerDiscreteScheduler,
    "dpmpp": DPMSolverMultistepScheduler,
    "unipc": UniPCMultistepScheduler,
}


@dataclass
class InitImage:
    """Sampling that starts from an image instead of noise.

    Args:
        latents: (B, C, h, w) scaled VAE latents of the image.
        strength: the fraction of the schedule that runs, in [0, 1]: the image is noised to the timestep where that
            fraction begins (SDEdit); 0 returns it unchanged, 1 runs every step.
        mask: (B, 1, h, w) in {0, 1} at latent size, 1 where to repaint (inpainting); None: img2img. Outside the
            mask each step's latents are replaced by the image's, noised to that step (latent blending), unless the
            UNet is an inpainting UNet (9 input channels), which reads ``mask`` and ``masked_image_latents`` instead.
        masked_image_latents: (B, C, h, w) latents of the image with the masked part blacked out (inpainting UNet).
    """

    latents: torch.Tensor
    strength: float = 1.0
    mask: torch.Tensor | None = None
    masked_image_latents: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.strength <= 1.0:
            raise ValueError(f"strength must be in [0, 1], got {self.strength}")


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
    init: InitImage | None = None,
    progress: bool = False,
    added_cond_kwargs: dict[str, torch.Tensor] | None = None,
    uncond_added_cond_kwargs: dict[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Denoise from Gaussian noise (or from a noised image, ``init``) to latents.

    Args:
        encoder_hidden_states: (B, L, D) text embeddings of the prompts.
        latents_shape: (B, C, h, w) of the result.
        adapter, condition: optional adapter and its condition (B, ...); with guidance the adapter sees both halves
            of the batch, as in diffusers' pipelines. Shorthand for a composition of one balanced unit that runs in
            the adapter's ``sampling_window`` (all steps, or GLIGEN's scheduled-sampling fraction).
        composition: several units (adapters + conditions with scale, window, mode, region); not with ``adapter``.
        uncond_hidden_states: (B, L, D) embeddings of the negative/empty prompt; guidance needs them.
        guidance_scale: classifier-free guidance weight; <= 1 disables guidance.
        generator: CPU generator for the initial noise, so results do not depend on the device.
        init: start from an image (img2img) or repaint its masked part (inpainting); see ``InitImage``.
        progress: show a progress bar over the steps (``ctrlkit generate``, the demo); off inside training.
        added_cond_kwargs, uncond_added_cond_kwargs: the UNet's inputs beside the text (SDXL's pooled ``text_embeds``
            and ``time_ids``, each (B, ...); ``Backbone.unet_added_inputs``) for the prompts and the negative
            prompts; the UNet and the adapters get them (stacked for guidance). None for SD1.x/2.x UNets.
    Returns:
        latents (B, C, h, w), not yet scaled back for the VAE.
    """
    device, dtype = encoder_hidden_states.device, encoder_hidden_states.dtype
    do_guidance = guidance_scale > 1.0
    if do_guidance and uncond_hidden_states is None:
        raise ValueError("classifier-free guidance (guidance_scale > 1) needs uncond_hidden_states")
    scheduler.set_timesteps(num_inference_steps, device=device)
    timesteps = scheduler.timesteps if init is None else _init_timesteps(scheduler, num_inference_steps, init.strength)
    noise = torch.randn(latents_shape, generator=generator, dtype=torch.float32).to(device=device, dtype=dtype)
    if init is None or (init.mask is not None and init.strength == 1.0):
        latents = noise * scheduler.init_noise_sigma  # inpainting at full strength starts from noise, as diffusers
    elif len(timesteps) == 0:
        return init.latents  # strength 0: nothing to run
    else:
        latents = scheduler.add_noise(init.latents, noise, timesteps[:1].repeat(latents_shape[0]))
    blend = init is not None and init.mask is not None and unet.config.in_channels == latents_shape[1]
    hidden_states = torch.cat([uncond_hidden_states, encoder_hidden_states]) if do_guidance else encoder_hidden_states
    added = added_cond_kwargs
    if do_guidance and added is not None:
        if uncond_added_cond_kwargs is None:
            raise ValueError("classifier-free guidance with added_cond_kwargs needs uncond_added_cond_kwargs")
        added = {key: torch.cat([uncond_added_cond_kwargs[key], value]) for key, value in added.items()}
    added_kw = {} if added is None else {"added_cond_kwargs": added}  # SD1.x/2.x: the calls they always were
    if adapter is not None:
        if composition is not None:
            raise ValueError("pass an adapter or a composition, not both")
        start, end = getattr(adapter, "sampling_window", (0.0, 1.0))
        composition = Composition([ControlUnit(adapter, condition, start=start, end=end)])
    if composition is not None:
        composition = composition.prepared()  # once per run: adapters' step-independent work
    num_steps = len(timesteps)
    for step_index, timestep in enumerate(tqdm(timesteps, desc="sampling", disable=not progress, leave=False)):
        model_input = torch.cat([latents, latents]) if do_guidance else latents
        model_input = scheduler.scale_model_input(model_input, timestep)
        unet_kwargs = {}
        if composition is not None:  # adapters see the latents only, as diffusers' ControlNet inpainting
            unet_kwargs = composition(
                model_input,
                timestep,
                hidden_states,
                step_index=step_index,
                num_steps=num_steps,
                guided=do_guidance,
                **added_kw,
            )
        unet_input = model_input
        if init is not None and init.mask is not None and not blend:  # a 9-channel inpainting UNet
            extra = torch.cat([init.mask.to(dtype), init.masked_image_latents.to(dtype)], dim=1)
            unet_input = torch.cat([model_input, torch.cat([extra, extra]) if do_guidance else extra], dim=1)
        noise_pred = run_unet(unet, unet_input, timestep, hidden_states, **added_kw, **unet_kwargs)
        if do_guidance:
            noise_uncond, noise_text = noise_pred.chunk(2)
            noise_pred = noise_uncond + guidance_scale * (noise_text - noise_uncond)
        latents = scheduler.step(noise_pred, timestep, latents).prev_sample
        if blend:  # keep the image outside the mask, noised to where the next step starts
            kept = init.latents
            if step_index < num_steps - 1:
                kept = scheduler.add_noise(init.latents, noise, timesteps[step_index + 1 : step_index + 2])
            latents = (1 - init.mask) * kept + init.mask * latents
    return latents


def _init_timesteps(scheduler, num_inference_steps: int, strength: float) -> torch.Tensor:
    """The last ``strength`` fraction of the schedule (diffusers' img2img ``get_timesteps``)."""
    init_steps = min(int(num_inference_steps * strength), num_inference_steps)
    start = max(num_inference_steps - init_steps, 0) * scheduler.order
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(start)
    return scheduler.timesteps[start:]
