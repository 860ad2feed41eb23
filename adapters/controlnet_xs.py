"""ControlNet-XS (Zavadski et al., 2023): a small control encoder that exchanges features with the frozen UNet at
every sub-block, in both directions.

ControlNet's residuals are added to the UNet's skip connections after its encoder ran; ControlNet-XS instead reads
the UNet's hidden state before each sub-block (base -> control, concatenated) and writes into it after (control ->
base, through zero convolutions), so the two networks run interleaved and no UNet keyword argument expresses it.
The adapter therefore runs the UNet itself (``ConditioningAdapter.runs_unet``): ``forward`` returns
``{"unet_forward": ...}``, which ``adapters.base.run_unet`` calls in place of the UNet.

Weights: diffusers' ``ControlNetXSAdapter`` (saved as its folder). The interleaved forward: diffusers'
``UNetControlNetXSModel``, built here as a view whose base modules are the frozen UNet's own and whose control
modules are the adapter's (``UNetControlNetXSModel.from_unet`` copies both instead), so training updates the
adapter's weights and the UNet's memory is not doubled.

diffusers builds ControlNet-XS for SD's two layers per down block; the shipped tiny model has one. For such a UNet
each down block keeps the first of the two control sub-blocks and the up-block connections are made for the skips
the UNet has; ``config.json`` then says ``layers_per_block``, which only ctrlkit reads (diffusers' classes build
two layers, so diffusers loads and runs only SD-layout adapters).
"""

from __future__ import annotations

import json
from functools import partial
from itertools import chain
from pathlib import Path

import torch
from diffusers import ControlNetXSAdapter, UNet2DConditionModel, UNetControlNetXSModel
from diffusers.models.controlnets.controlnet_xs import find_largest_factor, make_zero_conv
from safetensors.torch import load_file
from torch import nn

from adapters.base import AdapterFormatError, ConditioningAdapter, UNetKwargs, load_diffusers_folder
from adapters.controlnet import hint_channels_for

# diffusers' ControlNetXSAdapter builds this many sub-blocks per down block (SD, SDXL)
DIFFUSERS_LAYERS_PER_BLOCK = 2
# what UNetControlNetXSModel's forward takes besides the sample, timestep, text and control (the UNet's own others
# -- residuals, class labels, ... -- it does not)
FUSED_UNET_ARGUMENTS = frozenset({"cross_attention_kwargs", "added_cond_kwargs", "timestep_cond", "attention_mask"})


def unsupported_unet(unet: UNet2DConditionModel) -> str | None:
    """Why diffusers' ControlNet-XS cannot run with ``unet`` (None when it can): it takes SD / SDXL layouts only."""
    config = unet.config
    if config.in_channels != 4:
        return f"in_channels {config.in_channels} (an inpainting UNet); ControlNet-XS reads 4-channel latents"
    if config.layers_per_block not in (1, DIFFUSERS_LAYERS_PER_BLOCK):
        return f"layers_per_block {config.layers_per_block}; ControlNet-XS is built for 1 or 2"
    if config.addition_embed_type not in (None, "text_time"):
        return f"addition_embed_type {config.addition_embed_type}; ControlNet-XS takes none or SDXL's text_time"
    for key in ("class_embed_type", "encoder_hid_dim_type", "time_embedding_act_fn"):
        if config.get(key) is not None:
            return f"{key} {config.get(key)}, which diffusers' UNetControlNetXSModel does not apply"
    return None


