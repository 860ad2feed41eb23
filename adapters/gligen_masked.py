"""Box-masked GLIGEN: GLIGEN whose gated self-attention lets a visual token read an object's grounding token only
where the token's cell overlaps that object's box.

What changes: only the attention mask inside every ``GatedSelfAttentionDense``, at every resolution. A visual token
attends every visual token, and the grounding token of slot k only if slot k holds a real box (mask 1) and the
token's cell (of its block's h x w grid over the latent, in normalised coordinates) overlaps that box with positive
area. Padded slots (mask 0) are read by no visual token. GLIGEN keeps only the visual tokens' outputs, so the
grounding tokens' own rows are not computed at all. The layers, their parameters and the state-dict keys are
GLIGEN's (``adapters.gligen``): the weights are a GLIGEN checkpoint.

Why: plain GLIGEN has to learn which visual tokens each grounding token belongs to, and on the shipped tiny model
it learns that slowly (``experiment=gligen_boxes_shapes``: val box IoU 0.19 -> ~0.26 after 3000 steps). A throwaway
prototype of issue 17 that changed nothing but this mask measured val box IoU 0.19 -> 0.50 at step 100 and 0.61 at
step 600 (10 min on a 2-core CPU), val/condition_gain 0.19. MIGC and InstanceDiffusion restrict an instance's
attention to its region the same way.

``instance_attention`` (off by default) restricts the visual side too, as InstanceDiffusion's instance-masked
attention: a visual token inside a box reads only the visual tokens sharing one of its boxes, so the grounding
token is one of a few keys instead of one of all (on the tiny model, 700 steps: ``ctrlkit evaluate`` box IoU 0.563
against 0.539 without it, README). The weights are the same; ``gligen_config.json`` records the option.

``regional_prompts`` (off by default) also changes the frozen UNet's text cross-attention: inside a box it reads
that object's phrase, encoded alone as a prompt, instead of the caption (``adapters.regional_prompts``), so the base
draws each named object in its box; the gated layers learn on top of it. Saved in ``gligen_config.json`` when on.

Null grounding (every slot empty: the dropped condition, guidance's unconditional half): a visual token reads no
grounding token, only the visual tokens, as a token outside every box of a grounded image does. Chosen over reading
the learnt null tokens (plain GLIGEN's null grounding) because then "no box" means the same as "outside every box",
so guidance's conditional-minus-unconditional difference comes from the boxes alone; it is also the prototype's
rule. The learnt null embeddings stay in the weights (unused) so they remain a GLIGEN checkpoint. No softmax row is
ever fully masked: every visual token may attend every visual token, itself included.

How the boxes reach the fusers: diffusers' UNet hands each fuser only what its ``position_net`` returns for
``cross_attention_kwargs["gligen"]``. Here the position net returns ``BoxedGroundingTokens`` (tokens, boxes, masks
and the latent's (h, w), which the adapter adds to the dict from ``noisy_latents``). The boxes therefore travel in
the same dict as the grounding, batched exactly like it: the sampler's classifier-free-guidance batch (with null
grounding for the unconditional half) and a ``Composition`` merging other units' kwargs need nothing new.

Export: ``unet/`` (``export_unet``) is the same weights as a plain gated diffusers UNet, and diffusers runs it
*without* the mask, a different model; the folder's README.md says so. Shipping the mask to diffusers is not
possible without shipping these classes: its fuser calls its attention with no mask, and its UNet gives the fusers
nothing but the position net's output.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention import GatedSelfAttentionDense
from diffusers.models.embeddings import GLIGENTextBoundingboxProjection

from adapters.base import UNetKwargs
from adapters.gligen import UNET_FOLDER, GligenAdapter
from adapters.grounding import GroundingCondition, cell_box_overlap
from adapters.regional_prompts import KWARG as REGIONAL_PROMPTS_KWARG
from adapters.regional_prompts import RegionalPrompts, install_regional_processors

MODEL_CARD_NAME = "README.md"


@dataclass(frozen=True)
class BoxedGroundingTokens:
    """What the box-masked position net hands every fuser.

    tokens (B, N, D) grounding tokens; boxes (B, N, 4) normalised xyxy in [0, 1]; masks (B, N) 1 for a real box,
    0 for an empty slot; latent_size (H, W) of the UNet's input latents, from which each block's grid follows.
    """

    tokens: torch.Tensor
    boxes: torch.Tensor
    masks: torch.Tensor
    latent_size: tuple[int, int]
    instance_attention: bool = False


def visual_attention_mask(grounding: BoxedGroundingTokens, num_visual: int) -> torch.Tensor:
    """(B, n, n + N) bool, True where visual query i may read key j of [visual tokens; grounding tokens]: grounding
    key k where slot k is real and its box overlaps token i's cell; every visual key, or with
    ``grounding.instance_attention`` only the visual tokens that share one of token i's boxes (a token in no box
    still reads every visual token)."""
    readable = cell_box_overlap(grounding.boxes, grounding.latent_size, num_visual) & (grounding.masks[:, None] > 0)
    if grounding.instance_attention:
        in_boxes = readable.float()
        visual = (in_boxes @ in_boxes.transpose(1, 2) > 0) | ~readable.any(dim=2, keepdim=True)
    else:
        visual = readable.new_ones(readable.shape[0], num_visual, num_visual)
    return torch.cat([visual, readable], dim=2)


class BoxMaskedGatedSelfAttention(GatedSelfAttentionDense):
    """GLIGEN's gated self-attention (the same parameters) in which a visual token reads an object's grounding
    token only where its cell overlaps the object's box (module docstring). Takes x (B, n, C) visual tokens and the
    position net's ``BoxedGroundingTokens``; returns (B, n, C).

    The mask is (B x heads, n, n + N) bools once diffusers' attention repeats it per head: about 135 MB per image
    at SD1.5's 64x64 latent, a few KB on the tiny model."""

    def forward(self, x: torch.Tensor, objs: BoxedGroundingTokens) -> torch.Tensor:
        if not self.enabled:
            return x
        if not isinstance(objs, BoxedGroundingTokens):
            raise TypeError(
                f"box-masked GLIGEN fusers take the boxes with the tokens (BoxedGroundingTokens), got "
                f"{type(objs).__name__}: the UNet's position_net must be a BoxedGroundingProjection"
            )
        if objs.tokens.shape[0] != x.shape[0]:
            raise ValueError(f"grounding for {objs.tokens.shape[0]} images, visual tokens of {x.shape[0]}")
        num_visual = x.shape[1]
        normed = self.norm1(torch.cat([x, self.linear(objs.tokens)], dim=1))
        attended = self.attn(
            normed[:, :num_visual],
            encoder_hidden_states=normed,
            attention_mask=visual_attention_mask(objs, num_visual),
        )
        x = x + self.alpha_attn.tanh() * attended
        x = x + self.alpha_dense.tanh() * self.ff(self.norm2(x))
        return x


