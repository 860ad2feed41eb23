"""Loss terms the training system adds to the diffusion loss, chosen by config (``system.loss_terms``), so a method
that changes the objective needs no branch in the system.

``CycleConsistencyReward`` is ControlNet++'s reward fine-tuning (Li et al., 2024): noise a training latent to a
small timestep, denoise it in one step with the adapter, decode, re-extract the condition with a differentiable
extractor and penalise its distance to the input condition. The paper restricts it to small timesteps (t <= 200 of
1000), where the one-step prediction is close to the image, and adds it to the ordinary loss after normal
training ("reward fine-tuning").
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import torch

from conditions.differentiable import edge_consistency_loss, soft_canny
from lightning_modules.errors import CtrlkitError
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
REWARD_EXTRACTORS = {"soft_canny": "canny"}


class CycleConsistencyReward:
    """ControlNet++'s pixel-level cycle-consistency loss, for image conditions.

    Args:
        weight: the term's weight beside the diffusion MSE (the paper's lambda: 0.5 to 1 by condition).
        max_timestep: reward timesteps are drawn uniformly from [0, max_timestep) (paper: 200 of 1000).
        extractor: ``soft_canny`` (``conditions.differentiable``) against a Canny condition.
        low_threshold, high_threshold: the Canny thresholds the condition was made with (conf/condition/canny).
        tolerance: pixels of slack between the soft and the Canny edges (``edge_consistency_loss``).
        condition: the run's condition name; the extractor must re-extract that condition.
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
    ) -> None:
        if extractor not in REWARD_EXTRACTORS:
            raise CtrlkitError(f"reward extractor '{extractor}'; choose one of: {', '.join(REWARD_EXTRACTORS)}")
        if REWARD_EXTRACTORS[extractor] != condition:
            raise CtrlkitError(
                f"the {extractor} reward re-extracts {REWARD_EXTRACTORS[extractor]} maps; this run's condition is "
                f"{condition} (rewards exist for: {', '.join(REWARD_EXTRACTORS.values())})"
            )
        if not 0 < max_timestep <= 1000 or weight < 0:
            raise CtrlkitError(f"reward needs 0 < max_timestep <= 1000 and weight >= 0; got {max_timestep}, {weight}")
        self.weight = weight
        self.max_timestep = max_timestep
        self.thresholds = (low_threshold, high_threshold)
        self.tolerance = tolerance

    def draw(self, latents: torch.Tensor, generator: Draws) -> dict[str, torch.Tensor]:
        timesteps = randint(self.max_timestep, latents.shape[0], generator).to(latents.device)
        noise = randn(latents.shape, generator, dtype=latents.dtype).to(latents.device)
        return {"timesteps": timesteps, "noise": noise}

    def __call__(
        self, system: AdapterTrainingSystem, inputs: TrainingInputs, draws: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, float]]:
        if not isinstance(inputs.condition, torch.Tensor):
            raise CtrlkitError("the cycle-consistency reward needs an image condition (a map), not grounding boxes")
        kept = inputs.condition_kept
        if kept is None or not kept.any():  # every condition dropped: nothing to be consistent with
            zero = inputs.noisy_latents.sum() * 0.0
            return zero, {"reward_loss": 0.0}
        scheduler = system.backbone.noise_scheduler
        latents, timesteps = inputs.latents[kept], draws["timesteps"][kept]
        noisy = scheduler.add_noise(latents, draws["noise"][kept], timesteps)
        prediction = system.unet_prediction(
            TrainingInputs(
                noisy,
                timesteps,
                inputs.encoder_hidden_states[kept],
                inputs.condition[kept],
                inputs.target[kept],
                _select(inputs.added_cond_kwargs, kept),
            )
        )
        images = system.backbone.decode_latents_with_grad(predicted_clean(scheduler, noisy, timesteps, prediction))
        edges = soft_canny(images, *self.thresholds)
        target = (inputs.condition[kept][:, :1] > 0.5).to(edges.dtype)
        loss = edge_consistency_loss(edges.float(), target.float(), self.tolerance).mean()
        return self.weight * loss, {"reward_loss": float(loss.detach())}


def predicted_clean(scheduler, noisy: torch.Tensor, timesteps: torch.Tensor, prediction: torch.Tensor):
    """The one-step estimate of the clean latents x0 from x_t and the UNet's prediction (epsilon or velocity)."""
    alphas = scheduler.alphas_cumprod.to(device=noisy.device, dtype=torch.float32)[timesteps]
    alpha = alphas.sqrt().view(-1, 1, 1, 1)
    sigma = (1 - alphas).sqrt().view(-1, 1, 1, 1)
    noisy, prediction = noisy.float(), prediction.float()
    if scheduler.config.prediction_type == "v_prediction":
        return alpha * noisy - sigma * prediction
    return (noisy - sigma * prediction) / alpha


def _select(added: dict[str, torch.Tensor] | None, kept: torch.Tensor) -> dict[str, torch.Tensor] | None:
    return None if added is None else {name: value[kept] for name, value in added.items()}