def fit_to_layers(controlnet: ControlNetXSAdapter, layers_per_block: int) -> None:
    """Shape ``controlnet`` (built by diffusers for two layers per block) for a UNet with ``layers_per_block``
    (1 or 2), in place: each down block keeps its first control sub-block with its connections, and every up
    block gets one zero convolution per skip connection the UNet has (diffusers' own channel bookkeeping)."""
    if layers_per_block == DIFFUSERS_LAYERS_PER_BLOCK:
        return
    for block in controlnet.down_blocks:
        kept = [0] + ([DIFFUSERS_LAYERS_PER_BLOCK] if block.downsamplers is not None else [])  # + the downsampler's
        block.resnets = block.resnets[:layers_per_block]
        if block.attentions is not None:
            block.attentions = block.attentions[:layers_per_block]
        block.base_to_ctrl = nn.ModuleList(block.base_to_ctrl[index] for index in kept)
        block.ctrl_to_base = nn.ModuleList(block.ctrl_to_base[index] for index in kept)
    control_channels = list(controlnet.config.block_out_channels)
    # the control stream's skips: conv_in's, then each sub-block's and each downsampler's
    skip_channels = [control_channels[0]]
    for index, channels in enumerate(control_channels):
        skip_channels += [channels] * (layers_per_block + (index < len(control_channels) - 1))
    reversed_base = list(reversed(controlnet.config.base_block_out_channels))
    out_channels = reversed_base[0]
    for index, connection in enumerate(controlnet.up_connections):
        previous_channels, out_channels = out_channels, reversed_base[index]
        skips = [skip_channels.pop() for _ in range(layers_per_block + 1)]
        connection.ctrl_to_base = nn.ModuleList(
            make_zero_conv(channels, previous_channels if position == 0 else out_channels)
            for position, channels in enumerate(skips)
        )
    controlnet.register_to_config(layers_per_block=layers_per_block)


def follow_fused_group_norms(controlnet: ControlNetXSAdapter) -> None:
    """Give the control down blocks' group norms the group counts diffusers' pipeline runs them with, in place.

    ``ControlNetXSAdapter`` picks each group count as the largest divisor of the channels up to
    ``max_norm_num_groups``; ``UNetControlNetXSModel.from_unet`` (what ``StableDiffusionControlNetXSPipeline`` runs)
    rebuilds each down block with the first control ResNet's count as that largest allowed instead. When every width
    is a multiple of ``max_norm_num_groups`` (SD at the published size ratios) the two agree; at small widths they
    differ, and weights trained under one rule would mean something else under the other. The group count holds no
    weights, so following the pipeline leaves the saved folder as diffusers writes it."""
    for block in controlnet.down_blocks:
        largest = block.resnets[0].norm1.num_groups
        for resnet in block.resnets:
            resnet.norm1.num_groups = find_largest_factor(resnet.norm1.num_channels, largest)
            resnet.norm2.num_groups = find_largest_factor(resnet.norm2.num_channels, largest)
        for attention in block.attentions or []:
            attention.norm.num_groups = find_largest_factor(attention.norm.num_channels, largest)


