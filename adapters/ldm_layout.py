"""State-dict keys of the original CompVis/LDM checkpoints (SD single files, lllyasviel ControlNet releases).

diffusers reads this layout (``from_single_file``) but does not write it; these functions write it, from a
diffusers module's ``state_dict`` and config. They are checked against diffusers' own reader in the tests.
"""

from __future__ import annotations

import re

import torch

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_ENCODER_PREFIX = "cond_stage_model.transformer."
OPEN_CLIP_PREFIX = "cond_stage_model.model."
# SDXL files hold both text encoders under the "conditioner": OpenAI CLIP first, OpenCLIP (with its projection) second
SDXL_TEXT_ENCODER_PREFIX = "conditioner.embedders.0.transformer."
SDXL_OPEN_CLIP_PREFIX = "conditioner.embedders.1.model."

_UNET_FIXED = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
    # SDXL's text-time embedding (pooled text + micro-conditioning): LDM's "label_emb"
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
}
_UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}
_OPEN_CLIP_FIXED = {
    "embeddings.token_embedding.weight": "token_embedding.weight",
    "embeddings.position_embedding.weight": "positional_embedding",
    "final_layer_norm.weight": "ln_final.weight",
    "final_layer_norm.bias": "ln_final.bias",
}
_OPEN_CLIP_LAYER = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "self_attn.out_proj": "attn.out_proj",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _rename_head(rest: str, names: dict[str, str]) -> str:
    """Rename the leading module name of ``rest`` ("norm1.weight" -> "in_layers.0.weight")."""
    for old, new in names.items():
        if rest.startswith(old + "."):
            return new + rest[len(old) :]
    return rest


def _layer_key(blocks: str, index: int, kind: str, rest: str) -> str:
    """A down/up block layer's LDM key: its resnet at ``<blocks>.<index>.0``, its attention at ``.1``."""
    if kind == "resnets":
        return f"{blocks}.{index}.0.{_rename_head(rest, _UNET_RESNET)}"
    return f"{blocks}.{index}.1.{rest}"


def unet_key_to_ldm(key: str, layers_per_block: int, up_block_types: tuple[str, ...]) -> str:
    """One ``UNet2DConditionModel`` key -> its ``openaimodel.UNetModel`` key (without ``model.diffusion_model.``).

    The LDM encoder numbers its blocks consecutively: ``input_blocks.0`` is conv_in, then per down block
    ``layers_per_block`` (resnet, attention) blocks and a downsampler; the decoder has one more layer per block.
    """
    per_down, per_up = layers_per_block + 1, layers_per_block + 1
    for name, ldm_name in _UNET_FIXED.items():
        if key.startswith(name + "."):
            return ldm_name + key[len(name) :]
    if match := re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        block, kind, layer, rest = int(match[1]), match[2], int(match[3]), match[4]
        return _layer_key("input_blocks", 1 + block * per_down + layer, kind, rest)
    if match := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
        return f"input_blocks.{1 + int(match[1]) * per_down + layers_per_block}.0.op.{match[2]}"
    if match := re.fullmatch(r"mid_block\.resnets\.(\d+)\.(.+)", key):
        return f"middle_block.{2 * int(match[1])}.{_rename_head(match[2], _UNET_RESNET)}"
    if match := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", key):
        return f"middle_block.1.{match[1]}"
    if match := re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        block, kind, layer, rest = int(match[1]), match[2], int(match[3]), match[4]
        return _layer_key("output_blocks", block * per_up + layer, kind, rest)
    if match := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
        block = int(match[1])
        # the upsampler follows the resnet (and the attention, in cross-attention blocks) of the block's last layer
        position = 2 if "CrossAttn" in up_block_types[block] else 1
        return f"output_blocks.{block * per_up + layers_per_block}.{position}.conv.{match[2]}"
    raise ValueError(f"no LDM name for UNet parameter '{key}'")


def vae_key_to_ldm(key: str, num_blocks: int) -> str:
    """One ``AutoencoderKL`` key -> its LDM ``AutoencoderKL`` key (without ``first_stage_model.``)."""
    if match := re.fullmatch(r"(encoder|decoder)\.conv_norm_out\.(.+)", key):
        return f"{match[1]}.norm_out.{match[2]}"
    if match := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        return f"encoder.down.{match[1]}.block.{match[2]}.{_rename_head(match[3], {'conv_shortcut': 'nin_shortcut'})}"
    if match := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
        return f"encoder.down.{match[1]}.downsample.conv.{match[2]}"
    # LDM numbers the decoder's levels from the lowest resolution up, diffusers in execution order.
    if match := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        level = num_blocks - 1 - int(match[1])
        return f"decoder.up.{level}.block.{match[2]}.{_rename_head(match[3], {'conv_shortcut': 'nin_shortcut'})}"
    if match := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
        return f"decoder.up.{num_blocks - 1 - int(match[1])}.upsample.conv.{match[2]}"
    if match := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)", key):
        return f"{match[1]}.mid.block_{int(match[2]) + 1}.{_rename_head(match[3], {'conv_shortcut': 'nin_shortcut'})}"
    if match := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)", key):
        return f"{match[1]}.mid.attn_1.{_rename_head(match[2], _VAE_ATTENTION)}"
    if re.fullmatch(r"(encoder|decoder)\.(conv_in|conv_out)\..+|(post_)?quant_conv\..+", key):
        return key
    raise ValueError(f"no LDM name for VAE parameter '{key}'")


