"""The adapter contract: what every conditioning adapter gives the frozen UNet."""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar, Literal, TypedDict

import torch
from diffusers import UNet2DConditionModel
from torch import nn


class UNetKwargs(TypedDict, total=False):
    """Keyword arguments an adapter adds to ``UNet2DConditionModel.forward``; the keys are its argument names."""

    down_block_additional_residuals: list[torch.Tensor]
    mid_block_additional_residual: torch.Tensor
    down_intrablock_additional_residuals: list[torch.Tensor]
    cross_attention_kwargs: dict[str, Any]


# Checked by the tests: every UNetKwargs key must be a real argument of the UNet's forward.
UNET_FORWARD_ARGUMENTS = frozenset(inspect.signature(UNet2DConditionModel.forward).parameters)


class AdapterFormatError(ValueError):
    """Saved adapter weights are missing or not in a format this adapter reads; the message names the path."""


class ConditioningAdapter(nn.Module, ABC):
    """An ``nn.Module`` built from a frozen UNet that turns a condition into UNet keyword arguments.

    Class attributes:
        accepts: the condition kind it consumes, ``"image"`` (a map) or ``"grounding"`` (boxes + phrases).
        zero_initialized: whether a freshly built adapter leaves the UNet output unchanged.
    """

    accepts: ClassVar[Literal["image", "grounding"]]
    zero_initialized: ClassVar[bool]

    @classmethod
    @abstractmethod
    def from_unet(cls, unet: UNet2DConditionModel, *, vae_scale_factor: int = 8, **options) -> ConditioningAdapter:
        """Build the adapter for ``unet``; ``vae_scale_factor`` is pixel size / latent size (1 in pixel space)."""

    @abstractmethod
    def forward(
        self,
        condition: torch.Tensor,
        *,
        noisy_latents: torch.Tensor,
        timesteps: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
    ) -> UNetKwargs:
        """condition (B, C, H, W) in [0, 1]; noisy_latents (B, 4, h, w); timesteps (B,) or scalar;
        encoder_hidden_states (B, L, D) -> keyword arguments for the UNet call."""

    @abstractmethod
    def save_pretrained(self, directory: str | Path) -> None:
        """Write the trainable weights in the format diffusers (and other tools) read."""

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [parameter for parameter in self.parameters() if parameter.requires_grad]

    def param_groups(self, learning_rate: float) -> list[dict[str, Any]]:
        """Optimizer parameter groups; adapters with parts that train at another rate override this."""
        return [{"params": self.trainable_parameters(), "lr": learning_rate}]
