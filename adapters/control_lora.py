"""Control-LoRA: a ControlNet whose copied encoder stays frozen at the base UNet's weights and learns low-rank updates.

As Stability AI's Control-LoRAs (diffusers ``api/models/controlnet.md``, ComfyUI ``ControlLora``): diffusers'
``ControlNetModel.from_unet`` copies the UNet encoder, peft LoRA layers (``LoraConfig`` injected with
``add_adapter``, B = 0 at init) adapt its attention projections and convolutions, and the parts a ControlNet adds
to the encoder, the hint encoder (``controlnet_cond_embedding``) and the zero convolutions (``controlnet_down_blocks``,
``controlnet_mid_block``), train in full. The residuals, composition and sampling are ``ControlNetAdapter``'s.

The saved folder holds what cannot be rebuilt from the base model: the LoRA weights, the zero convolutions and the
hint encoder. At load the frozen copy is rebuilt from the base UNet, so a load onto a UNet whose copied weights
differ from the training base (checked with a hash stored at save) is refused.
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path

import torch
from diffusers import ControlNetModel, UNet2DConditionModel
from safetensors.torch import load_file, save_file
from torch import nn

from adapters.base import AdapterFormatError, describe_unet
from adapters.controlnet import ControlNetAdapter, _listed, hint_channels_for

WEIGHTS_NAME = "control_lora.safetensors"
CONFIG_NAME = "control_lora_config.json"
MERGED_FOLDER = "controlnet"
# the ControlNet's own modules (not copied from the UNet): they train in full and are saved whole
FULLY_TRAINED = ("controlnet_cond_embedding", "controlnet_down_blocks", "controlnet_mid_block")
# the UNet modules ControlNetModel.from_unet copies (the weights the base hash covers)
COPIED_FROM_UNET = ("conv_in", "time_embedding", "class_embedding", "add_embedding", "down_blocks", "mid_block")
# attention projections and the resnets' 3x3 convolutions
DEFAULT_TARGET_MODULES = ("to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2")
# the UNet layout keys a saved Control-LoRA records and a load compares
LAYOUT_KEYS = ("cross_attention_dim", "addition_embed_type", "block_out_channels", "in_channels")
# a base in float32 or float16 is checked against the float16 hash, one in bfloat16 against the bfloat16 one
HASH_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


class PeftMissingError(AdapterFormatError, ImportError):
    """peft, which Control-LoRA's LoRA layers come from, is not installed (an optional extra)."""


def _require_peft():
    try:
        import peft
    except ImportError as error:
        raise PeftMissingError(
            "Control-LoRA needs the peft package, which is not installed: pip install 'ctrlkit[lora]'"
        ) from error
    return peft


def copied_weights_sha256(unet: nn.Module) -> dict[str, str]:
    """SHA-256 of the weights ``ControlNetModel.from_unet`` copies from ``unet`` (the frozen part of a
    Control-LoRA), rounded to float16 and to bfloat16 -> {"float16": hex, "bfloat16": hex}. Rounding first makes
    a base loaded in float32 or float16 (bfloat16) hash alike."""
    state = unet.state_dict()
    names = sorted(name for name in state if name.split(".", 1)[0] in COPIED_FROM_UNET)
    digests = {}
    for dtype_name, dtype in HASH_DTYPES.items():
        digest = hashlib.sha256()
        for name in names:
            rounded = state[name].detach().to("cpu", dtype).contiguous().reshape(-1)
            digest.update(name.encode())
            digest.update(rounded.view(torch.uint8).numpy().tobytes())
        digests[dtype_name] = digest.hexdigest()
    return digests


def hash_dtype_name(unet: nn.Module) -> str:
    """Which stored hash a base in ``unet``'s dtype is compared with."""
    return "bfloat16" if next(unet.parameters()).dtype == torch.bfloat16 else "float16"