def fused_unet(unet: UNet2DConditionModel, controlnet: ControlNetXSAdapter) -> UNetControlNetXSModel:
    """diffusers' UNet + ControlNet-XS model over ``unet``'s and ``controlnet``'s own modules (no copies): built on
    the meta device with the configuration ``UNetControlNetXSModel.from_unet`` gives it, then every part that holds
    weights replaced by the module it would have copied."""
    unet_keys = (
        "sample_size",
        "down_block_types",
        "up_block_types",
        "block_out_channels",
        "norm_num_groups",
        "cross_attention_dim",
        "transformer_layers_per_block",
        "addition_embed_type",
        "addition_time_embed_dim",
        "upcast_attention",
        "use_linear_projection",
        "time_cond_proj_dim",
        "projection_class_embeddings_input_dim",
    )
    control_keys = (
        "conditioning_channels",
        "conditioning_embedding_out_channels",
        "conditioning_channel_order",
        "learn_time_embedding",
        "block_out_channels",
        "num_attention_heads",
        "max_norm_num_groups",
    )
    config = {key: unet.config[key] for key in unet_keys}
    config["num_attention_heads"] = unet.config.attention_head_dim  # diffusers' naming, see its from_unet
    config.update({f"ctrl_{key}": controlnet.config[key] for key in control_keys})
    config["time_embedding_mix"] = controlnet.config.time_embedding_mix
    with torch.device("meta"):
        fused = UNetControlNetXSModel.from_config(config)

    fused.base_time_proj, fused.base_time_embedding = unet.time_proj, unet.time_embedding
    fused.base_add_time_proj = getattr(unet, "add_time_proj", None)
    fused.base_add_embedding = getattr(unet, "add_embedding", None)
    fused.base_conv_in, fused.base_conv_norm_out = unet.conv_in, unet.conv_norm_out
    fused.base_conv_act, fused.base_conv_out = unet.conv_act, unet.conv_out
    fused.controlnet_cond_embedding, fused.ctrl_conv_in = controlnet.controlnet_cond_embedding, controlnet.conv_in
    fused.ctrl_time_embedding = controlnet.time_embedding
    fused.control_to_base_for_conv_in = controlnet.control_to_base_for_conv_in
    for block, base, control in zip(fused.down_blocks, unet.down_blocks, controlnet.down_blocks, strict=True):
        block.base_resnets, block.ctrl_resnets = base.resnets, control.resnets
        if control.attentions is not None:
            block.base_attentions, block.ctrl_attentions = base.attentions, control.attentions
        if base.downsamplers is not None:
            block.base_downsamplers, block.ctrl_downsamplers = base.downsamplers[0], control.downsamplers
        block.base_to_ctrl, block.ctrl_to_base = control.base_to_ctrl, control.ctrl_to_base
    middle = fused.mid_block
    middle.base_midblock, middle.ctrl_midblock = unet.mid_block, controlnet.mid_block.midblock
    middle.base_to_ctrl, middle.ctrl_to_base = controlnet.mid_block.base_to_ctrl, controlnet.mid_block.ctrl_to_base
    for block, base, control in zip(fused.up_blocks, unet.up_blocks, controlnet.up_connections, strict=True):
        block.resnets, block.ctrl_to_base = base.resnets, control.ctrl_to_base
        if hasattr(base, "attentions"):
            block.attentions = base.attentions
        block.upsamplers = base.upsamplers[0] if base.upsamplers is not None else None

    # a part diffusers adds in a later version would otherwise stay on the meta device (or be silently random)
    left = [name for name, tensor in chain(fused.named_parameters(), fused.named_buffers()) if tensor.is_meta]
    if left:
        raise RuntimeError(f"UNetControlNetXSModel has parts ctrlkit does not share with the UNet: {left[:3]}")
    return fused


