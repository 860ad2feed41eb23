"""GLIGEN (Li et al., 2023): grounding tokens (boxes + phrases) read by gated self-attention layers added to every
transformer block of the frozen UNet.

Built from diffusers' own parts, placed where diffusers' ``UNet2DConditionModel(attention_type="gated")`` has them:
a ``GatedSelfAttentionDense`` as ``fuser`` of each ``BasicTransformerBlock`` (x + tanh(alpha) * SelfAttn(LN([x;
objs])), then the same with a feed-forward; both alphas start at 0, so the UNet is unchanged at init) and the
``GLIGENTextBoundingboxProjection`` as ``unet.position_net`` (Fourier-embedded boxes, 8 frequencies -> 64 dims,
concatenated with phrase embeddings, an MLP to grounding tokens, learnable null embeddings for empty slots). The
UNet therefore *is* a gated diffusers UNet: exported, it loads with ``UNet2DConditionModel.from_pretrained`` and
takes the same ``cross_attention_kwargs={"gligen": {boxes, positive_embeddings, masks}}``.

Sources: gligen/GLIGEN ``ldm/modules/attention.py`` (GatedSelfAttentionDense), ``text_grounding_net.py`` (PositionNet,
max 30 objects); diffusers ``models/attention.py``, ``models/embeddings.py``, ``unet_2d_condition.py
_set_pos_net_if_use_gligen``; scheduled sampling as diffusers' ``gligen_scheduled_sampling_beta``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import ClassVar

import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention import BasicTransformerBlock, GatedSelfAttentionDense
from diffusers.models.embeddings import GLIGENTextBoundingboxProjection
from safetensors.torch import load_file, save_file
from torch import nn

from adapters.base import AdapterFormatError, ConditioningAdapter, UNetKwargs, check_saved_tensors
from adapters.grounding import GroundingCondition

WEIGHTS_NAME = "gligen.safetensors"
CONFIG_NAME = "gligen_config.json"
UNET_FOLDER = "unet"
MAX_OBJECTS = 30  # GLIGEN's limit (gligen_inference.py prepare_batch; diffusers' pipeline)


def add_gated_attention(
    unet: UNet2DConditionModel,
    fuser_class: type[GatedSelfAttentionDense] = GatedSelfAttentionDense,
    position_net_class: type[GLIGENTextBoundingboxProjection] = GLIGENTextBoundingboxProjection,
) -> None:
    """Give every transformer block of ``unet`` a gated self-attention ``fuser`` and the UNet a ``position_net``,
    with diffusers' shapes for ``attention_type="gated"``; mark the config gated. New layers train, the rest stays
    as it was. A variant passes subclasses with the same parameters (gligen_masked.py)."""
    if unet.config.attention_type in ("gated", "gated-text-image"):
        raise ValueError(f"this UNet already has GLIGEN layers (attention_type='{unet.config.attention_type}')")
    cross_attention_dim = unet.config.cross_attention_dim
    if unet.config.addition_embed_type is not None:
        raise AdapterFormatError(
            f"GLIGEN is not built for this UNet (addition_embed_type={unet.config.addition_embed_type}, SDXL-style): "
            f"its phrase features are one text encoder's pooled embedding, as wide as the UNet's context in "
            f"SD1.x/2.x, while this context ({cross_attention_dim}) joins two encoders, and no GLIGEN for such a "
            f"UNet has been released to match; use an SD1.x/2.x base for GLIGEN"
        )
    if not isinstance(cross_attention_dim, int):
        raise ValueError(f"GLIGEN needs one cross_attention_dim for every block, got {cross_attention_dim}")
    blocks = [module for module in unet.modules() if isinstance(module, BasicTransformerBlock)]
    if not blocks:
        raise ValueError("this UNet has no transformer blocks for GLIGEN's gated self-attention")
    for block in blocks:
        # the arguments BasicTransformerBlock passes when built with attention_type="gated"
        block.fuser = fuser_class(
            block.dim, block.cross_attention_dim, block.num_attention_heads, block.attention_head_dim
        )
        block.fuser.requires_grad_(True)
    # _set_pos_net_if_use_gligen: phrase embeddings as wide as the text encoder's, tokens as wide as its context
    unet.position_net = position_net_class(
        positive_len=cross_attention_dim, out_dim=cross_attention_dim, feature_type="text-only"
    )
    unet.position_net.requires_grad_(True)
    unet.register_to_config(attention_type="gated")


def saved_variant(directory: str | Path) -> str:
    """The ``variant`` a GLIGEN folder was saved as (its gligen_config.json; "gligen" for folders saved before the
    field existed)."""
    config_file = Path(directory) / CONFIG_NAME
    if not config_file.is_file():
        raise AdapterFormatError(f"{directory} is not a ctrlkit GLIGEN folder: {CONFIG_NAME} not found")
    return json.loads(config_file.read_text()).get("variant", "gligen")


def is_gligen_parameter(name: str) -> bool:
    """Whether a UNet state-dict key belongs to GLIGEN's layers (what the original trains, ``main.py``)."""
    return ".fuser." in name or name.startswith("position_net.")


