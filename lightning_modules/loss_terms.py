"""Loss terms the training system adds to the diffusion loss, chosen by config (``system.loss_terms``), so a method
that changes the objective needs no branch in the system.

``CycleConsistencyReward`` is ControlNet++'s reward fine-tuning (Li et al., 2024): noise a training latent to a
small timestep, denoise it in one step with the adapter, decode, re-extract the condition with a differentiable
extractor and penalise its distance to the input condition. The paper restricts it to small timesteps (t <= 200 of
1000), where the one-step prediction is close to the image, and adds it to the ordinary loss after normal
training ("reward fine-tuning"). ``DecodedImageLoss`` uses the same one-step estimate with the item's own image as
the target, in pixel space (``pixel_loss=decoded_image``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import torch

from adapters.sampling import make_scheduler, sample_latents
from conditions.differentiable import edge_consistency_loss, soft_canny, soft_canny_nms, soft_f1_loss
from conditions.shapes_segmenter import mask_consistency_loss
from lightning_modules.errors import CtrlkitError
from lightning_modules.reward_models import load_shapes_segmenter
from lightning_modules.step_inputs import Draws, TrainingInputs, randint, randn

if TYPE_CHECKING:
    from lightning_modules.system import AdapterTrainingSystem


class LossTerm(Protocol):
    """``draw`` takes the step's random numbers (from the step's generator, so resume stays exact) when the inputs
    are built; ``__call__`` returns the weighted term (a scalar) and the scalars to log under ``train/``."""

    def draw(self, latents: torch.Tensor, generator: Draws) -> dict[str, torch.Tensor]: ...

    def __call__(
        self, system: AdapterTrainingSystem, inputs: TrainingInputs, draws: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, float]]: ...


# differentiable extractor -> the condition it re-extracts
REWARD_EXTRACTORS = {"soft_canny": "canny", "soft_canny_nms": "canny", "shapes_segmenter": "shapes_mask"}
EDGE_EXTRACTORS = {"soft_canny": soft_canny, "soft_canny_nms": soft_canny_nms}


class CycleConsistencyReward:
    """ControlNet++'s pixel-level cycle-consistency loss, for image conditions.

    Args:
        weight: the term's weight beside the diffusion MSE (the paper's lambda: 0.5 to 1 by condition).
        max_timestep: reward timesteps are drawn uniformly from [0, max_timestep) (paper: 200 of 1000).
        extractor: ``soft_canny`` or ``soft_canny_nms`` (``conditions.differentiable``: the latter one pixel wide
            as Canny's edges, for tolerance 0, the pixel-exact placement that canny F1 scores) against a Canny
            condition, or
            ``shapes_segmenter`` (``conditions.shapes_segmenter``: the project's shapes segmentation network, its
            cross-entropy to the mask) against ``shapes_mask``.
        segmenter_path: the segmenter's folder (None: the shipped one, ``lightning_modules.reward_models``).
        low_threshold, high_threshold: the Canny thresholds the condition was made with (conf/condition/canny).
        tolerance: pixels of slack between the soft and the Canny edges (``edge_consistency_loss``).
        precision_tolerance: the slack of the cross-entropy's precision half alone (None: ``tolerance``).
        edge_loss: how soft edges are compared with the Canny map: ``cross_entropy`` (``edge_consistency_loss``,
            with ``tolerance``) or ``soft_f1`` (1 - Dice, pixel-exact and bounded: what canny F1 scores; meant for
            ``soft_canny_nms``, whose edges are one pixel wide).
        condition: the run's condition name; the extractor must re-extract that condition.
        start: "data": noise the training latents (the paper's); "samples": noise the adapter's own samples instead,
            drawn without gradients from pure noise for the batch's prompts and conditions (``sample_steps`` steps of
            UniPC, classifier-free guidance ``guidance_scale``), so the term sees the errors sampling makes (soft
            or shifted edges) where the training latents have none (ReFL-style; DRaFT and ReFL reward a model's own
            samples).
        max_items: reward at most this many items of a batch (the first kept ones): bounds a "samples" step's cost.
    """

    def __init__(
        self,
        weight: float = 1.0,
        max_timestep: int = 200,
        extractor: str = "soft_canny",
        low_threshold: float = 100.0,
        high_threshold: float = 200.0,
        tolerance: int = 1,
        condition: str = "canny",
        start: str = "data",
        sample_steps: int = 10,
        guidance_scale: float = 7.5,
        max_items: int | None = None,
        segmenter_path: str | None = None,
        edge_loss: str = "cross_entropy",
        precision_tolerance: int | None = None,
    ) -> None:
        if extractor not in REWARD_EXTRACTORS:
            raise CtrlkitError(f"reward extractor '{extractor}'; choose one of: {', '.join(REWARD_EXTRACTORS)}")
        if REWARD_EXTRACTORS[extractor] != condition:
            raise CtrlkitError(
                f"the {extractor} reward re-extracts {REWARD_EXTRACTORS[extractor]} maps; this run's condition is "
                f"{condition}; rewards exist for condition={' or '.join(sorted(set(REWARD_EXTRACTORS.values())))} "
                "(conf/reward/)"
            )
        if not 0 < max_timestep <= 1000 or weight < 0:
            raise CtrlkitError(f"reward needs 0 < max_timestep <= 1000 and weight >= 0; got {max_timestep}, {weight}")
        if start not in ("data", "samples"):
            raise CtrlkitError(
                f"reward start '{start}'; choose data (training latents) or samples (the adapter's own)"
            )
        if edge_loss not in ("cross_entropy", "soft_f1"):
            raise CtrlkitError(f"reward edge_loss '{edge_loss}'; choose cross_entropy or soft_f1")
        if sample_steps < 1 or (max_items is not None and max_items < 1):
            raise CtrlkitError(f"reward needs sample_steps >= 1 and max_items >= 1; got {sample_steps}, {max_items}")
        self.start = start
        self.sample_steps = sample_steps
        self.guidance_scale = guidance_scale
        self.max_items = max_items
        self.weight = weight
        self.max_timestep = max_timestep
        self.thresholds = (low_threshold, high_threshold)
        self.tolerance = tolerance
        self.precision_tolerance = precision_tolerance
        self.edge_loss = edge_loss
        self.edges = EDGE_EXTRACTORS.get(extractor)
        self.segmenter = None
        if extractor == "shapes_segmenter":  # loaded now: a missing model fails before training starts
            self.segmenter = load_shapes_segmenter(segmenter_path)

    def draw(self, latents: torch.Tensor, generator: Draws) -> dict[str, torch.Tensor]:
        draws = draw_small_timesteps(self.max_timestep, latents, generator)
        if self.start == "samples":  # the samples' seed comes from the step's generator too: resume stays exact
            draws["sample_seed"] = randint(2**31 - 1, latents.shape[0], generator)[:1]
        return draws

    def __call__(
        self, system: AdapterTrainingSystem, inputs: TrainingInputs, draws: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, float]]:
        if not isinstance(inputs.condition, torch.Tensor):
            raise CtrlkitError("the cycle-consistency reward needs an image condition (a map), not grounding boxes")
        kept = inputs.condition_kept
        if kept is None or not kept.any():  # every condition dropped: nothing to be consistent with
            zero = inputs.noisy_latents.sum() * 0.0
            return zero, {"reward_loss": 0.0}
        if self.max_items is not None:  # the first max_items kept items
            kept = kept & (kept.cumsum(0) <= self.max_items)
        scheduler = system.backbone.noise_scheduler
        hidden, condition = inputs.encoder_hidden_states[kept], inputs.condition[kept]
        added = _select(inputs.added_cond_kwargs, kept)
        latents, timesteps = inputs.latents[kept], draws["timesteps"][kept]
        if self.start == "samples":
            latents = self.own_samples(system, hidden, condition, added, latents.shape, int(draws["sample_seed"]))
        noisy = scheduler.add_noise(latents, draws["noise"][kept], timesteps)
        noised = TrainingInputs(noisy, timesteps, hidden, condition, inputs.target[kept], added)
        images = one_step_images(system, noised)
        loss = self.consistency(images.float(), (condition[:, :1] > 0.5).float()).mean()
        return self.weight * loss, {"reward_loss": float(loss.detach())}

    def consistency(self, images: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Per-item (B,) distance of the condition re-extracted from ``images`` (B, 3, H, W) in [0, 1] to the binary
        input condition ``target`` (B, 1, H, W)."""
        if self.segmenter is not None:
            return mask_consistency_loss(self.segmenter.to(images.device)(images), target)
        edges = self.edges(images, *self.thresholds)
        if self.edge_loss == "soft_f1":
            return soft_f1_loss(edges, target)
        return edge_consistency_loss(edges, target, self.tolerance, self.precision_tolerance)

    def own_samples(self, system, hidden, condition, added, shape, seed: int) -> torch.Tensor:
        """Latents (B, C, h, w) the adapter samples without gradients for these prompt embeddings and conditions."""
        backbone = system.backbone
        empty = [""] * shape[0]
        uncond_hidden = backbone.encode_prompts(empty).to(hidden)
        uncond_added = None
        if added is not None:  # SDXL: the empty prompt's pooled text and time ids
            uncond_added = backbone.unet_added_inputs(empty, tuple(s * backbone.vae_scale_factor for s in shape[-2:]))
        return sample_latents(
            backbone.unet,
            make_scheduler("unipc", backbone.noise_scheduler.config),
            hidden,
            tuple(shape),
            adapter=system.adapter,
            condition=condition,
            uncond_hidden_states=uncond_hidden,
            guidance_scale=self.guidance_scale,
            num_inference_steps=self.sample_steps,
            generator=torch.Generator().manual_seed(seed),
            added_cond_kwargs=added,
            uncond_added_cond_kwargs=uncond_added,
        ).to(hidden.dtype)


class DecodedImageLoss:
    """A pixel-space loss through the frozen VAE decoder: a training latent noised to t < ``max_timestep``,
    denoised in one step with the adapter, decoded and compared with the item's own image (mean squared error in
    [0, 1]).

    Why: the diffusion loss matches latents, and a latent decodes to what the VAE keeps of the image, so samples
    learn to be about as good as the image's VAE round trip (on the shipped tiny VAE, colour borders blur into
    neighbouring colours, and the box IoU of the scenes' own round trips is ~0.68-0.69). Here the trainable
    weights -- the adapter, and the UNet's decoder where it is unlocked -- are asked for latents that decode to the
    image itself. Every item counts, whether or not its condition was dropped: the image is the target either way.

    Args:
        weight: the term's weight beside the diffusion MSE.
        max_timestep: timesteps drawn uniformly from [0, max_timestep), where the one-step estimate is close to
            the image (as ControlNet++'s reward; 200 of 1000).
        max_items: at most this many items of a batch (the first ones): bounds the decoder's cost.
    """

    def __init__(self, weight: float = 1.0, max_timestep: int = 200, max_items: int | None = None) -> None:
        if not 0 < max_timestep <= 1000 or weight < 0:
            raise CtrlkitError(
                f"decoded-image loss needs 0 < max_timestep <= 1000 and weight >= 0; got {max_timestep}, {weight}"
            )
        if max_items is not None and max_items < 1:
            raise CtrlkitError(f"decoded-image loss needs max_items >= 1; got {max_items}")
        self.weight, self.max_timestep, self.max_items = weight, max_timestep, max_items

    def draw(self, latents: torch.Tensor, generator: Draws) -> dict[str, torch.Tensor]:
        return draw_small_timesteps(self.max_timestep, latents, generator)

    def __call__(
        self, system: AdapterTrainingSystem, inputs: TrainingInputs, draws: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, float]]:
        if inputs.images is None or system.backbone.vae is None:
            raise CtrlkitError("the decoded-image loss needs the batch's images (pixel_values) and a VAE")
        count = inputs.latents.shape[0] if self.max_items is None else min(self.max_items, inputs.latents.shape[0])
        rows = slice(0, count)
        scheduler = system.backbone.noise_scheduler
        latents, timesteps = inputs.latents[rows], draws["timesteps"][rows]
        noisy = scheduler.add_noise(latents, draws["noise"][rows], timesteps)
        condition = inputs.condition[rows]  # a map, or a GroundingCondition (which slices by item)
        hidden, added = inputs.encoder_hidden_states[rows], _select(inputs.added_cond_kwargs, rows)
        noised = TrainingInputs(noisy, timesteps, hidden, condition, inputs.target[rows], added)
        images = one_step_images(system, noised)
        target = (inputs.images[rows].float() + 1.0) / 2.0
        loss = torch.nn.functional.mse_loss(images.float(), target.to(images.device))
        return self.weight * loss, {"decoded_image_loss": float(loss.detach())}


