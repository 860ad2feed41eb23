"""Several conditioning units in one sampling run: any mix of adapters, each with its own strength, step window,
guidance routing and region.

A unit is an adapter plus its condition. At each denoising step every unit inside its window runs and its UNet
keyword arguments merge: ControlNet and T2I-Adapter residuals sum, ``cross_attention_kwargs`` (GLIGEN's grounding)
merge by key. A unit outside its window is not called at all (diffusers runs it at scale 0). The window rule is
diffusers' (``StableDiffusionControlNetPipeline``): step i of n runs the unit unless i/n < start or (i+1)/n > end.

Modes, as in sd-webui-controlnet:
    balanced: residuals times ``scale`` on both halves of classifier-free guidance.
    prompt:   "my prompt is more important": residual k of K+1 (the mid block last) weighted 0.825^(K-k).
    control:  "the condition is more important": the unit runs on the conditional half only; the unconditional
              half gets no residual, so guidance pushes towards the condition (diffusers' guess mode routing).
A grounding unit (GLIGEN) has no residuals to weigh: "balanced" gives both halves its grounding, "control" gives the
unconditional half null grounding (every slot empty), as diffusers' ``StableDiffusionGLIGENPipeline`` does. A unit
given no mode takes its adapter's ``guidance_mode``: "balanced" for ControlNet and T2I-Adapter, "control" for GLIGEN
and the layout ControlNet.
A unit whose adapter runs the UNet itself (``runs_unet``: ControlNet-XS) gives the UNet call a forward of its own
(``unet_forward``) with ``scale`` as its conditioning scale; under "control" that scale is 0 for the unconditional
half. It has no residuals for "prompt" mode or a region mask, and it composes with no other unit: its UNet is not
one that takes residuals or grounding.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F

from adapters.base import UNET_FORWARD_KEY, ConditioningAdapter, UNetKwargs
from adapters.grounding import GroundingCondition

MODES = ("balanced", "prompt", "control")
RESIDUAL_KEYS = (
    "down_block_additional_residuals",
    "mid_block_additional_residual",
    "down_intrablock_additional_residuals",
)
# sd-webui-controlnet's soft weights for "my prompt is more important" (also ControlNet's guess mode ablation)
PROMPT_MODE_BASE = 0.825


@dataclass
class ControlUnit:
    """One adapter and its condition in a composition.

    Args:
        adapter: any ConditioningAdapter (ControlNet, T2I-Adapter, GLIGEN).
        condition: what ``adapter`` takes, batched like the prompts: an image condition (B, C, H, W) in [0, 1],
            or a ``GroundingCondition`` for a grounding adapter.
        scale: multiplies the unit's residuals; 0 leaves the UNet as without the unit.
        start, end: the fraction of the denoising steps in which the unit runs, 0 <= start < end <= 1.
        mode: "balanced", "prompt" or "control" (module docstring); None: the adapter's ``guidance_mode``.
        mask: optional region (B or 1, 1, H, W) in [0, 1]; residuals are multiplied by it, resized to each
            residual's resolution, so the unit acts only there.
        name: shown in errors and logs.
    """

    adapter: ConditioningAdapter
    condition: Any
    scale: float = 1.0
    start: float = 0.0
    end: float = 1.0
    mode: Literal["balanced", "prompt", "control"] | None = None
    mask: torch.Tensor | None = None
    name: str = "unit"

    def __post_init__(self) -> None:
        if self.mode is None:
            self.mode = getattr(self.adapter, "guidance_mode", "balanced")
        if self.mode not in MODES:
            raise ValueError(f"unit '{self.name}': mode '{self.mode}'; choose one of: {', '.join(MODES)}")
        if not 0.0 <= self.start < self.end <= 1.0:
            raise ValueError(f"unit '{self.name}': need 0 <= start < end <= 1, got start={self.start} end={self.end}")
        if not math.isfinite(self.scale) or self.scale < 0:  # nan would turn every residual, and the image, to nan
            raise ValueError(f"unit '{self.name}': scale={self.scale}; allowed: a finite number >= 0")
        if runs_unet(self.adapter):
            # it exchanges features with every UNet block instead of adding residuals: nothing to weigh by depth or
            # to restrict to a region, so say so instead of ignoring the setting
            unsupported = ["mode=prompt"] if self.mode == "prompt" else []
            unsupported += ["mask"] if self.mask is not None else []
            if unsupported:
                raise ValueError(
                    f"unit '{self.name}': {self.adapter.title} runs the UNet itself (no residuals to weigh by depth "
                    f"or region), so it takes no {', '.join(unsupported)}; scale, start/end and mode balanced or "
                    "control apply"
                )
        elif not weighs_residuals(self.adapter):
            # e.g. grounding enters the UNet as cross-attention kwargs, not residuals: nothing to weigh by depth or
            # mask, so say so instead of ignoring the setting
            unsupported = (
                ([f"scale={self.scale}"] if self.scale not in (0.0, 1.0) else [])
                + (["mode=prompt"] if self.mode == "prompt" else [])
                + (["mask"] if self.mask is not None else [])
            )
            if unsupported:
                raise ValueError(
                    f"unit '{self.name}': a grounding unit (GLIGEN) takes no {', '.join(unsupported)}; it is on "
                    "(scale 1) or off (scale 0) in its start/end window (scheduled sampling), with mode balanced or "
                    "control"
                )

    def active(self, step_index: int, num_steps: int) -> bool:
        return not (step_index / num_steps < self.start or (step_index + 1) / num_steps > self.end)


def weighs_residuals(adapter) -> bool:
    """``ConditioningAdapter.weighs_residuals``; True for plain callables (wrappers, tests) that declare nothing."""
    return getattr(adapter, "weighs_residuals", True)


def runs_unet(adapter) -> bool:
    """``ConditioningAdapter.runs_unet``; False for plain callables (wrappers, tests) that declare nothing."""
    return getattr(adapter, "runs_unet", False)


def _concatenate(first, second):
    """Stack two conditions of the same structure along the batch (tensors, grounding, and dicts, lists, tuples
    and dataclasses of tensors, as ``ConditioningAdapter.prepare`` may return); anything else is taken from
    ``first``."""
    if isinstance(first, torch.Tensor):
        return torch.cat([first, second])
    if isinstance(first, GroundingCondition):  # its phrases are rows of the batch, not a structure to recurse into
        return GroundingCondition.cat([first, second])
    if isinstance(first, dict):
        return {key: _concatenate(item, second[key]) for key, item in first.items()}
    if isinstance(first, list | tuple):
        return type(first)(_concatenate(a, b) for a, b in zip(first, second, strict=True))
    if dataclasses.is_dataclass(first) and not isinstance(first, type):
        fields = {
            field.name: _concatenate(getattr(first, field.name), getattr(second, field.name))
            for field in dataclasses.fields(first)
        }
        return dataclasses.replace(first, **fields)
    return first


def _batch_twice(value):
    """Duplicate a condition for the two halves of classifier-free guidance."""
    return _concatenate(value, value)


def _weigh(kwargs: UNetKwargs, unit: ControlUnit) -> UNetKwargs:
    """Apply scale, prompt-mode soft weights and the region mask to a unit's residuals."""
    down = kwargs.get("down_block_additional_residuals")
    count = len(down) if down is not None else 0
    weighted: dict[str, Any] = dict(kwargs)
    for key in RESIDUAL_KEYS:
        if key not in kwargs:
            continue
        residuals = kwargs[key] if isinstance(kwargs[key], list) else [kwargs[key]]
        out = []
        for index, residual in enumerate(residuals):
            weight = unit.scale
            if unit.mode == "prompt":
                position = count if key == "mid_block_additional_residual" else index
                total = count if key != "down_intrablock_additional_residuals" else len(residuals) - 1
                weight = weight * PROMPT_MODE_BASE ** (total - position)
            residual = residual * weight
            if unit.mask is not None:
                mask = F.interpolate(unit.mask.to(residual), size=residual.shape[-2:], mode="area")
                # one mask per prompt; with guidance the batch holds [unconditional; conditional] of those prompts
                residual = residual * mask.repeat(residual.shape[0] // mask.shape[0], 1, 1, 1)
            out.append(residual)
        weighted[key] = out if isinstance(kwargs[key], list) else out[0]
    return weighted


def _pad_unconditional(kwargs: UNetKwargs) -> UNetKwargs:
    """Residuals computed for the conditional half only -> zeros for the unconditional half, then them."""
    padded: dict[str, Any] = dict(kwargs)
    for key in RESIDUAL_KEYS:
        if key in kwargs:
            values = kwargs[key] if isinstance(kwargs[key], list) else [kwargs[key]]
            values = [torch.cat([torch.zeros_like(value), value]) for value in values]
            padded[key] = values if isinstance(kwargs[key], list) else values[0]
    return padded


def merge_unet_kwargs(parts: list[UNetKwargs]) -> UNetKwargs:
    """Sum residuals position by position; merge ``cross_attention_kwargs`` by key (two units may not set the
    same key)."""
    merged: dict[str, Any] = {}
    for part in parts:
        for key, value in part.items():
            if key == UNET_FORWARD_KEY and key in merged:  # Composition refuses this; plain merges say it too
                raise ValueError("two units each run the UNet themselves (unet_forward); compose at most one")
            if key == "cross_attention_kwargs":
                current = merged.setdefault(key, {})
                clash = set(current) & set(value)
                if clash:
                    raise ValueError(f"two units set cross_attention_kwargs {sorted(clash)}; compose one of each kind")
                current.update(value)
            elif key not in merged:
                merged[key] = list(value) if isinstance(value, list) else value
            elif isinstance(value, list):
                merged[key] = [a + b for a, b in zip(merged[key], value)]
            else:
                merged[key] = merged[key] + value
    return merged


class Composition:
    """Calls each active unit at a denoising step and merges what they give the UNet."""

    def __init__(self, units: list[ControlUnit]) -> None:
        self.units = list(units)
        runners = [unit for unit in self.units if runs_unet(unit.adapter)]
        if runners and len(self.units) > 1:
            unit = runners[0]
            raise ValueError(
                f"unit '{unit.name}': {unit.adapter.title} runs the UNet itself (it exchanges features with every "
                "UNet block), so it composes with no other unit; give it alone"
            )

    def prepared(self) -> Composition:
        """The same units with each condition through its adapter's ``prepare``: the step-independent work (e.g.
        T2I-Adapter's features) done once for a whole sampling run instead of at every step."""
        units = []
        for unit in self.units:
            prepare = getattr(unit.adapter, "prepare", None)  # plain callables (wrappers, tests) have nothing to do
            units.append(dataclasses.replace(unit, condition=prepare(unit.condition)) if prepare else unit)
        return Composition(units)

    def __call__(
        self,
        noisy_latents: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        *,
        step_index: int,
        num_steps: int,
        guided: bool,
        added_cond_kwargs: dict[str, torch.Tensor] | None = None,
    ) -> UNetKwargs:
        """Inputs as the UNet gets them (both guidance halves stacked when ``guided``; ``added_cond_kwargs``: the
        UNet's inputs beside the text, SDXL's, passed on to every adapter) -> merged UNet kwargs."""
        extra = {} if added_cond_kwargs is None else {"added_cond_kwargs": added_cond_kwargs}
        parts = []
        for unit in self.units:
            if unit.scale == 0 or not unit.active(step_index, num_steps):
                continue  # skipped, not run at scale 0: scale 0 equals leaving the unit out
            if runs_unet(unit.adapter):
                scale: float | torch.Tensor = unit.scale
                if guided and unit.mode == "control":  # no control on the unconditional half, as zero residuals
                    half = noisy_latents.shape[0] // 2
                    scale = torch.tensor([0.0] * half + [unit.scale] * half, device=noisy_latents.device)
                parts.append(
                    unit.adapter(
                        _batch_twice(unit.condition) if guided else unit.condition,
                        noisy_latents=noisy_latents,
                        timesteps=timestep,
                        encoder_hidden_states=encoder_hidden_states,
                        conditioning_scale=scale,
                        **extra,
                    )
                )
                continue
            if guided and unit.mode == "control" and weighs_residuals(unit.adapter):
                half = noisy_latents.shape[0] // 2
                kwargs = unit.adapter(
                    unit.condition,
                    noisy_latents=noisy_latents[half:],
                    timesteps=timestep,
                    encoder_hidden_states=encoder_hidden_states[half:],
                    **{key: {k: v[half:] for k, v in value.items()} for key, value in extra.items()},
                )
                parts.append(_pad_unconditional(_weigh(kwargs, unit)))
                continue
            if not guided:
                condition = unit.condition
            elif unit.mode == "control":
                # no residuals to pad (grounding): the UNet takes one condition batch for both halves, the null
                # condition (null grounding) for the unconditional one
                nulled = unit.adapter.drop_condition(unit.condition, torch.ones(len(noisy_latents) // 2, dtype=bool))
                condition = _concatenate(nulled, unit.condition)
            else:
                condition = _batch_twice(unit.condition)
            kwargs = unit.adapter(
                condition,
                noisy_latents=noisy_latents,
                timesteps=timestep,
                encoder_hidden_states=encoder_hidden_states,
                **extra,
            )
            parts.append(_weigh(kwargs, unit))
        return merge_unet_kwargs(parts)
