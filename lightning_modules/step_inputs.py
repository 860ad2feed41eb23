"""What a training step draws before the adapter and the UNet run: condition dropout, the step's inputs, and where
its random numbers come from (one stream, or one generator per item)."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from lightning_modules.errors import CtrlkitError

# system.draws: ``item`` draws each item's numbers from its own generator, seeded by (seed, epoch, item index): a
# run's draws do not depend on how items are batched, accumulated or split over processes. ``stream``: one
# generator for the run, drawn batch by batch (its state is saved in checkpoints).
DRAWS = ("item", "stream")

# A step's draws come from one generator (batched draws) or from one generator per batch row.
Draws = torch.Generator | Sequence[torch.Generator] | None


def item_generators(seed: int, epoch: int, indices: Sequence[int]) -> list[torch.Generator]:
    """One CPU generator per item, seeded by a hash of (seed, epoch, item index): the item gets the same noise,
    timestep and dropout whichever batch, accumulation step or process carries it, and new ones every epoch."""
    generators = []
    for index in indices:
        digest = hashlib.blake2b(f"{seed}:{epoch}:{int(index)}".encode(), digest_size=8).digest()
        generators.append(torch.Generator().manual_seed(int.from_bytes(digest, "little") & (2**63 - 1)))
    return generators


def _per_row(generator: Draws, batch_size: int) -> bool:
    if generator is None or isinstance(generator, torch.Generator):
        return False
    if len(generator) != batch_size:
        raise CtrlkitError(f"{len(generator)} item generators for a batch of {batch_size}")
    return True


def randn(shape: Sequence[int], generator: Draws = None, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``torch.randn(shape)`` on the CPU; with one generator per row, row i is drawn from generator i."""
    if not _per_row(generator, shape[0]):
        return torch.randn(tuple(shape), generator=generator, dtype=dtype)
    return torch.cat([torch.randn((1, *shape[1:]), generator=row, dtype=dtype) for row in generator])


def rand(batch_size: int, generator: Draws = None) -> torch.Tensor:
    """(B,) uniform in [0, 1): batched, or one number from each row's generator."""
    if not _per_row(generator, batch_size):
        return torch.rand(batch_size, generator=generator)
    return torch.cat([torch.rand(1, generator=row) for row in generator])


def randint(high: int, batch_size: int, generator: Draws = None) -> torch.Tensor:
    """(B,) integers in [0, high): batched, or one from each row's generator."""
    if not _per_row(generator, batch_size):
        return torch.randint(0, high, (batch_size,), generator=generator)
    return torch.cat([torch.randint(0, high, (1,), generator=row) for row in generator])


@dataclass
class TrainingInputs:
    """What the adapter and the UNet take in a training step: noisy latents (B, 4, h, w), timesteps (B,), text
    embeddings (B, L, D), the prepared condition, the target of the prediction (B, 4, h, w), and the UNet's inputs
    beside the text (SDXL's pooled ``text_embeds`` and ``time_ids``; None for SD1.x/2.x). For loss terms
    (``lightning_modules.loss_terms``): the clean latents, which items kept their condition (B,) bool, each
    term's random draws by name, and the items' images (B, 3, H, W) in [-1, 1]."""

    noisy_latents: torch.Tensor
    timesteps: torch.Tensor
    encoder_hidden_states: torch.Tensor
    condition: Any
    target: torch.Tensor
    added_cond_kwargs: dict[str, torch.Tensor] | None = None
    latents: torch.Tensor | None = None
    condition_kept: torch.Tensor | None = None
    term_draws: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    images: torch.Tensor | None = None

    @property
    def added_kwargs(self) -> dict:
        """``{"added_cond_kwargs": ...}`` for the UNet and adapter calls, or nothing (their SD1.x/2.x calls)."""
        return {} if self.added_cond_kwargs is None else {"added_cond_kwargs": self.added_cond_kwargs}


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

    def sample(self, batch_size: int, generator: Draws = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(drop_text, drop_condition), each (B,) bool."""
        u = rand(batch_size, generator)
        both = u < self.both
        text_only = (u >= self.both) & (u < self.both + self.text)
        condition_only = (u >= self.both + self.text) & (u < self.both + self.text + self.condition)
        return both | text_only, both | condition_only
