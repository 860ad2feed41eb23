"""Conditioning adapters on a frozen SD-style UNet, and the sampling loop that feeds them.

torch + diffusers only: nothing here imports lightning, hydra, wandb or the ``conditions`` package.
"""

from adapters.base import AdapterFormatError, ConditioningAdapter, UNetKwargs
from adapters.controlnet import ControlNetAdapter
from adapters.grounding import GroundingCondition
from adapters.registry import adapter_families, load_adapter, load_adapters
from adapters.sampling import SCHEDULERS, InitImage, make_scheduler, sample_latents

__all__ = [
    "SCHEDULERS",
    "AdapterFormatError",
    "ConditioningAdapter",
    "ControlNetAdapter",
    "GroundingCondition",
    "InitImage",
    "UNetKwargs",
    "adapter_families",
    "load_adapter",
    "load_adapters",
    "make_scheduler",
    "sample_latents",
]