def draw_small_timesteps(max_timestep: int, latents: torch.Tensor, generator: Draws) -> dict[str, torch.Tensor]:
    """A term's own draws: timesteps (B,) uniform in [0, max_timestep) and noise shaped as ``latents``."""
    timesteps = randint(max_timestep, latents.shape[0], generator).to(latents.device)
    noise = randn(latents.shape, generator, dtype=latents.dtype).to(latents.device)
    return {"timesteps": timesteps, "noise": noise}


def one_step_images(system: AdapterTrainingSystem, noised: TrainingInputs) -> torch.Tensor:
    """Images (B, 3, H, W) in [0, 1], with gradients to the trainable weights: the UNet (with the adapter) predicts
    on ``noised``, the one-step estimate of the clean latents is decoded by the frozen VAE."""
    prediction = system.unet_prediction(noised)
    scheduler = system.backbone.noise_scheduler
    clean = predicted_clean(scheduler, noised.noisy_latents, noised.timesteps, prediction)
    return system.backbone.decode_latents_with_grad(clean)


def predicted_clean(scheduler, noisy: torch.Tensor, timesteps: torch.Tensor, prediction: torch.Tensor):
    """The one-step estimate of the clean latents x0 from x_t and the UNet's prediction (epsilon or velocity)."""
    alphas = scheduler.alphas_cumprod.to(device=noisy.device, dtype=torch.float32)[timesteps]
    alpha = alphas.sqrt().view(-1, 1, 1, 1)
    sigma = (1 - alphas).sqrt().view(-1, 1, 1, 1)
    noisy, prediction = noisy.float(), prediction.float()
    if scheduler.config.prediction_type == "v_prediction":
        return alpha * noisy - sigma * prediction
    return (noisy - sigma * prediction) / alpha


def _select(added: dict[str, torch.Tensor] | None, kept: torch.Tensor | slice) -> dict[str, torch.Tensor] | None:
    return None if added is None else {name: value[kept] for name, value in added.items()}