class BoxedGroundingProjection(GLIGENTextBoundingboxProjection):
    """GLIGEN's position net (the same parameters) that hands the fusers the boxes, masks and latent size with the
    grounding tokens; text-only, as the UNet's ``position_net``."""

    def forward(
        self,
        boxes: torch.Tensor,
        masks: torch.Tensor,
        positive_embeddings: torch.Tensor,
        latent_size: tuple[int, int] | None = None,
        instance_attention: bool = False,
    ) -> BoxedGroundingTokens:
        """boxes (B, N, 4), masks (B, N), positive_embeddings (B, N, D), latent_size (H, W) of ``noisy_latents``
        (``BoxMaskedGligenAdapter`` adds it to ``cross_attention_kwargs["gligen"]``)."""
        if latent_size is None:
            raise ValueError(
                "box-masked GLIGEN needs cross_attention_kwargs['gligen']['latent_size'], the (h, w) of the noisy "
                "latents; BoxMaskedGligenAdapter's forward adds it"
            )
        tokens = super().forward(boxes, masks, positive_embeddings=positive_embeddings)
        height, width = latent_size
        return BoxedGroundingTokens(tokens, boxes, masks, (int(height), int(width)), instance_attention)


class BoxMaskedGligenAdapter(GligenAdapter):
    """GLIGEN with box-masked gated self-attention (module docstring): ``GligenAdapter``'s condition, options,
    training recipe and weight layout; its saved folder says ``"variant": "gligen_masked"``."""

    family = "gligen_masked"
    title = "box-masked GLIGEN"
    variant = "gligen_masked"
    fuser_class = BoxMaskedGatedSelfAttention
    position_net_class = BoxedGroundingProjection

    def __init__(
        self,
        unet: UNet2DConditionModel,
        *args,
        instance_attention: bool = False,
        regional_prompts: bool = False,
        **kwargs,
    ) -> None:
        """``GligenAdapter``'s arguments; ``instance_attention``: a visual token in a box reads only the visual
        tokens sharing one of its boxes (``visual_attention_mask``), InstanceDiffusion's instance-masked attention;
        ``regional_prompts``: the UNet's cross-attention reads each box's phrase inside it (module docstring; the
        UNet's transformer blocks must carry ``RegionalAttnProcessor``, which ``from_unet`` installs)."""
        super().__init__(unet, *args, **kwargs)
        self.instance_attention = bool(instance_attention)
        self.regional_prompts = bool(regional_prompts)

    @classmethod
    def from_unet(
        cls,
        unet: UNet2DConditionModel,
        *,
        instance_attention: bool = False,
        regional_prompts: bool = False,
        **options,
    ):
        """``GligenAdapter.from_unet`` with ``instance_attention`` and ``regional_prompts`` (``__init__``)."""
        adapter = super().from_unet(unet, **options)
        adapter.instance_attention = bool(instance_attention)
        adapter.regional_prompts = bool(regional_prompts)
        if adapter.regional_prompts:
            install_regional_processors(unet)
        return adapter

    @property
    def reads_phrase_contexts(self) -> bool:
        """Regional prompts read each phrase encoded as a prompt (``GroundingCondition.phrase_contexts``)."""
        return self.regional_prompts

    def saved_config(self) -> dict:
        """GLIGEN's, plus ``instance_attention`` and ``regional_prompts`` when on (a folder saved without them is
        what it was before the options)."""
        options = {"instance_attention": self.instance_attention, "regional_prompts": self.regional_prompts}
        return {**super().saved_config(), **{name: True for name, on in options.items() if on}}

    def forward(
        self,
        condition: GroundingCondition,
        *,
        noisy_latents: torch.Tensor,
        timesteps: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        added_cond_kwargs: dict | None = None,  # SDXL's pooled text and time ids: the UNet reads them itself
    ) -> UNetKwargs:
        """GLIGEN's ``cross_attention_kwargs["gligen"]`` plus ``latent_size``, the (h, w) of ``noisy_latents``;
        with regional prompts also ``cross_attention_kwargs["regional_prompts"]`` (``RegionalPrompts``)."""
        if self.regional_prompts and getattr(condition, "phrase_contexts", None) is None:
            raise ValueError(
                "box-masked GLIGEN with regional_prompts needs the grounding's phrase_contexts (each phrase encoded "
                "as a prompt): embed it with Backbone.embed_grounding(condition, contexts=True)"
            )
        kwargs = super().forward(
            condition,
            noisy_latents=noisy_latents,
            timesteps=timesteps,
            encoder_hidden_states=encoder_hidden_states,
        )
        gligen = kwargs["cross_attention_kwargs"]["gligen"]
        gligen["latent_size"] = tuple(noisy_latents.shape[-2:])
        if self.instance_attention:  # only then, so that folders saved before the option read the same kwargs
            gligen["instance_attention"] = True
        if self.regional_prompts:
            kwargs["cross_attention_kwargs"][REGIONAL_PROMPTS_KWARG] = RegionalPrompts(
                condition.phrase_contexts.to(noisy_latents.dtype),
                gligen["boxes"],
                gligen["masks"],
                gligen["latent_size"],
            )
        return kwargs

    def save_weights(self, directory: Path) -> None:
        """GLIGEN's files (``gligen.safetensors``, ``gligen_config.json`` with the variant, ``unet/`` if exported)
        and a README.md saying that diffusers runs ``unet/`` without the box mask."""
        super().save_weights(directory)
        lines = [
            "# Box-masked GLIGEN (ctrlkit `adapter=gligen_masked`)",
            "",
            "GLIGEN layers whose gated self-attention lets a visual token read an object's grounding token only where",
            "the token's cell overlaps the object's box. `gligen.safetensors` holds them under the gated UNet's key",
            "names; `BoxMaskedGligenAdapter.from_pretrained(<this folder>, unet)` (adapters/gligen_masked.py) and",
            "`ctrlkit generate` run them with the mask.",
        ]
        if self.export_unet:
            lines += [
                "",
                f"`{UNET_FOLDER}/` is a plain diffusers gated UNet with these weights: `UNet2DConditionModel` and",
                "`StableDiffusionGLIGENPipeline` run it **without the box mask, which is a different model** from the",
                "one trained here.",
            ]
        (Path(directory) / MODEL_CARD_NAME).write_text("\n".join(lines) + "\n")