class GligenAdapter(ConditioningAdapter):
    """GLIGEN under the adapter contract.

    The condition is a ``GroundingCondition`` batched over B images with N <= ``max_objects`` slots:
    ``boxes`` (B, N, 4) normalised xyxy in [0, 1], ``phrase_embeddings`` (B, N, D) pooled text-encoder embeddings
    of the phrases (D = the UNet's cross_attention_dim), ``masks`` (B, N) 1 for a real box, 0 for an empty slot.

    Args:
        unet: a UNet that ``add_gated_attention`` has modified (``from_unet`` does it); it is referenced, not owned,
            so the adapter's state dict holds only GLIGEN's layers.
        max_objects: most boxes per image.
        scheduled_sampling_beta: fraction of denoising steps (the first ones) with grounding at inference; the rest
            run the plain UNet (GLIGEN's scheduled sampling, diffusers' default 0.3).
        export_unet: ``save_pretrained`` also writes the whole gated UNet as a diffusers folder.
        gate_learning_rate_scale: the gates (``alpha_attn``, ``alpha_dense``) train at this multiple of the adapter's
            learning rate. The gates start at 0 and everything behind them learns only as fast as they open; on a
            small model a faster gate shortens the long quiet start (a training recipe: not saved with the weights).
    """

    family = "gligen"
    title = "GLIGEN"
    accepts = "grounding"
    zero_initialized = True
    changes_unet = True  # from_unet / from_pretrained add the gated layers to the UNet in place
    # diffusers' StableDiffusionGLIGENPipeline gives the unconditional half of guidance null grounding (masks 0),
    # so guidance pushes towards the boxes as well as the prompt; grounding on both halves cancels out of it
    guidance_mode = "control"
    # grounding enters the UNet as cross-attention kwargs, not residuals: nothing to scale, weigh or mask
    weighs_residuals = False
    # what the saved folder says it is (gligen_config.json "variant"), and the layers from_unet adds; a variant that
    # runs the same parameters differently names its own (gligen_masked.py)
    variant: ClassVar[str] = "gligen"
    fuser_class: ClassVar[type[GatedSelfAttentionDense]] = GatedSelfAttentionDense
    position_net_class: ClassVar[type[GLIGENTextBoundingboxProjection]] = GLIGENTextBoundingboxProjection

    def __init__(
        self,
        unet: UNet2DConditionModel,
        max_objects: int = MAX_OBJECTS,
        scheduled_sampling_beta: float = 0.3,
        export_unet: bool = True,
        gate_learning_rate_scale: float = 1.0,
    ) -> None:
        super().__init__()
        if gate_learning_rate_scale <= 0:
            raise ValueError(f"gate_learning_rate_scale must be > 0, got {gate_learning_rate_scale}")
        if not 0.0 < scheduled_sampling_beta <= 1.0:
            raise ValueError(f"scheduled_sampling_beta must be in (0, 1], got {scheduled_sampling_beta}")
        if not 1 <= max_objects <= MAX_OBJECTS:
            raise ValueError(f"max_objects must be in [1, {MAX_OBJECTS}], got {max_objects}")
        if getattr(unet, "position_net", None) is None:
            raise ValueError("the UNet has no GLIGEN layers: build the adapter with GligenAdapter.from_unet(unet)")
        self.fusers = nn.ModuleList(m.fuser for m in unet.modules() if isinstance(m, BasicTransformerBlock))
        self.position_net = unet.position_net
        if not isinstance(self.position_net, self.position_net_class) or not all(
            isinstance(fuser, self.fuser_class) for fuser in self.fusers
        ):
            raise ValueError(
                f"the UNet's GLIGEN layers are not those of {type(self).__name__}: build the adapter with "
                f"{type(self).__name__}.from_unet(unet)"
            )
        self._unet = (unet,)  # a tuple keeps the frozen UNet out of this module's parameters and state dict
        self.max_objects = max_objects
        self.scheduled_sampling_beta = scheduled_sampling_beta
        self.export_unet = export_unet
        self.gate_learning_rate_scale = gate_learning_rate_scale

    @classmethod
    def from_unet(
        cls,
        unet: UNet2DConditionModel,
        *,
        vae_scale_factor: int = 8,
        max_objects: int = MAX_OBJECTS,
        scheduled_sampling_beta: float = 0.3,
        export_unet: bool = True,
        gate_learning_rate_scale: float = 1.0,
    ) -> GligenAdapter:
        """Add GLIGEN's layers to ``unet`` in place (gates at 0: its output is unchanged) and wrap them."""
        add_gated_attention(unet, cls.fuser_class, cls.position_net_class)
        return cls(unet, max_objects, scheduled_sampling_beta, export_unet, gate_learning_rate_scale)

    @property
    def unet(self) -> UNet2DConditionModel:
        return self._unet[0]

    @property
    def sampling_window(self) -> tuple[float, float]:
        return (0.0, self.scheduled_sampling_beta)

    def gate_values(self) -> dict[str, float]:
        """How far the gates are open: mean |tanh(alpha)| of the attention and dense gates over all layers, in
        [0, 1] (0 at init; the absolute value, as layers open with either sign)."""
        return {name.removeprefix("gate_"): float(value) for name, value in self.training_scalars().items()}

    def training_scalars(self) -> dict[str, torch.Tensor]:
        """``gate_attn`` and ``gate_dense`` (``gate_values`` as tensors), the first thing to watch in a GLIGEN run."""
        with torch.no_grad():
            return {
                "gate_attn": torch.stack([fuser.alpha_attn.tanh().abs() for fuser in self.fusers]).mean(),
                "gate_dense": torch.stack([fuser.alpha_dense.tanh().abs() for fuser in self.fusers]).mean(),
            }

    def param_groups(self, learning_rate: float) -> list[dict]:
        """The gates at ``gate_learning_rate_scale`` x ``learning_rate``, the other GLIGEN layers at it."""
        gates = [parameter for fuser in self.fusers for parameter in (fuser.alpha_attn, fuser.alpha_dense)]
        gate_ids = {id(parameter) for parameter in gates}
        rest = [parameter for parameter in self.trainable_parameters() if id(parameter) not in gate_ids]
        return [
            {"params": rest, "lr": learning_rate},
            {"params": gates, "lr": learning_rate * self.gate_learning_rate_scale, "weight_decay": 0.0},
        ]

    def check_condition(self, condition: GroundingCondition) -> None:
        if not isinstance(condition, GroundingCondition) or condition.phrase_embeddings is None:
            raise ValueError(
                "GLIGEN takes a GroundingCondition with boxes (B, N, 4), masks (B, N) and phrase_embeddings (B, N, D) "
                f"(the text encoder's embeddings of its phrases), got {type(condition).__name__}"
            )
        embeddings, slots = condition.phrase_embeddings, condition.num_slots
        if slots > self.max_objects:
            raise ValueError(f"{slots} grounding slots; GLIGEN takes at most max_objects={self.max_objects}")
        if embeddings.shape[-1] != self.position_net.positive_len:
            raise ValueError(
                f"phrase embeddings are {embeddings.shape[-1]}-dimensional; this UNet's GLIGEN takes "
                f"{self.position_net.positive_len} (the text encoder's width)"
            )

    def forward(
        self,
        condition: GroundingCondition,
        *,
        noisy_latents: torch.Tensor,
        timesteps: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        added_cond_kwargs: dict | None = None,  # SDXL's pooled text and time ids: the UNet reads them itself
    ) -> UNetKwargs:
        """Grounding (class docstring) -> ``cross_attention_kwargs["gligen"]`` as diffusers' UNet reads it."""
        self.check_condition(condition)
        dtype = noisy_latents.dtype
        gligen = {
            "boxes": condition.boxes.to(dtype),
            "positive_embeddings": condition.phrase_embeddings.to(dtype),
            "masks": condition.masks.to(dtype),
        }
        return {"cross_attention_kwargs": {"gligen": gligen}}

    def drop_condition(self, condition: GroundingCondition, dropped: torch.Tensor) -> GroundingCondition:
        """Null grounding for the dropped items: every slot empty, so only the learnt null tokens remain."""
        return condition.drop(dropped)

    # ------------------------------------------------------------------ weights

    def gligen_state_dict(self) -> dict[str, torch.Tensor]:
        """GLIGEN's weights under the gated UNet's key names (``...fuser.*``, ``position_net.*``)."""
        return {
            name: tensor.detach().contiguous()
            for name, tensor in self.unet.state_dict().items()
            if is_gligen_parameter(name)
        }

    def save_weights(self, directory: Path) -> None:
        """Write ``gligen.safetensors`` (GLIGEN's layers only, UNet key names) and ``gligen_config.json``; with
        ``export_unet`` also ``unet/``, the whole gated UNet as a diffusers folder."""
        save_file(self.gligen_state_dict(), str(directory / WEIGHTS_NAME))
        (directory / CONFIG_NAME).write_text(json.dumps(self.saved_config(), indent=2) + "\n")
        if self.export_unet:
            self.unet.save_pretrained(directory / UNET_FOLDER, safe_serialization=True)

    def load_saved_weights(self, path: Path, unet: UNet2DConditionModel) -> str:
        """The GLIGEN layers of a saved folder copied into this adapter's (already in ``unet``): its file is read
        directly, since ``from_pretrained`` would add a second set of layers to ``unet``."""
        weights_file = path / WEIGHTS_NAME
        if not weights_file.is_file():
            raise AdapterFormatError(f"{path} is not a ctrlkit GLIGEN folder: {WEIGHTS_NAME} not found")
        saved, built = load_file(str(weights_file)), self.gligen_state_dict()
        missing, extra = sorted(set(built) - set(saved)), sorted(set(saved) - set(built))
        check_saved_tensors(path, {name: built[name] for name in saved if name in built}, saved, missing, extra)
        self.unet.load_state_dict(saved, strict=False)
        return "ctrlkit GLIGEN folder"

    def saved_config(self) -> dict:
        """``gligen_config.json``: the variant and the ``from_unet`` options that change how the weights run."""
        return {
            "variant": self.variant,
            "max_objects": self.max_objects,
            "scheduled_sampling_beta": self.scheduled_sampling_beta,
        }

    @classmethod
    def recognizes(cls, path: Path) -> bool:
        """A folder saved before ``ctrlkit_adapter.json`` existed: its gligen_config.json names the variant."""
        return (path / CONFIG_NAME).is_file() and saved_variant(path) == cls.variant

    @classmethod
    def from_pretrained(cls, directory: str | Path, unet: UNet2DConditionModel) -> GligenAdapter:
        """GLIGEN layers saved by ``save_pretrained``, added to ``unet`` (a base UNet without GLIGEN layers)."""
        directory = Path(directory)
        weights_file, config_file = directory / WEIGHTS_NAME, directory / CONFIG_NAME
        for path in (weights_file, config_file):
            if not path.is_file():
                raise AdapterFormatError(f"{directory} is not a ctrlkit GLIGEN folder: {path.name} not found")
        variant = saved_variant(directory)
        if variant != cls.variant:
            raise AdapterFormatError(
                f"{directory} holds '{variant}' GLIGEN weights; {cls.__name__} loads '{cls.variant}' folders"
            )
        config = json.loads(config_file.read_text())
        config.pop("variant", None)
        adapter = cls.from_unet(unet, **config)
        state = load_file(str(weights_file))
        expected = set(adapter.gligen_state_dict())
        if set(state) != expected:
            missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
            raise AdapterFormatError(
                f"{weights_file} does not fit this UNet: {len(missing)} missing keys (e.g. {missing[:2]}), "
                f"{len(unexpected)} unexpected (e.g. {unexpected[:2]})"
            )
        try:
            unet.load_state_dict(state, strict=False)
        except RuntimeError as error:
            raise AdapterFormatError(f"{weights_file} does not fit this UNet: {str(error).splitlines()[0]}") from error
        return adapter
