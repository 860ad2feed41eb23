"""What a training step draws before the adapter and the UNet run: condition dropout, and the step's inputs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from lightning_modules.errors import CtrlkitError


@dataclass
class TrainingInputs:
    """What the adapter and the UNet take in a training step: noisy latents (B, 4, h, w), timesteps (B,), text
    embeddings (B, L, D), the prepared condition, and the target of the prediction (B, 4, h, w)."""

    noisy_latents: torch.Tensor
    timesteps: torch.Tensor
    encoder_hidden_states: torch.Tensor
    condition: Any
    target: torch.Tensor


@dataclass(frozen=True)
class ConditionDropout:
    """Condition dropout for classifier-free guidance, one recipe for every adapter: each training item drops its
    text (caption -> ""), its condition (the adapter's null condition, ``ConditioningAdapter.drop_condition``), or
    both, with these probabilities (exclusive events, so their sum is at most 1).

    ControlNet paper: text 0.5. GLIGEN: condition 0.1 (null grounding). CoAdapter: text 0.5 plus subsets.
    """

    text: float = 0.0
    condition: float = 0.0
    both: float = 0.0

    def __post_init__(self) -> None:
        for name in ("text", "condition", "both"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise CtrlkitError(f"system.condition_dropout.{name}={value} must be in [0, 1]")
        if self.text + self.condition + self.both > 1.0 + 1e-9:
            raise CtrlkitError(
                f"system.condition_dropout: text + condition + both = {self.text + self.condition + self.both} "
                "must be at most 1 (the three are exclusive)"
            )

    def sample(self, batch_size: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(drop_text, drop_condition), each (B,) bool."""
        u = torch.rand(batch_size, generator=generator)
        both = u < self.both
        text_only = (u >= self.both) & (u < self.both + self.text)
        condition_only = (u >= self.both + self.text) & (u < self.both + self.text + self.condition)
        return both | text_only, both | condition_only
