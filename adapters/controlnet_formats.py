"""ControlNet weights in the formats people have: diffusers folders and the original single-file layout.

The original layout (``control_model.*`` keys: ``input_hint_block``, ``input_blocks``, ``zero_convs``,
``middle_block``, ``middle_block_out``) is what lllyasviel's ControlNet releases, A1111 and ComfyUI use. diffusers
reads it only for SD-size hint encoders (``ControlNetModel.from_single_file`` fixes the hint encoder's last conv at
``input_hint_block.14``) and never writes it; here both directions work for any hint-encoder depth, and the
writer is checked against diffusers' reader in the tests.

``load_controlnet`` detects the format from the path and the keys, says which it found, and otherwise names the
file and every format it tried in one line.
"""

from __future__ import annotations

import logging
import pickle
import re
from pathlib import Path

import torch
from diffusers import ControlNetModel, UNet2DConditionModel
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from adapters.base import AdapterFormatError
from adapters.controlnet import ControlNetAdapter
from adapters.ldm_layout import unet_key_to_ldm

log = logging.getLogger(__name__)

CONTROL_PREFIX = "control_model."
FORMATS = {
    "diffusers": "diffusers folder (config.json + diffusion_pytorch_model.safetensors)",
    "diffusers-weights": "diffusers weights file (controlnet_cond_embedding.* keys)",
    "original": "original single file (control_model.* keys, as lllyasviel's releases)",
}
_TRIED = "; ".join(FORMATS.values())


def controlnet_key_to_ldm(key: str, config) -> str:
    """One ``ControlNetModel`` key -> its original key (without ``control_model.``)."""
    if match := re.fullmatch(r"controlnet_cond_embedding\.conv_in\.(.+)", key):
        return f"input_hint_block.0.{match[1]}"
    if match := re.fullmatch(r"controlnet_cond_embedding\.blocks\.(\d+)\.(.+)", key):
        return f"input_hint_block.{2 * (int(match[1]) + 1)}.{match[2]}"
    if match := re.fullmatch(r"controlnet_cond_embedding\.conv_out\.(.+)", key):
        # the hint encoder is one Sequential of convs and SiLUs: conv_in, 2 convs per width step, then conv_out
        num_blocks = 2 * (len(config["conditioning_embedding_out_channels"]) - 1)
        return f"input_hint_block.{2 * (num_blocks + 1)}.{match[1]}"
    if match := re.fullmatch(r"controlnet_down_blocks\.(\d+)\.(.+)", key):
        return f"zero_convs.{match[1]}.0.{match[2]}"
    if match := re.fullmatch(r"controlnet_mid_block\.(.+)", key):
        return f"middle_block_out.0.{match[1]}"
    layers = config["layers_per_block"]
    if not isinstance(layers, int):
        raise ValueError(f"the original layout needs one layers_per_block for all blocks, got {layers}")
    return unet_key_to_ldm(key, layers, up_block_types=())