def lora_target_names(controlnet: ControlNetModel, target_modules: tuple[str, ...]) -> list[str]:
    """Full names of the copied encoder's Linear and Conv2d layers whose name is, or ends with ``.<target>``, a
    target (``to_q`` or ``down_blocks.0.resnets.0.conv1``); never the fully trained ControlNet modules."""
    names = []
    for name, module in controlnet.named_modules():
        if name.split(".", 1)[0] in FULLY_TRAINED or not isinstance(module, nn.Linear | nn.Conv2d):
            continue
        if any(name == target or name.endswith(f".{target}") for target in target_modules):
            names.append(name)
    if not names:
        raise ValueError(
            f"target_modules {list(target_modules)} match no Linear or Conv2d layer of the ControlNet's encoder copy "
            f"(e.g. {', '.join(DEFAULT_TARGET_MODULES)})"
        )
    return names


class ControlLoraAdapter(ControlNetAdapter):
    """Control-LoRA under the adapter contract: ``ControlNetAdapter`` with a frozen encoder copy + peft LoRA.

    Args:
        controlnet: a ``ControlNetModel`` copied from the base UNet, LoRA layers already injected (``from_unet``).
        rank, alpha: the LoRA rank r and scale numerator (updates are scaled by alpha / r).
        target_modules: the layer-name suffixes the LoRA layers were injected at.
        base_weights_sha256: ``copied_weights_sha256`` of the UNet the copy was built from.
        lora_learning_rate_scale: the LoRA weights train at this multiple of the learning rate (the hint encoder
            and zero convolutions at the learning rate itself).
        export_merged: ``save_pretrained`` also writes the LoRA merged into the copy as a diffusers
            ``ControlNetModel`` folder (``controlnet/``).
        only_mid_control: as ``ControlNetAdapter``'s.
    """

    family = "control_lora"
    title = "Control-LoRA"

    def __init__(
        self,
        controlnet: ControlNetModel,
        rank: int,
        alpha: float,
        target_modules: tuple[str, ...],
        base_weights_sha256: dict[str, str],
        lora_learning_rate_scale: float = 1.0,
        export_merged: bool = True,
        only_mid_control: bool = False,
    ) -> None:
        super().__init__(controlnet, only_mid_control=only_mid_control)
        self.rank = rank
        self.alpha = alpha
        self.target_modules = tuple(target_modules)
        self.base_weights_sha256 = dict(base_weights_sha256)
        self.lora_learning_rate_scale = lora_learning_rate_scale
        self.export_merged = export_merged

    @classmethod
    def from_unet(
        cls,
        unet: UNet2DConditionModel,
        *,
        vae_scale_factor: int = 8,
        conditioning_channels: int = 3,
        conditioning_embedding_out_channels: tuple[int, ...] | None = None,
        rank: int = 4,
        alpha: float | None = None,
        target_modules: tuple[str, ...] | list[str] = DEFAULT_TARGET_MODULES,
        lora_learning_rate_scale: float = 1.0,
        export_merged: bool = True,
        only_mid_control: bool = False,
    ) -> ControlLoraAdapter:
        """Copy the UNet encoder (frozen), inject LoRA layers of ``rank`` at ``target_modules``; the hint encoder
        and the zero convolutions train. The UNet output is unchanged at init (zero convolutions, LoRA B = 0).

        Args:
            unet: the frozen base UNet; its encoder weights are copied and hashed.
            vae_scale_factor, conditioning_channels, conditioning_embedding_out_channels: as ``ControlNetAdapter``.
            rank: LoRA rank (>= 1); alpha: LoRA alpha (None: the rank, so updates are scaled by 1).
            target_modules: layer-name suffixes to adapt: the attention projections (``to_q``, ``to_k``, ``to_v``,
                ``to_out.0``) and the resnets' convolutions (``conv1``, ``conv2``) by default.
        """
        peft = _require_peft()
        if not (isinstance(rank, int) and rank >= 1):
            raise ValueError(f"Control-LoRA rank={rank!r}; allowed: an integer >= 1")
        alpha = float(rank if alpha is None else alpha)
        if conditioning_embedding_out_channels is None:
            conditioning_embedding_out_channels = hint_channels_for(vae_scale_factor)
        controlnet = ControlNetModel.from_unet(
            unet,
            conditioning_embedding_out_channels=tuple(conditioning_embedding_out_channels),
            conditioning_channels=conditioning_channels,
        )
        controlnet.requires_grad_(False)
        targets = lora_target_names(controlnet, tuple(target_modules))
        # peft makes the LoRA layers (and only them) trainable; init_lora_weights=True: B = 0, A Kaiming-uniform
        config = peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, init_lora_weights=True)
        controlnet.add_adapter(config)
        for name in FULLY_TRAINED:
            getattr(controlnet, name).requires_grad_(True)
        return cls(
            controlnet,
            rank,
            alpha,
            tuple(target_modules),
            copied_weights_sha256(unet),
            lora_learning_rate_scale,
            export_merged,
            only_mid_control,
        )

    # ------------------------------------------------------------------ what trains

    def lora_parameters(self) -> list[nn.Parameter]:
        return [parameter for name, parameter in self.controlnet.named_parameters() if ".lora_" in name]

    def fully_trained_parameters(self) -> list[nn.Parameter]:
        return [parameter for name in FULLY_TRAINED for parameter in getattr(self.controlnet, name).parameters()]

    def param_groups(self, learning_rate: float) -> list[dict]:
        """The hint encoder and zero convolutions at ``learning_rate``, the LoRA weights at
        ``learning_rate * lora_learning_rate_scale``."""
        return [
            {"params": self.fully_trained_parameters(), "lr": learning_rate},
            {"params": self.lora_parameters(), "lr": learning_rate * self.lora_learning_rate_scale},
        ]

    # ------------------------------------------------------------------ weights

    def control_lora_state_dict(self) -> dict[str, torch.Tensor]:
        """What the saved file holds: the LoRA weights under peft's names (``<layer>.lora_A.weight``, the
        ``load_lora_adapter`` layout) and the fully trained modules under ``ControlNetModel``'s names."""
        from peft.utils import get_peft_model_state_dict

        state = dict(get_peft_model_state_dict(self.controlnet))
        for name in FULLY_TRAINED:
            for key, tensor in getattr(self.controlnet, name).state_dict().items():
                state[f"{name}.{key}"] = tensor
        return {key: tensor.detach().contiguous() for key, tensor in state.items()}

    def saved_config(self) -> dict:
        controlnet_config = self.controlnet.config
        return {
            "rank": self.rank,
            "alpha": self.alpha,
            "target_modules": list(self.target_modules),
            "conditioning_channels": controlnet_config.conditioning_channels,
            "conditioning_embedding_out_channels": list(controlnet_config.conditioning_embedding_out_channels),
            "lora_learning_rate_scale": self.lora_learning_rate_scale,
            "export_merged": self.export_merged,
            "base_unet": {key: _listed(controlnet_config.get(key)) for key in LAYOUT_KEYS},
            "base_weights_sha256": self.base_weights_sha256,
        }

    def merged_controlnet(self) -> ControlNetModel:
        """A plain diffusers ``ControlNetModel``: a copy with the LoRA updates merged into the encoder weights."""
        merged = copy.deepcopy(self.controlnet)
        merged.fuse_lora()
        merged.unload_lora()
        return merged

    def save_weights(self, directory: Path) -> None:
        """Write the Control-LoRA, and with ``export_merged`` the merged ControlNet:

        - ``control_lora.safetensors``: LoRA weights + zero convolutions + hint encoder (a fraction of a
          ControlNet; ctrlkit rebuilds the frozen copy from the base UNet at load);
        - ``control_lora_config.json``: rank, alpha, targets, hint encoder, the base UNet's layout and weight hash;
        - ``controlnet/`` (``export_merged``): the LoRA merged into the copy, a whole diffusers ``ControlNetModel``
          folder that diffusers' ControlNet pipelines load (``ControlNetModel.from_pretrained``), as large as a
          ControlNet's."""
        save_file(self.control_lora_state_dict(), str(directory / WEIGHTS_NAME))
        (directory / CONFIG_NAME).write_text(json.dumps(self.saved_config(), indent=2) + "\n")
        if self.export_merged:
            self.merged_controlnet().save_pretrained(directory / MERGED_FOLDER, safe_serialization=True)

    @classmethod
    def recognizes(cls, path: Path) -> bool:
        """A folder with ``control_lora_config.json`` (ControlNet's own ``recognizes`` takes any file)."""
        return (path / CONFIG_NAME).is_file()

    @classmethod
    def from_pretrained(
        cls, path: str | Path, unet: UNet2DConditionModel | None = None, only_mid_control: bool = False
    ) -> ControlLoraAdapter:
        """The Control-LoRA saved at ``path``, its frozen copy rebuilt from ``unet``: the base model's UNet, which
        must be the one it was trained on (same layout and copied weights; one-line ``AdapterFormatError`` if not)."""
        directory = Path(path)
        weights_file, config_file = directory / WEIGHTS_NAME, directory / CONFIG_NAME
        for file in (weights_file, config_file):
            if not file.is_file():
                raise AdapterFormatError(f"{directory} is not a ctrlkit Control-LoRA folder: {file.name} not found")
        if unet is None:
            raise AdapterFormatError(
                f"{directory} is a Control-LoRA: pass the base unet, its frozen copy is built from it"
            )
        config = json.loads(config_file.read_text())
        _check_layout(config["base_unet"], unet.config, directory)
        adapter = cls.from_unet(
            unet,
            conditioning_channels=config["conditioning_channels"],
            conditioning_embedding_out_channels=tuple(config["conditioning_embedding_out_channels"]),
            rank=config["rank"],
            alpha=config["alpha"],
            target_modules=tuple(config["target_modules"]),
            lora_learning_rate_scale=config.get("lora_learning_rate_scale", 1.0),
            export_merged=config.get("export_merged", True),
            only_mid_control=only_mid_control,
        )
        _check_weights(config["base_weights_sha256"], adapter.base_weights_sha256, unet, directory)
        adapter.load_control_lora_state_dict(load_file(str(weights_file)), weights_file)
        adapter.source_format = "Control-LoRA folder"
        return adapter

    def load_control_lora_state_dict(self, state: dict[str, torch.Tensor], source: Path) -> None:
        """Load what ``control_lora_state_dict`` gave (from ``source``, named in errors) into this adapter."""
        from peft.utils import set_peft_model_state_dict

        expected = self.control_lora_state_dict()
        if set(state) != set(expected):
            missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
            raise AdapterFormatError(
                f"{source} does not fit this Control-LoRA: {len(missing)} missing keys (e.g. {missing[:2]}), "
                f"{len(unexpected)} unexpected (e.g. {unexpected[:2]})"
            )
        wrong = [key for key, tensor in state.items() if tensor.shape != expected[key].shape]
        if wrong:
            raise AdapterFormatError(
                f"{source} does not fit this Control-LoRA: {wrong[0]} has shape {tuple(state[wrong[0]].shape)}, "
                f"expected {tuple(expected[wrong[0]].shape)}"
            )
        fully_trained = {key: tensor for key, tensor in state.items() if key.split(".", 1)[0] in FULLY_TRAINED}
        lora = {key: tensor for key, tensor in state.items() if key not in fully_trained}
        self.controlnet.load_state_dict(fully_trained, strict=False)
        set_peft_model_state_dict(self.controlnet, lora)

    def check_base(self, unet: UNet2DConditionModel) -> None:
        """The layout check of ``ControlNetAdapter``, then the weights: the frozen copy must be this UNet's."""
        super().check_base(unet)
        _check_weights(self.base_weights_sha256, copied_weights_sha256(unet), unet, None)


def _check_layout(saved: dict, base, directory: Path) -> None:
    if any(saved.get(key) != _listed(base.get(key)) for key in LAYOUT_KEYS):
        raise AdapterFormatError(
            f"{directory}: a Control-LoRA made for a UNet with {describe_unet(saved)}, but the base model's UNet has "
            f"{describe_unet(base)}: use a Control-LoRA trained for this base"
        )


def _check_weights(saved: dict[str, str], found: dict[str, str], unet: nn.Module, directory: Path | None) -> None:
    dtype_name = hash_dtype_name(unet)
    if saved.get(dtype_name) != found[dtype_name]:
        where = f"{directory}: " if directory is not None else ""
        raise AdapterFormatError(
            f"{where}the base UNet's encoder weights are not those this Control-LoRA was trained on (their "
            f"{dtype_name} SHA-256 differs), and its frozen copy is rebuilt from them: load it on its own base model"
        )