def unet_to_ldm(state_dict: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    """A diffusers UNet state dict -> LDM keys with the ``model.diffusion_model.`` prefix."""
    layers = config["layers_per_block"]
    if not isinstance(layers, int):
        raise ValueError(f"the LDM layout needs one layers_per_block for all blocks, got {layers}")
    up_block_types = tuple(config["up_block_types"])
    return {UNET_PREFIX + unet_key_to_ldm(key, layers, up_block_types): value for key, value in state_dict.items()}


def vae_to_ldm(state_dict: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    """A diffusers AutoencoderKL state dict -> LDM keys with ``first_stage_model.``; the mid-block attention's
    linear layers become the 1x1 convolutions LDM uses."""
    num_blocks = len(config["block_out_channels"])
    converted = {}
    for key, value in state_dict.items():
        ldm_key = vae_key_to_ldm(key, num_blocks)
        if ".mid.attn_1." in ldm_key and ldm_key.endswith(".weight") and value.ndim == 2:
            value = value[:, :, None, None]
        converted[VAE_PREFIX + ldm_key] = value
    return converted


def text_encoder_to_ldm(
    state_dict: dict[str, torch.Tensor], prefix: str = TEXT_ENCODER_PREFIX
) -> dict[str, torch.Tensor]:
    """A transformers CLIPTextModel state dict -> SD1's ``cond_stage_model.transformer.text_model.`` keys (SDXL's
    first encoder: ``prefix=SDXL_TEXT_ENCODER_PREFIX``).

    transformers >= 5 names the keys without the ``text_model.`` level that SD files (and diffusers' reader) use.
    """
    converted = {}
    for key, value in state_dict.items():
        ldm_key = key if key.startswith("text_model.") else "text_model." + key
        converted[prefix + ldm_key] = value
    return converted


def text_encoder_to_open_clip(
    state_dict: dict[str, torch.Tensor], prefix: str = OPEN_CLIP_PREFIX
) -> dict[str, torch.Tensor]:
    """A transformers CLIPTextModel(WithProjection) state dict -> OpenCLIP keys: SD 2.x's ``cond_stage_model.model.*``
    or SDXL's second encoder (``prefix=SDXL_OPEN_CLIP_PREFIX``). ``transformer.resblocks.<i>.attn.in_proj_weight``
    holds q, k, v stacked, as ``nn.MultiheadAttention`` does; OpenCLIP's ``text_projection`` (width, projection) is
    the transpose of the ``nn.Linear`` weight.

    SD 2.x files also hold the OpenCLIP layer that diffusers' converted text encoder drops (it uses the penultimate
    layer) and the ``text_projection``; diffusers' reader skips both, and a ``CLIPTextModel`` has neither to write.
    """
    converted, attention = {}, {}
    for key, value in state_dict.items():
        if key == "text_projection.weight":
            converted[prefix + "text_projection"] = value.T.contiguous()
            continue
        key = key.removeprefix("text_model.")  # transformers >= 5 names the keys without it
        if key in _OPEN_CLIP_FIXED:
            converted[prefix + _OPEN_CLIP_FIXED[key]] = value
            continue
        match = re.fullmatch(r"encoder\.layers\.(\d+)\.(.+)", key)
        if match is None:
            raise ValueError(f"no OpenCLIP name for text encoder parameter '{key}'")
        layer, rest = match[1], match[2]
        block = f"{prefix}transformer.resblocks.{layer}."
        if projection := re.fullmatch(r"self_attn\.([qkv])_proj\.(weight|bias)", rest):
            attention.setdefault(f"{block}attn.in_proj_{projection[2]}", {})[projection[1]] = value
            continue
        renamed = _rename_head(rest, _OPEN_CLIP_LAYER)
        if renamed == rest:
            raise ValueError(f"no OpenCLIP name for text encoder parameter '{key}'")
        converted[block + renamed] = value
    for key, parts in attention.items():
        converted[key] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return converted