class ControlNetXS(ConditioningAdapter):
    """ControlNet-XS under the adapter contract: it runs the UNet itself (``runs_unet``).

    Args:
        controlnet: diffusers' ``ControlNetXSAdapter`` (the trained weights), shaped for ``unet``.
        unet: the frozen base UNet it controls; not a submodule (its weights are the backbone's), and the only UNet
            its ``unet_forward`` runs.
    """

    family = "controlnet_xs"
    title = "ControlNet-XS"
    accepts = "image"
    # every control -> base connection is a zero convolution (and a learned time embedding starts as the UNet's)
    zero_initialized = True
    weighs_residuals = False
    runs_unet = True

    def __init__(self, controlnet: ControlNetXSAdapter, unet: UNet2DConditionModel) -> None:
        super().__init__()
        follow_fused_group_norms(controlnet)
        self.controlnet = controlnet
        self.vae_scale_factor = 2 ** (len(controlnet.config.conditioning_embedding_out_channels) - 1)
        # Plain attributes, not submodules: the adapter's state dict, optimizer and checkpoints hold its own weights.
        object.__setattr__(self, "base_unet", unet)
        object.__setattr__(self, "fused", fused_unet(unet, controlnet))

    @classmethod
    def from_unet(
        cls,
        unet: UNet2DConditionModel,
        *,
        vae_scale_factor: int = 8,
        conditioning_channels: int = 3,
        size_ratio: float = 0.2,
        num_attention_heads: list[int] | None = None,
        learn_time_embedding: bool = False,
        time_embedding_mix: float = 1.0,
    ) -> ControlNetXS:
        """A new ControlNet-XS for ``unet`` (diffusers' ``ControlNetXSAdapter.from_unet``), zero-initialised.

        Args:
            vae_scale_factor: pixel size / latent size; the hint encoder brings the condition down by it.
            conditioning_channels: channels of the condition map.
            size_ratio: the control blocks' widths as a fraction of the UNet's (0.2: the paper's SD1.5 model).
            num_attention_heads: heads per control block; None: the UNet's (diffusers' default). Every control
                width must be a positive multiple of its heads.
            learn_time_embedding, time_embedding_mix: a time embedding of its own, mixed with the UNet's
                (diffusers: ctrl * mix**0.3 + base * (1 - mix**0.3)); it starts as a copy of the UNet's.
        """
        reason = unsupported_unet(unet)
        if reason:
            raise ValueError(f"ControlNet-XS cannot control this UNet: {reason}")
        widths = [int(channels * size_ratio) for channels in unet.config.block_out_channels]
        heads = num_attention_heads or unet.config.attention_head_dim
        heads = list(heads) if isinstance(heads, list | tuple) else [heads] * len(widths)
        if any(width < 1 or width % count for width, count in zip(widths, heads, strict=True)):
            raise ValueError(
                f"size_ratio {size_ratio} gives ControlNet-XS blocks of {widths} channels for the UNet's "
                f"{list(unet.config.block_out_channels)}; each must be a positive multiple of its attention heads "
                f"{heads}: choose another size_ratio or num_attention_heads"
            )
        controlnet = ControlNetXSAdapter.from_unet(
            unet,
            size_ratio=size_ratio,
            num_attention_heads=heads,
            learn_time_embedding=learn_time_embedding,
            time_embedding_mix=time_embedding_mix,
            conditioning_channels=conditioning_channels,
            conditioning_embedding_out_channels=hint_channels_for(vae_scale_factor),
        )
        controlnet.float()  # trained weights stay float32 whatever the frozen UNet's dtype, as ControlNet's do
        fit_to_layers(controlnet, unet.config.layers_per_block)
        if controlnet.time_embedding is not None:  # so the UNet sees its own time embedding at init (zero init)
            controlnet.time_embedding.load_state_dict(unet.time_embedding.state_dict())
        controlnet.requires_grad_(True)
        return cls(controlnet, unet)

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
        conditioning_scale: float | torch.Tensor = 1.0,
        added_cond_kwargs: dict | None = None,
    ) -> UNetKwargs:
        """condition (B, C, h*f, w*f) in [0, 1] for latents (B, 4, h, w) -> ``{"unet_forward": f}``: the UNet
        forward with this control, which ``run_unet`` calls (with the text, SDXL's ``added_cond_kwargs`` and the
        timesteps it is given). ``conditioning_scale``: a float, or (B,) per-item scales (0: the plain UNet)."""
        expected = (noisy_latents.shape[-2] * self.vae_scale_factor, noisy_latents.shape[-1] * self.vae_scale_factor)
        if tuple(condition.shape[-2:]) != expected or condition.shape[1] != self.condition_channels:
            raise ValueError(
                f"ControlNet-XS condition has shape {tuple(condition.shape)}; expected (B, {self.condition_channels}, "
                f"{expected[0]}, {expected[1]}) for latents of shape {tuple(noisy_latents.shape)} "
                f"(vae_scale_factor {self.vae_scale_factor})"
            )
        if isinstance(conditioning_scale, torch.Tensor):  # one scale per item, over (B, C, h, w) features
            conditioning_scale = conditioning_scale.to(noisy_latents).view(-1, 1, 1, 1)
        control = partial(
            self.controlled_unet,
            condition=condition.to(noisy_latents.dtype),
            conditioning_scale=conditioning_scale,
        )
        return {"unet_forward": control}

    def controlled_unet(
        self,
        unet: UNet2DConditionModel,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        *,
        encoder_hidden_states: torch.Tensor,
        condition: torch.Tensor,
        conditioning_scale: float | torch.Tensor,
        **unet_kwargs,
    ) -> torch.Tensor:
        """The UNet's prediction (B, 4, h, w) with the control stream interleaved (``UNetControlNetXSModel``)."""
        if unet is not self.base_unet:
            raise ValueError("this ControlNet-XS runs the UNet it was built or loaded with; load it for this UNet")
        unknown = set(unet_kwargs) - FUSED_UNET_ARGUMENTS
        if unknown:
            raise ValueError(f"ControlNet-XS runs the UNet without {sorted(unknown)}; compose it with no other unit")
        return self.fused(
            sample,
            timestep,
            encoder_hidden_states,
            controlnet_cond=condition,
            conditioning_scale=conditioning_scale,
            return_dict=False,
            **unet_kwargs,
        )[0]

    def enable_gradient_checkpointing(self) -> bool:
        """Checkpointing in the interleaved blocks, which run both streams (the UNet's own flags are not read)."""
        self.fused.enable_gradient_checkpointing()
        return True

    def check_base(self, unet: UNet2DConditionModel) -> None:
        """The adapter's base channels, text width, block types and layers per block are the UNet's."""
        problem = check_pair(self.controlnet.config, unet)
        if problem:
            raise AdapterFormatError(problem)

    def save_weights(self, directory: Path) -> None:
        """A diffusers ``ControlNetXSAdapter`` folder (config.json + diffusion_pytorch_model.safetensors)."""
        self.controlnet.save_pretrained(directory, safe_serialization=True)

    @classmethod
    def recognizes(cls, path: Path) -> bool:
        """A diffusers ``ControlNetXSAdapter`` folder."""
        config_file = path / "config.json"
        return (
            config_file.is_file() and json.loads(config_file.read_text()).get("_class_name") == "ControlNetXSAdapter"
        )

    @classmethod
    def from_pretrained(cls, path: str | Path, unet: UNet2DConditionModel) -> ControlNetXS:
        """A ``ControlNetXSAdapter`` folder (diffusers' or ours, which may say ``layers_per_block``) for ``unet``."""
        path = Path(path)
        config_file = path / "config.json"
        if not config_file.is_file():
            raise AdapterFormatError(f"{path} is not a diffusers ControlNetXSAdapter folder: {config_file} not found")
        config = json.loads(config_file.read_text())
        layers = config.pop("layers_per_block", DIFFUSERS_LAYERS_PER_BLOCK)
        if layers == DIFFUSERS_LAYERS_PER_BLOCK:
            controlnet = load_diffusers_folder(ControlNetXSAdapter, path)
        else:  # diffusers builds two layers per block: rebuild ours, then read the weights
            controlnet = ControlNetXSAdapter.from_config(config)
            fit_to_layers(controlnet, layers)
            weights = path / "diffusion_pytorch_model.safetensors"
            try:
                controlnet.load_state_dict(load_file(str(weights)))
            except (OSError, RuntimeError) as error:
                raise AdapterFormatError(f"cannot load a ControlNetXSAdapter from {path}: {error}") from None
        problem = check_pair(controlnet.config, unet)  # before the view ties mismatched modules together
        if problem:
            raise AdapterFormatError(f"adapter {path}: {problem}")
        adapter = cls(controlnet, unet)
        adapter.source_format = "diffusers folder"
        return adapter


