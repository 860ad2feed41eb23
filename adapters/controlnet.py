"""ControlNet (Zhang et al., 2023): a trainable copy of the UNet encoder behind zero convolutions.

Wraps diffusers' ``ControlNetModel`` so the weights save and load as a diffusers ``ControlNetModel`` folder.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from diffusers import ControlNetModel, UNet2DConditionModel
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from adapters.base import (
    AdapterFormatError,
    ConditioningAdapter,
    UNetKwargs,
    check_saved_tensors,
    describe_unet,
    load_diffusers_folder,
)

# diffusers' default hint encoder for SD (8x down to the latent grid). Its first log2(f) + 1 entries give f x down.
_SD_HINT_CHANNELS = (16, 32, 96, 256)
DECODER_WEIGHTS_NAME = "unet_decoder.safetensors"


def hint_channels_for(vae_scale_factor: int) -> tuple[int, ...]:
    """Hint-encoder widths whose stride-2 convs bring a condition at pixel size down to the latent grid."""
    steps = math.log2(vae_scale_factor) if vae_scale_factor >= 1 else -1
    if steps != int(steps) or not 0 <= steps <= len(_SD_HINT_CHANNELS) - 1:
        raise ValueError(f"vae_scale_factor must be 1, 2, 4 or 8 for the default hint encoder, got {vae_scale_factor}")
    return _SD_HINT_CHANNELS[: int(steps) + 1]


def _unet_decoder(unet: UNet2DConditionModel) -> nn.ModuleDict:
    """The UNet parts the original unlocks with ``sd_locked=False``: the decoder blocks and the output head."""
    parts = {"up_blocks": unet.up_blocks, "conv_out": unet.conv_out}
    if unet.conv_norm_out is not None:
        parts["conv_norm_out"] = unet.conv_norm_out
    return nn.ModuleDict(parts)


class ControlNetAdapter(ConditioningAdapter):
    """ControlNet under the adapter contract.

    Args:
        controlnet: the diffusers model (its config fixes the hint encoder and the conditioning channels).
        only_mid_control: add only the middle-block residual (the original's ``only_mid_control``); the skip
            residuals are passed as zeros.
        unet_decoder: the UNet's decoder modules when they train too (the original's ``sd_locked=False``); they
            stay shared with the UNet, so training them changes the UNet in place.
        decoder_learning_rate: learning rate of ``unet_decoder`` (the original advises ~2e-6).
    """

    family = "controlnet"
    title = "ControlNet"
    accepts = "image"
    zero_initialized = True

    def __init__(
        self,
        controlnet: ControlNetModel,
        only_mid_control: bool = False,
        unet_decoder: nn.ModuleDict | None = None,
        decoder_learning_rate: float = 2e-6,
    ) -> None:
        super().__init__()
        self.controlnet = controlnet
        self.only_mid_control = only_mid_control
        self.unet_decoder = unet_decoder
        self.decoder_learning_rate = decoder_learning_rate
        self.vae_scale_factor = 2 ** (len(controlnet.config.conditioning_embedding_out_channels) - 1)

    @classmethod
    def from_unet(
        cls,
        unet: UNet2DConditionModel,
        *,
        vae_scale_factor: int = 8,
        conditioning_channels: int = 3,
        conditioning_embedding_out_channels: tuple[int, ...] | None = None,
        only_mid_control: bool = False,
        unlock_unet_decoder: bool = False,
        decoder_learning_rate: float = 2e-6,
    ) -> ControlNetAdapter:
        """Copy the UNet encoder into a new ControlNet (zero convolutions at init, so the UNet output is unchanged).

        Args:
            unet: the frozen base UNet; its encoder weights are copied.
            vae_scale_factor: pixel size / latent size; picks the hint encoder depth unless
                ``conditioning_embedding_out_channels`` is given.
            conditioning_channels: channels of the condition map (3 for RGB maps such as canny).
            unlock_unet_decoder: also train the UNet decoder, at ``decoder_learning_rate``.
        """
        if conditioning_embedding_out_channels is None:
            conditioning_embedding_out_channels = hint_channels_for(vae_scale_factor)
        controlnet = ControlNetModel.from_unet(
            unet,
            conditioning_embedding_out_channels=tuple(conditioning_embedding_out_channels),
            conditioning_channels=conditioning_channels,
        )
        controlnet.requires_grad_(True)
        decoder = None
        if unlock_unet_decoder:
            decoder = _unet_decoder(unet)
            decoder.requires_grad_(True)
        return cls(controlnet, only_mid_control, decoder, decoder_learning_rate)

    @property
    def condition_channels(self) -> int:
        """Channels of the condition map this adapter takes."""
        return self.controlnet.config.conditioning_channels

    def forward(
        self,
        condition: torch.Tensor,
        *,
        noisy_latents: torch.Tensor,
        timesteps: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        conditioning_scale: float = 1.0,
        added_cond_kwargs: dict | None = None,
    ) -> UNetKwargs:
        """condition (B, C, h*f, w*f) in [0, 1] for latents (B, 4, h, w) -> ControlNet residuals.
        ``added_cond_kwargs``: SDXL's pooled text and time ids, which an SDXL ControlNet embeds as its UNet does."""
        expected = (noisy_latents.shape[-2] * self.vae_scale_factor, noisy_latents.shape[-1] * self.vae_scale_factor)
        if (
            tuple(condition.shape[-2:]) != expected
            or condition.shape[1] != self.controlnet.config.conditioning_channels
        ):
            raise ValueError(
                f"ControlNet condition has shape {tuple(condition.shape)}; expected (B, "
                f"{self.controlnet.config.conditioning_channels}, {expected[0]}, {expected[1]}) for latents of shape "
                f"{tuple(noisy_latents.shape)} (vae_scale_factor {self.vae_scale_factor})"
            )
        down_residuals, mid_residual = self.controlnet(
            noisy_latents,
            timesteps,
            encoder_hidden_states=encoder_hidden_states,
            controlnet_cond=condition.to(noisy_latents.dtype),
            conditioning_scale=conditioning_scale,
            added_cond_kwargs=added_cond_kwargs,
            return_dict=False,
        )
        if self.only_mid_control:
            down_residuals = [torch.zeros_like(residual) for residual in down_residuals]
        return {"down_block_additional_residuals": list(down_residuals), "mid_block_additional_residual": mid_residual}

    def check_base(self, unet: UNet2DConditionModel) -> None:
        """The ControlNet's copied encoder has the UNet's text width, added conditioning and channels."""
        keys = ("cross_attention_dim", "addition_embed_type", "block_out_channels", "in_channels")
        mine, base = self.controlnet.config, unet.config
        if any(_listed(mine.get(key)) != _listed(base.get(key)) for key in keys):
            raise AdapterFormatError(
                f"a ControlNet made for a UNet with {describe_unet(mine)}, but the base model's UNet has "
                f"{describe_unet(base)}: use a ControlNet trained for this base"
            )

    def param_groups(self, learning_rate: float) -> list[dict]:
        groups = [{"params": list(self.controlnet.parameters()), "lr": learning_rate}]
        if self.unet_decoder is not None:
            groups.append({"params": list(self.unet_decoder.parameters()), "lr": self.decoder_learning_rate})
        return groups

    def save_weights(self, directory: Path) -> None:
        """Write a diffusers ``ControlNetModel`` folder (config.json + safetensors), plus the decoder if unlocked."""
        self.controlnet.save_pretrained(directory, safe_serialization=True)
        if self.unet_decoder is not None:
            state = {name: tensor.detach().contiguous() for name, tensor in self.unet_decoder.state_dict().items()}
            save_file(state, str(directory / DECODER_WEIGHTS_NAME))

    def load_saved_weights(self, path: Path, unet: UNet2DConditionModel) -> str:
        """As the base does, but a saved UNet decoder into a run that keeps the decoder frozen is refused before
        ``from_pretrained`` writes it into ``unet`` (the caller's base model stays as it was)."""
        decoder_file = Path(path) / DECODER_WEIGHTS_NAME
        if self.unet_decoder is None and decoder_file.is_file():
            with safe_open(str(decoder_file), framework="pt") as saved:
                check_saved_tensors(path, {}, {}, [], sorted(f"unet_decoder.{name}" for name in saved.keys()))
        return super().load_saved_weights(path, unet)

    @classmethod
    def recognizes(cls, path: Path) -> bool:
        """A diffusers ``ControlNetModel`` folder, or any single weights file (controlnet_formats reads those)."""
        if path.is_file():
            return True
        config_file = path / "config.json"
        return config_file.is_file() and json.loads(config_file.read_text()).get("_class_name") == "ControlNetModel"

    @classmethod
    def from_pretrained(
        cls, path: str | Path, unet: UNet2DConditionModel | None = None, only_mid_control: bool = False
    ) -> ControlNetAdapter:
        """A diffusers ``ControlNetModel`` folder (a saved unlocked decoder is loaded into ``unet``), or a single
        weights file in any format ``adapters.controlnet_formats`` reads (its layout taken from ``unet``)."""
        path = Path(path)
        if not path.is_dir():
            from adapters.controlnet_formats import FORMATS, load_controlnet  # it builds on this module

            adapter, found = load_controlnet(path, unet)
            adapter.only_mid_control = only_mid_control
            adapter.source_format = FORMATS[found]
            return adapter
        controlnet = load_diffusers_folder(ControlNetModel, path)
        decoder = None
        decoder_file = path / DECODER_WEIGHTS_NAME
        if decoder_file.is_file():
            if unet is None:
                raise AdapterFormatError(
                    f"{decoder_file} holds trained UNet decoder weights; pass the base unet to load them"
                )
            decoder = _unet_decoder(unet)
            decoder.load_state_dict(load_file(str(decoder_file)))
        adapter = cls(controlnet, only_mid_control, decoder)
        adapter.source_format = "diffusers folder"
        return adapter


def _listed(value):
    """Config values compared as saved (JSON turns tuples into lists)."""
    return list(value) if isinstance(value, tuple | list) else value
