"""T2I-Adapter (Mou et al., 2023): a small convolutional encoder whose feature pyramid is added inside the frozen
UNet's down blocks ("intrablock residuals").

Wraps diffusers' ``T2IAdapter`` (``full_adapter``, ``light_adapter``, ``full_adapter_xl``) so the weights save and
load as a diffusers ``T2IAdapter`` folder. The features do not depend on the timestep, so a sampling run computes
them once (``prepare``) and adds the same pyramid at every step (diffusers PR #2555; the T2I-Adapter paper's
"once per generation").

diffusers' defaults assume SD1.x's four down levels; ``t2i_config_for`` derives channels and downscale factor from
the UNet itself, so the pyramid matches any UNet laid out like SD (e.g. the tiny three-level one) or SDXL.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import T2IAdapter, UNet2DConditionModel

from adapters.base import AdapterFormatError, ConditioningAdapter, UNetKwargs, describe_unet, load_diffusers_folder

ADAPTER_TYPES = ("full_adapter", "light_adapter", "full_adapter_xl")
# diffusers' (and TencentARC's released adapters') residual blocks per level
DEFAULT_RES_BLOCKS = {"full_adapter": 2, "light_adapter": 4, "full_adapter_xl": 2}


def unet_feature_pyramid(unet: UNet2DConditionModel, vae_scale_factor: int) -> list[tuple[int, int]]:
    """(channels, downscale from pixels) of each feature the UNet adds, in the order it consumes them.

    ``UNet2DConditionModel.forward`` adds one feature per down block: inside a cross-attention block before its
    downsampler, after a plain block (and its downsampler). A further feature of the last level's shape is added
    after the mid block (SDXL's adapters use it); it is listed last, as ``(channels, downscale)`` of the mid block.
    """
    levels = []
    downscale = vae_scale_factor
    for block, channels in zip(unet.down_blocks, unet.config.block_out_channels):
        downsamples = getattr(block, "downsamplers", None) is not None
        if getattr(block, "has_cross_attention", False):
            levels.append((channels, downscale))
            downscale *= 2 if downsamples else 1
        else:
            downscale *= 2 if downsamples else 1
            levels.append((channels, downscale))
    levels.append((unet.config.block_out_channels[-1], downscale))  # after the mid block
    return levels


def adapter_pyramid(adapter_type: str, channels: tuple[int, ...], downscale_factor: int) -> list[tuple[int, int]]:
    """(channels, downscale from pixels) of the features a diffusers ``T2IAdapter`` of this layout returns."""
    if adapter_type == "full_adapter":
        return [(c, downscale_factor * 2**i) for i, c in enumerate(channels)]
    if adapter_type == "light_adapter":  # one more level than channels, at the last width
        return [(c, downscale_factor * 2**i) for i, c in enumerate(channels)] + [
            (channels[-1], downscale_factor * 2 ** len(channels))
        ]
    if adapter_type == "full_adapter_xl":  # one downsample, at the third block
        return [(c, downscale_factor * (2 if i >= 2 else 1)) for i, c in enumerate(channels)]
    raise ValueError(f"unknown T2I-Adapter type '{adapter_type}'; choose one of: {', '.join(ADAPTER_TYPES)}")


def t2i_config_for(unet: UNet2DConditionModel, adapter_type: str, vae_scale_factor: int) -> dict:
    """``T2IAdapter`` arguments (channels, downscale_factor) whose feature pyramid matches ``unet``.

    full_adapter and light_adapter feed the down blocks only; full_adapter_xl also the mid block. Raises a
    ValueError naming the layouts when the UNet's levels do not fit the chosen type.
    """
    levels = unet_feature_pyramid(unet, vae_scale_factor)
    down_levels, first_downscale = levels[:-1], levels[0][1]
    if adapter_type == "full_adapter":
        channels = tuple(c for c, _ in down_levels)
    elif adapter_type == "light_adapter":
        channels = tuple(c for c, _ in down_levels[:-1])
    elif adapter_type == "full_adapter_xl":
        channels = tuple(c for c, _ in levels)
    else:
        raise ValueError(f"unknown T2I-Adapter type '{adapter_type}'; choose one of: {', '.join(ADAPTER_TYPES)}")
    wanted = levels if adapter_type == "full_adapter_xl" else down_levels
    if not channels or adapter_pyramid(adapter_type, channels, first_downscale) != wanted:
        fitting = [name for name in ADAPTER_TYPES if name != adapter_type and _fits(unet, name, vae_scale_factor)]
        raise ValueError(
            f"a T2I-Adapter of type '{adapter_type}' cannot match this UNet: its blocks take features "
            f"(channels, downscale) {wanted}; types that fit: {', '.join(fitting) or 'none'}"
        )
    return {"channels": channels, "downscale_factor": first_downscale}


def _fits(unet: UNet2DConditionModel, adapter_type: str, vae_scale_factor: int) -> bool:
    try:
        t2i_config_for(unet, adapter_type, vae_scale_factor)
    except ValueError:
        return False
    return True


@dataclass
class T2IFeatures:
    """A condition after ``T2IAdapterAdapter.prepare``: the adapter's feature pyramid, each (B, C_i, h_i, w_i)."""

    features: list[torch.Tensor]


class T2IAdapterAdapter(ConditioningAdapter):
    """T2I-Adapter under the adapter contract.

    Args:
        t2i_adapter: the diffusers model; its config fixes the layout, input channels and downscale factor.
    """

    family = "t2i_adapter"
    title = "T2I-Adapter"
    accepts = "image"
    # Plain convolutions added to the UNet features: not an identity at init (the paper trains from random init).
    zero_initialized = False

    def __init__(self, t2i_adapter: T2IAdapter) -> None:
        super().__init__()
        self.t2i_adapter = t2i_adapter

    @classmethod
    def from_unet(
        cls,
        unet: UNet2DConditionModel,
        *,
        vae_scale_factor: int = 8,
        adapter_type: str = "full_adapter",
        conditioning_channels: int = 3,
        num_res_blocks: int | None = None,
    ) -> T2IAdapterAdapter:
        """A new T2I-Adapter whose features fit ``unet``'s down blocks (see ``t2i_config_for``).

        Args:
            vae_scale_factor: pixel size / latent size; the first feature level is at this downscale.
            adapter_type: "full_adapter" (SD), "light_adapter" (the small colour/palette layout) or
                "full_adapter_xl" (SDXL-style UNets, whose first block has no attention).
            conditioning_channels: channels of the condition map.
            num_res_blocks: residual blocks per level (None: diffusers' default for the type).
        """
        config = t2i_config_for(unet, adapter_type, vae_scale_factor)
        t2i_adapter = T2IAdapter(
            in_channels=conditioning_channels,
            channels=list(config["channels"]),
            num_res_blocks=num_res_blocks or DEFAULT_RES_BLOCKS[adapter_type],
            downscale_factor=config["downscale_factor"],
            adapter_type=adapter_type,
        )
        t2i_adapter.requires_grad_(True)
        return cls(t2i_adapter)

    @property
    def condition_channels(self) -> int:
        return self.t2i_adapter.config.in_channels

    def check_base(self, unet: UNet2DConditionModel) -> None:
        """The adapter's feature pyramid is the one ``unet`` takes: same channels per level, same downscale from
        level to level (the absolute scale also holds the VAE's factor, which the UNet does not know)."""
        config = self.t2i_adapter.config
        levels = unet_feature_pyramid(unet, vae_scale_factor=1)
        wanted = levels if config.adapter_type == "full_adapter_xl" else levels[:-1]
        given = adapter_pyramid(config.adapter_type, tuple(config.channels), config.downscale_factor)

        def relative(pyramid: list[tuple[int, int]]) -> list[tuple[int, float]]:
            return [(channels, downscale / pyramid[0][1]) for channels, downscale in pyramid]

        if relative(given) != relative(wanted):
            raise AdapterFormatError(
                f"a T2I-Adapter ({config.adapter_type}, channels {list(config.channels)}) whose features do not fit "
                f"the base model's UNet ({describe_unet(unet.config)}; it takes channels {[c for c, _ in wanted]}): "
                "use a T2I-Adapter trained for this base"
            )

    def prepare(self, condition: torch.Tensor | T2IFeatures) -> T2IFeatures:
        """condition (B, C, H, W) in [0, 1] -> its feature pyramid (computed here, once per sampling run)."""
        return condition if isinstance(condition, T2IFeatures) else self.encode(condition)

    def encode(self, condition: torch.Tensor) -> T2IFeatures:
        """Run the adapter: condition (B, C, H, W) in [0, 1] -> features, the first at H / downscale_factor."""
        downscale = self.t2i_adapter.total_downscale_factor
        if condition.ndim != 4 or condition.shape[1] != self.condition_channels:
            raise ValueError(
                f"T2I-Adapter condition has shape {tuple(condition.shape)}; expected (B, {self.condition_channels}, "
                "H, W)"
            )
        if condition.shape[-2] % downscale or condition.shape[-1] % downscale:
            raise ValueError(
                f"T2I-Adapter condition of size {tuple(condition.shape[-2:])} must have sides divisible by the "
                f"adapter's total downscale factor {downscale}"
            )
        dtype = next(self.t2i_adapter.parameters()).dtype
        return T2IFeatures(list(self.t2i_adapter(condition.to(dtype))))

    def forward(
        self,
        condition: torch.Tensor | T2IFeatures,
        *,
        noisy_latents: torch.Tensor,
        timesteps: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        added_cond_kwargs: dict | None = None,  # SDXL's pooled text and time ids: the UNet reads them itself
        conditioning_scale: float = 1.0,
    ) -> UNetKwargs:
        """condition (B, C, h*f, w*f) in [0, 1], or its prepared features -> intrablock residuals for the UNet.

        The list is new at every call: the UNet pops from it."""
        prepared = condition if isinstance(condition, T2IFeatures) else self.encode(condition)
        residuals = [feature.to(noisy_latents.dtype) * conditioning_scale for feature in prepared.features]
        return {"down_intrablock_additional_residuals": residuals}

    def save_weights(self, directory: Path) -> None:
        """Write a diffusers ``T2IAdapter`` folder (config.json + safetensors)."""
        self.t2i_adapter.save_pretrained(directory, safe_serialization=True)

    @classmethod
    def recognizes(cls, path: Path) -> bool:
        """A diffusers ``T2IAdapter`` folder (ours, or TencentARC's releases)."""
        config_file = path / "config.json"
        return config_file.is_file() and json.loads(config_file.read_text()).get("_class_name") == "T2IAdapter"

    @classmethod
    def from_pretrained(cls, path: str | Path, unet: UNet2DConditionModel | None = None) -> T2IAdapterAdapter:
        """Load a diffusers ``T2IAdapter`` folder (ours, or TencentARC's releases); ``unet`` is not needed."""
        adapter = cls(load_diffusers_folder(T2IAdapter, path))
        adapter.source_format = "diffusers folder"
        return adapter