def save_controlnet_single_file(controlnet: ControlNetModel, path: str | Path) -> None:
    """Write ``controlnet`` as one ``.safetensors`` in the original layout (``control_model.*``)."""
    state = {
        CONTROL_PREFIX + controlnet_key_to_ldm(key, controlnet.config): tensor.detach().contiguous()
        for key, tensor in controlnet.state_dict().items()
    }
    save_file(state, str(path), metadata={"format": "pt"})


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` file, or of a torch pickle read with ``weights_only=True`` (never arbitrary
    code); a ``{"state_dict": ...}`` wrapper, as Lightning and the original ControlNet training write, is opened."""
    if path.suffix == ".safetensors":
        return load_file(str(path))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise AdapterFormatError(
            f"refused to load {path}: it is a pickle that needs arbitrary code (only tensors are read, "
            f"weights_only=True); convert it to .safetensors from a trusted environment"
        ) from error
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise AdapterFormatError(f"{path} holds a {type(state).__name__}, not a state dict")
    return {key: value for key, value in state.items() if isinstance(value, torch.Tensor)}


def detect_format(keys) -> str | None:
    """The format of a weights file from its keys: "original", "diffusers-weights" or None."""
    keys = set(keys)
    if (
        any(key.startswith(CONTROL_PREFIX + "input_hint_block.") for key in keys)
        or "input_hint_block.0.weight" in keys
    ):
        return "original"
    if "controlnet_cond_embedding.conv_in.weight" in keys:
        return "diffusers-weights"
    return None


def _hint_encoder_shape(state: dict[str, torch.Tensor], file_format: str) -> tuple[int, tuple[int, ...]]:
    """(conditioning_channels, conditioning_embedding_out_channels) read off the hint encoder's weights: conv_in's
    input and output widths, then the width of every second block (the stride-2 convs that step the width up)."""
    original = file_format == "original"
    prefix = "input_hint_block" if original else "controlnet_cond_embedding.blocks"
    conv_in = "input_hint_block.0.weight" if original else "controlnet_cond_embedding.conv_in.weight"
    indices = sorted(
        int(match[1]) for key in state if (match := re.fullmatch(re.escape(prefix) + r"\.(\d+)\.weight", key))
    )
    if original:
        indices = indices[1:-1]  # one Sequential: conv_in first, conv_out last, the blocks between
    widths = [state[f"{prefix}.{index}.weight"].shape[0] for index in indices]
    return state[conv_in].shape[1], (state[conv_in].shape[0], *widths[1::2])


def controlnet_from_state_dict(
    state: dict[str, torch.Tensor], unet: UNet2DConditionModel, file_format: str
) -> ControlNetModel:
    """Build a ``ControlNetModel`` from ``unet``'s layout with the file's hint encoder, then load ``state``
    (strict: a missing or unexpected key raises ``AdapterFormatError``)."""
    if file_format == "original":
        state = {key.removeprefix(CONTROL_PREFIX): value for key, value in state.items()}
    conditioning_channels, hint_channels = _hint_encoder_shape(state, file_format)
    controlnet = ControlNetModel.from_unet(
        unet, conditioning_channels=conditioning_channels, conditioning_embedding_out_channels=hint_channels
    )
    if file_format == "original":
        names = {controlnet_key_to_ldm(key, controlnet.config): key for key in controlnet.state_dict()}
        unexpected = sorted(set(state) - set(names))
        if unexpected:
            raise AdapterFormatError(
                f"{len(unexpected)} original ControlNet keys do not fit this base UNet, e.g. {unexpected[0]}"
            )
        state = {names[key]: value for key, value in state.items()}
    try:
        controlnet.load_state_dict(state, strict=True)
    except RuntimeError as error:
        detail = " ".join(str(error).split())[:300]
        raise AdapterFormatError(f"ControlNet weights do not fit this base UNet: {detail}") from error
    return controlnet.eval()  # as diffusers' from_pretrained returns it


def load_controlnet(path: str | Path, unet: UNet2DConditionModel | None = None) -> tuple[ControlNetAdapter, str]:
    """A ControlNet from a diffusers folder, a diffusers weights file or an original single file; returns the
    adapter and the format found. Single files take their layout from ``unet`` (the base model's UNet), as the
    original releases are loaded with their base model's config."""
    path = Path(path)
    if path.is_dir():
        return ControlNetAdapter.from_pretrained(path, unet), "diffusers"
    if not path.is_file():
        raise AdapterFormatError(f"{path} not found; expected one of: {_TRIED}")
    try:
        state = read_state_dict(path)
    except AdapterFormatError:
        raise
    except (SafetensorError, OSError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError) as error:
        detail = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise AdapterFormatError(f"cannot read {path} ({detail}); tried: {_TRIED}") from error
    file_format = detect_format(state)
    if file_format is None:
        example = next(iter(state), "none")
        raise AdapterFormatError(f"{path} is not a ControlNet checkpoint (first key: {example}); tried: {_TRIED}")
    if unet is None:
        raise AdapterFormatError(f"{path} is a {FORMATS[file_format]}: pass the base model's unet to build it")
    try:
        controlnet = controlnet_from_state_dict(state, unet, file_format)
    except AdapterFormatError as error:
        raise AdapterFormatError(f"{path}: {error}") from error
    log.info("loaded %s as a %s", path, FORMATS[file_format])
    return ControlNetAdapter(controlnet), file_format