def check_pair(config, unet: UNet2DConditionModel) -> str | None:
    """Why a ControlNet-XS with ``config`` does not fit ``unet`` (one line), or None."""
    reason = unsupported_unet(unet)
    if reason:
        return f"ControlNet-XS cannot control this UNet: {reason}"
    base = unet.config
    layers = config.get("layers_per_block", DIFFUSERS_LAYERS_PER_BLOCK)
    same = (
        list(config["base_block_out_channels"]) == list(base.block_out_channels)
        and config["cross_attention_dim"] == base.cross_attention_dim
        and list(config["down_block_types"]) == list(base.down_block_types)
        and layers == base.layers_per_block
    )
    if same:
        return None
    made_for = _layout(config["cross_attention_dim"], config["base_block_out_channels"], layers)
    found = _layout(base.cross_attention_dim, base.block_out_channels, base.layers_per_block)
    return (
        f"a ControlNet-XS made for a UNet with {made_for}, but the base model's UNet has {found}: use a ControlNet-XS "
        "trained for this base"
    )


def _layout(cross_attention_dim, block_out_channels, layers_per_block) -> str:
    return (
        f"cross_attention_dim {cross_attention_dim}, block_out_channels {list(block_out_channels)}, "
        f"layers_per_block {layers_per_block}"
    )
