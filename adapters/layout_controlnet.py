"""A ControlNet over a spatio-textual layout map: grounding (boxes + phrases) drawn as a map (SpaText-style).

SpaText (Avrahami et al., 2023) conditions on a map whose pixels hold the text embedding of the region covering
them; layout ControlNets (e.g. LayoutDiffusion's comparisons, ControlNet on segmentation layouts) feed such maps to a
ControlNet. Here the map is drawn from a ``GroundingCondition``, the same boxes and phrases GLIGEN takes: each
phrase's pooled text embedding (B, N, D) goes through a learnt linear projection to ``embedding_channels`` values,
and every pixel inside a box holds its box's projected phrase, the front box where boxes overlap (slot order: a later
box is drawn over an earlier one, as the shapes scenes are painted and as a user lists a foreground last). Two more
planes say how many boxes cover the pixel and where box outlines run, so an occluded box's extent stays visible.
The ControlNet's hint encoder reads the map exactly as it reads an edge map, so where GLIGEN must learn to route
each grounding token to its region through attention, here the location is given by construction: the lever the
box-masked GLIGEN pulls with a mask, with a ControlNet's capacity behind it.

Weights: a diffusers ``ControlNetModel`` folder (its ``conditioning_channels`` = embedding_channels + 2) plus
``layout_projection.safetensors`` (the phrase projection) and ``layout_controlnet.json``; diffusers runs the
ControlNet on a map from ``LayoutControlNetAdapter.layout_map``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import ControlNetModel, UNet2DConditionModel
from safetensors.torch import load_file, save_file
from torch import nn

from adapters.base import AdapterFormatError, UNetKwargs
from adapters.controlnet import ControlNetAdapter
from adapters.grounding import GroundingCondition

PROJECTION_NAME = "layout_projection.safetensors"
LAYOUT_CONFIG_NAME = "layout_controlnet.json"
EXTRA_PLANES = 2  # box count and box outlines


def box_masks(boxes: torch.Tensor, slot_masks: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, N, H, W) float: 1 where a pixel's centre lies inside a real box (boxes (B, N, 4) normalised xyxy,
    slot_masks (B, N) 1 for a real box), else 0."""
    height, width = size
    ys = (torch.arange(height, device=boxes.device, dtype=torch.float32) + 0.5) / height
    xs = (torch.arange(width, device=boxes.device, dtype=torch.float32) + 0.5) / width
    x0, y0, x1, y1 = boxes.float().unbind(-1)  # each (B, N)
    inside_y = (ys[None, None, :] >= y0[..., None]) & (ys[None, None, :] < y1[..., None])  # (B, N, H)
    inside_x = (xs[None, None, :] >= x0[..., None]) & (xs[None, None, :] < x1[..., None])  # (B, N, W)
    inside = inside_y[..., :, None] & inside_x[..., None, :]
    return inside.float() * (slot_masks.float() > 0)[..., None, None]


def box_outlines(masks: torch.Tensor, thickness: int) -> torch.Tensor:
    """(B, N, H, W) box masks -> (B, 1, H, W) in {0, 1}: pixels of a box within ``thickness`` of its border."""
    batch, slots, height, width = masks.shape
    flat = masks.reshape(batch * slots, 1, height, width)
    # a pixel is interior if every pixel within `thickness` is in the box (erosion as a min-pool of the mask);
    # outside the image counts as outside the box, so a box cut by the image edge is outlined along it
    padded = nn.functional.pad(flat, (thickness,) * 4, value=0.0)
    eroded = -nn.functional.max_pool2d(-padded, 2 * thickness + 1, stride=1)
    border = (flat - eroded).clamp(min=0).reshape(batch, slots, height, width)
    return border.amax(dim=1, keepdim=True)


class LayoutControlNetAdapter(ControlNetAdapter):
    """A ControlNet whose condition is the layout map drawn from boxes + phrases (module docstring).

    Args:
        controlnet: the diffusers model; ``conditioning_channels`` = ``projection.out_features`` + 2.
        projection: phrase embedding (D) -> the map's ``embedding_channels`` values, learnt with the ControlNet.
        max_objects: most boxes per image (GLIGEN's 30 by default, so a unit's boxes suit either family).
        unet_decoder, decoder_learning_rate: the UNet's decoder when it trains too (``ControlNetAdapter``).
    """

    family = "layout_controlnet"
    title = "layout ControlNet"
    accepts = "grounding"
    # the layout on guidance's conditional half only, so guidance pushes towards it (as GLIGEN's null grounding):
    # on the 1-3-object shapes set (ctrlkit evaluate 64 x 2, decoder unlocked, 2000 steps) box IoU 0.625 -> 0.650
    # at guidance 7.5 and 0.647 -> 0.674 at guidance 3 against "balanced"
    guidance_mode = "control"

    def __init__(
        self,
        controlnet: ControlNetModel,
        projection: nn.Linear,
        max_objects: int = 30,
        unet_decoder: nn.ModuleDict | None = None,
        decoder_learning_rate: float = 2e-6,
    ) -> None:
        super().__init__(controlnet, unet_decoder=unet_decoder, decoder_learning_rate=decoder_learning_rate)
        expected = projection.out_features + EXTRA_PLANES
        if controlnet.config.conditioning_channels != expected:
            raise ValueError(
                f"a layout ControlNet with {projection.out_features} embedding channels takes {expected} condition "
                f"channels; the ControlNet takes {controlnet.config.conditioning_channels}"
            )
        self.projection = projection
        # the grounding slots conditions are padded to (condition=boxes, ctrlkit generate); the map draws any number
        self.max_objects = max_objects

    @classmethod
    def from_unet(
        cls,
        unet: UNet2DConditionModel,
        *,
        vae_scale_factor: int = 8,
        embedding_channels: int = 16,
        phrase_dim: int | None = None,
        conditioning_embedding_out_channels: tuple[int, ...] | None = None,
        max_objects: int = 30,
        unlock_unet_decoder: bool = False,
        decoder_learning_rate: float = 2e-6,
    ) -> LayoutControlNetAdapter:
        """A ControlNet copied from ``unet`` (zero convolutions: the UNet is unchanged at init) and a projection of
        ``phrase_dim``-wide phrase embeddings (default: the UNet's ``cross_attention_dim``, the text encoder's width
        in SD1.x/2.x) to ``embedding_channels`` map values; ``unlock_unet_decoder`` also trains the UNet's decoder
        at ``decoder_learning_rate`` (the original ControlNet's ``sd_locked=False``)."""
        if embedding_channels < 1:
            raise ValueError(f"embedding_channels must be at least 1, got {embedding_channels}")
        if phrase_dim is None:
            phrase_dim = unet.config.cross_attention_dim
            if not isinstance(phrase_dim, int):
                raise ValueError(f"give phrase_dim: this UNet's cross_attention_dim is {phrase_dim}")
        plain = ControlNetAdapter.from_unet(
            unet,
            vae_scale_factor=vae_scale_factor,
            conditioning_channels=embedding_channels + EXTRA_PLANES,
            conditioning_embedding_out_channels=conditioning_embedding_out_channels,
            unlock_unet_decoder=unlock_unet_decoder,
            decoder_learning_rate=decoder_learning_rate,
        )
        projection = nn.Linear(phrase_dim, embedding_channels)
        return cls(plain.controlnet, projection, max_objects, plain.unet_decoder, decoder_learning_rate)

    def layout_map(self, condition: GroundingCondition, size: tuple[int, int]) -> torch.Tensor:
        """The grounding -> (B, embedding_channels + 2, H, W): the front box's projected phrase (0 outside every
        box), the number of boxes covering each pixel, and box outlines (1 on a box's border, ~1/64 of the side)."""
        if not isinstance(condition, GroundingCondition) or condition.phrase_embeddings is None:
            raise ValueError(
                "a layout ControlNet takes a GroundingCondition with boxes (B, N, 4), masks (B, N) and "
                f"phrase_embeddings (B, N, D) (the text encoder's embeddings of its phrases), got "
                f"{type(condition).__name__}"
            )
        if condition.phrase_embeddings.shape[-1] != self.projection.in_features:
            raise ValueError(
                f"phrase embeddings are {condition.phrase_embeddings.shape[-1]}-dimensional; this layout ControlNet "
                f"takes {self.projection.in_features} (the text encoder's width)"
            )
        masks = box_masks(condition.boxes, condition.masks, size)  # (B, N, H, W)
        projected = self.projection(condition.phrase_embeddings.to(self.projection.weight.dtype))  # (B, N, C)
        slots = torch.arange(1, masks.shape[1] + 1, device=masks.device, dtype=masks.dtype)
        front = (masks * slots[None, :, None, None]).argmax(dim=1)  # (B, H, W): the last covering slot
        covered = masks.amax(dim=1)  # (B, H, W)
        index = front.flatten(1)[..., None].expand(-1, -1, projected.shape[-1])  # (B, H*W, C)
        embedding = projected.gather(1, index).transpose(1, 2).reshape(masks.shape[0], -1, *size)
        embedding = embedding * covered[:, None].to(embedding.dtype)
        count = masks.sum(dim=1, keepdim=True)
        outlines = box_outlines(masks, thickness=max(1, min(size) // 64))
        return torch.cat([embedding, count.to(embedding.dtype), outlines.to(embedding.dtype)], dim=1)

    def forward(
        self,
        condition: GroundingCondition,
        *,
        noisy_latents: torch.Tensor,
        timesteps: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        conditioning_scale: float = 1.0,
        added_cond_kwargs: dict | None = None,
    ) -> UNetKwargs:
        """Grounding for latents (B, 4, h, w) -> the ControlNet's residuals on its layout map at pixel size."""
        size = (noisy_latents.shape[-2] * self.vae_scale_factor, noisy_latents.shape[-1] * self.vae_scale_factor)
        return super().forward(
            self.layout_map(condition, size),
            noisy_latents=noisy_latents,
            timesteps=timesteps,
            encoder_hidden_states=encoder_hidden_states,
            conditioning_scale=conditioning_scale,
            added_cond_kwargs=added_cond_kwargs,
        )

    def drop_condition(self, condition: GroundingCondition, dropped: torch.Tensor) -> GroundingCondition:
        """Null grounding for the dropped items: no boxes, an all-zero map."""
        return condition.drop(dropped)

    def param_groups(self, learning_rate: float) -> list[dict]:
        """The ControlNet's groups (the unlocked decoder at its own rate), the projection with the ControlNet."""
        groups = super().param_groups(learning_rate)
        groups[0]["params"] = groups[0]["params"] + list(self.projection.parameters())
        return groups

    def save_weights(self, directory: Path) -> None:
        """The diffusers ControlNet folder, the projection (safetensors) and the layout's settings."""
        super().save_weights(directory)
        state = {name: tensor.detach().contiguous() for name, tensor in self.projection.state_dict().items()}
        save_file(state, str(directory / PROJECTION_NAME))
        settings = {
            "embedding_channels": self.projection.out_features,
            "phrase_dim": self.projection.in_features,
            "max_objects": self.max_objects,
            "map": "front box's projected phrase (later slots in front), box count, box outlines",
        }
        (directory / LAYOUT_CONFIG_NAME).write_text(json.dumps(settings, indent=2) + "\n")

    @classmethod
    def recognizes(cls, path: Path) -> bool:
        return path.is_dir() and (path / LAYOUT_CONFIG_NAME).is_file()

    @classmethod
    def from_pretrained(cls, path: str | Path, unet: UNet2DConditionModel | None = None) -> LayoutControlNetAdapter:
        """A folder written by ``save_pretrained``."""
        path = Path(path)
        settings_file, projection_file = path / LAYOUT_CONFIG_NAME, path / PROJECTION_NAME
        for needed in (settings_file, projection_file):
            if not needed.is_file():
                raise AdapterFormatError(f"{path} has no {needed.name}: it is not a layout ControlNet folder")
        settings = json.loads(settings_file.read_text())
        projection = nn.Linear(settings["phrase_dim"], settings["embedding_channels"])
        projection.load_state_dict(load_file(str(projection_file)))
        plain = ControlNetAdapter.from_pretrained(path, unet)  # the ControlNet, and a saved decoder loaded into unet
        adapter = cls(plain.controlnet, projection, settings.get("max_objects", 30), plain.unet_decoder)
        adapter.source_format = "diffusers folder + layout projection"
        return adapter
