"""The adapter contract: what every conditioning adapter gives the frozen UNet."""

from __future__ import annotations

import inspect
import json
import sys
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar, Literal, TypedDict

import torch
from diffusers import ModelMixin, UNet2DConditionModel
from torch import nn


class UNetKwargs(TypedDict, total=False):
    """Keyword arguments an adapter adds to ``UNet2DConditionModel.forward``; the keys are its argument names, but
    for ``unet_forward`` (``UNET_FORWARD_KEY``), which only an adapter that runs the UNet itself gives
    (``ConditioningAdapter.runs_unet``): ``run_unet`` calls it in place of the UNet."""

    down_block_additional_residuals: list[torch.Tensor]
    mid_block_additional_residual: torch.Tensor
    down_intrablock_additional_residuals: list[torch.Tensor]
    cross_attention_kwargs: dict[str, Any]
    unet_forward: Callable[..., torch.Tensor]


# Checked by the tests: every UNetKwargs key must be a real argument of the UNet's forward (or UNET_FORWARD_KEY).
UNET_FORWARD_ARGUMENTS = frozenset(inspect.signature(UNet2DConditionModel.forward).parameters)
# The one UNetKwargs key that is not a UNet argument: a forward that replaces the UNet's (see run_unet).
UNET_FORWARD_KEY = "unet_forward"


def run_unet(
    unet: UNet2DConditionModel,
    sample: torch.Tensor,
    timestep: torch.Tensor | float | int,
    encoder_hidden_states: torch.Tensor,
    **unet_kwargs,
) -> torch.Tensor:
    """The UNet's prediction (B, C, h, w) for ``sample`` (B, C, h, w) under adapter kwargs: the training system and
    the sampler call the UNet through this, so an adapter decides how the UNet runs without either branching on it.

    Usually ``unet(sample, timestep, encoder_hidden_states, **unet_kwargs).sample``. When the kwargs hold
    ``unet_forward`` (an adapter with ``runs_unet``, e.g. ControlNet-XS, whose features are exchanged with the UNet's
    at every block), that callable runs instead, as ``unet_forward(unet, sample, timestep, encoder_hidden_states=...,
    **the other kwargs)``, and returns the prediction itself."""
    replacement = unet_kwargs.pop(UNET_FORWARD_KEY, None)
    if replacement is not None:
        return replacement(unet, sample, timestep, encoder_hidden_states=encoder_hidden_states, **unet_kwargs)
    return unet(sample, timestep, encoder_hidden_states=encoder_hidden_states, **unet_kwargs).sample


# The file in every saved adapter folder that names the adapter's family and class (adapters.registry reads it).
MARKER_NAME = "ctrlkit_adapter.json"
# family name -> adapter class; filled by ConditioningAdapter.__init_subclass__, read through adapters.registry
ADAPTER_FAMILIES: dict[str, type[ConditioningAdapter]] = {}


class AdapterFormatError(ValueError):
    """Saved adapter weights are missing or not in a format this adapter reads; the message names the path."""


def describe_unet(config) -> str:
    """A UNet layout in the words a pairing error needs: text width, extra conditioning, channels per level."""
    added = config.get("addition_embed_type") or "none"
    return (
        f"cross_attention_dim {config['cross_attention_dim']}, addition_embed_type {added}, "
        f"block_out_channels {list(config['block_out_channels'])}"
    )


def load_diffusers_folder(model_class, directory: str | Path):
    """``model_class.from_pretrained(directory)`` offline, with a one-line ``AdapterFormatError`` naming the folder
    (and the missing config.json, or the loader's first line) instead of diffusers' traceback."""
    directory = Path(directory)
    name = model_class.__name__
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise AdapterFormatError(f"{directory} is not a diffusers {name} folder: {config_file} not found")
    try:
        return model_class.from_pretrained(directory, local_files_only=True)
    except (OSError, ValueError, KeyError, RuntimeError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise AdapterFormatError(f"cannot load a {name} from {directory}: {first_line}") from error


class ConditioningAdapter(nn.Module, ABC):
    """An ``nn.Module`` built from a frozen UNet that turns a condition into UNet keyword arguments.

    The contract, checked for every adapter by tests/adapters/test_adapter_contract.py: ``from_unet`` builds it,
    ``forward`` returns UNet arguments, only its own parameters train, ``save_pretrained`` / ``from_pretrained``
    round-trip exactly, ``drop_condition`` gives the null condition. A subclass that sets ``family`` is registered
    under that name, and ``adapters.registry.load_adapter`` finds it from a saved folder's ``ctrlkit_adapter.json``.

    Class attributes:
        family: the registry name, written into every saved folder (None: an abstract or helper class).
        title: how logs and errors name it.
        accepts: the condition kind it consumes, ``"image"`` (a map) or ``"grounding"`` (boxes + phrases).
        zero_initialized: whether a freshly built adapter leaves the UNet output unchanged (the contract test
            holds it to that).
        changes_unet: whether building or loading it changes the shared UNet in place (GLIGEN adds gated layers);
            ``adapters.registry.load_adapters`` builds those after the adapters that copy or read the UNet, so the
            order units are given in does not matter.
        guidance_mode: how a sampler routes it under classifier-free guidance unless told otherwise
            (``adapters.composition`` modes): "balanced" (both halves, diffusers' ControlNet and T2I-Adapter
            pipelines) by default.
        weighs_residuals: whether what it gives the UNet is residuals, which a composition may scale, weigh by
            depth ("prompt" mode), restrict to a region, and compute for guidance's conditional half only (zeros
            for the other). True by default (ControlNet, T2I-Adapter); False for an adapter that enters the UNet
            some other way (GLIGEN's cross-attention kwargs): it is on or off, and under "control" mode it runs on
            both halves with the null condition (``drop_condition``) for the unconditional one.
        runs_unet: whether it runs the UNet itself instead of handing it arguments (ControlNet-XS: its control
            stream reads and writes the UNet's hidden states at every block, which no UNet argument expresses).
            Its ``forward`` returns ``{"unet_forward": f}`` and takes ``conditioning_scale``, a float or a (B,)
            tensor of per-item scales (0: that item runs without control, as the plain UNet); ``run_unet`` calls
            ``f`` in place of the UNet. A composition scales it through ``conditioning_scale`` and gives it the
            conditional half of guidance only under "control" mode (scale 0 for the other half); it has no
            residuals to weigh by depth or region, and one such unit composes with no other unit.
        reads_phrase_contexts: whether its grounding condition must carry ``phrase_contexts`` (each phrase encoded
            as a prompt; ``Backbone.embed_grounding``), which callers then ask the text encoder for. False by
            default; box-masked GLIGEN with regional prompts reads them.
    """

    family: ClassVar[str | None] = None
    title: ClassVar[str] = "adapter"
    accepts: ClassVar[Literal["image", "grounding"]]
    zero_initialized: ClassVar[bool]
    changes_unet: ClassVar[bool] = False
    guidance_mode: ClassVar[Literal["balanced", "prompt", "control"]] = "balanced"
    weighs_residuals: ClassVar[bool] = True
    runs_unet: ClassVar[bool] = False
    reads_phrase_contexts: bool = False
    # how the weights it was loaded from were stored; ``from_pretrained`` of a family with several formats sets it
    source_format: str = "ctrlkit adapter folder"

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        family = cls.__dict__.get("family")
        if family is not None:
            ADAPTER_FAMILIES[family] = cls  # a re-registration (a reloaded module, a test) replaces the old class

    @property
    def sampling_window(self) -> tuple[float, float]:
        """(start, end): the fraction of denoising steps the adapter runs in when a sampler is given no other window
        (GLIGEN's scheduled sampling ends early); all steps by default."""
        return (0.0, 1.0)

    @classmethod
    @abstractmethod
    def from_unet(cls, unet: UNet2DConditionModel, *, vae_scale_factor: int = 8, **options) -> ConditioningAdapter:
        """Build the adapter for ``unet``; ``vae_scale_factor`` is pixel size / latent size (1 in pixel space)."""

    @abstractmethod
    def forward(
        self,
        condition: Any,
        *,
        noisy_latents: torch.Tensor,
        timesteps: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        added_cond_kwargs: dict[str, torch.Tensor] | None = None,
    ) -> UNetKwargs:
        """condition: (B, C, H, W) in [0, 1] for image adapters, a ``GroundingCondition`` for grounding adapters, or
        what ``prepare`` returned for it; noisy_latents (B, 4, h, w); timesteps (B,) or scalar; encoder_hidden_states
        (B, L, D); added_cond_kwargs: the UNet's inputs beside the text (SDXL: ``text_embeds`` (B, P), ``time_ids``
        (B, 6)), passed only for UNets that take them -> keyword arguments for the UNet call."""

    def prepare(self, condition: Any) -> Any:
        """The step-independent work on a condition, done once per sampling run (T2I-Adapter's features do not
        depend on the timestep); ``forward`` accepts the result in place of ``condition``. Default: nothing to do.

        The result must be batched like the condition: a tensor, a list/tuple/dict of tensors, or a dataclass of
        them (the sampler stacks it twice for classifier-free guidance)."""
        return condition

    def drop_condition(self, condition: Any, dropped: torch.Tensor) -> Any:
        """``condition`` with the items where ``dropped`` (B,) bool is True replaced by the null condition
        (condition dropout in training). Default, for image conditions: an all-zero map, as CoAdapter drops one."""
        if not isinstance(condition, torch.Tensor):
            raise TypeError(f"{type(self).__name__} must override drop_condition for {type(condition).__name__}")
        keep = (~dropped).to(device=condition.device, dtype=condition.dtype)
        return condition * keep.view(-1, *([1] * (condition.ndim - 1)))

    def training_condition(self, condition: Any, generator: Any) -> Any:
        """The condition a training step trains on, after condition dropout: an adapter trained on varying views
        of its condition (a multi-condition ControlNet's random subsets of parts) draws them here from the step's
        ``generator`` (a ``torch.Generator``, or one per item). Default: the condition as it is, drawing nothing,
        so other adapters' runs draw what they always did."""
        return condition

    @classmethod
    @abstractmethod
    def from_pretrained(cls, path: str | Path, unet: UNet2DConditionModel) -> ConditioningAdapter:
        """The adapter saved at ``path`` by ``save_pretrained`` (or, for families that read them, a diffusers
        folder or an original single file), for ``unet``: the base model's UNet, which an adapter that changes the
        UNet (``changes_unet``) changes in place."""

    @classmethod
    def recognizes(cls, path: Path) -> bool:
        """Whether ``path`` holds this family's weights although it has no ``ctrlkit_adapter.json`` (a diffusers
        folder, an original single file, a folder saved before the marker existed); none by default."""
        return False

    @abstractmethod
    def save_weights(self, directory: Path) -> None:
        """Write the trainable weights into the existing ``directory``, in the format diffusers (and other tools)
        read."""

    def save_pretrained(self, directory: str | Path) -> None:
        """``save_weights`` into ``directory`` (created if needed), then the marker naming this adapter's family
        and class, so ``adapters.registry.load_adapter`` needs no guessing."""
        if self.family is None:
            raise TypeError(f"{type(self).__name__} sets no `family`, so a saved folder could not be loaded back")
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.save_weights(directory)
        module = type(self).__module__
        if module == "__main__":  # run as `python -m package.module`: the name another process can import
            spec = getattr(sys.modules["__main__"], "__spec__", None)
            module = spec.name if spec is not None else module
        marker = {"family": self.family, "class": f"{module}:{type(self).__qualname__}"}
        (directory / MARKER_NAME).write_text(json.dumps(marker, indent=2) + "\n")

    def load_saved_weights(self, path: Path, unet: UNet2DConditionModel) -> str:
        """Copy the trainable weights of this family's adapter saved at ``path`` into this one (``init_adapter=``: a
        run that fine-tunes saved weights) -> the format found. Each trainable tensor must be saved with its shape,
        unless it is one of ``unet``'s own (a UNet decoder this run unlocks: it starts from the base). Default: read
        with ``from_pretrained``; a family whose ``from_pretrained`` changes ``unet`` in place overrides this."""
        saved = type(self).from_pretrained(path, unet)
        saved_tensors = dict(saved.named_parameters())
        base = {tensor.data_ptr() for tensor in unet.parameters()}
        trainable = {name: tensor for name, tensor in self.named_parameters() if tensor.requires_grad}
        copied = {name: saved_tensors[name] for name in trainable if name in saved_tensors}
        missing = [name for name in trainable if name not in copied and trainable[name].data_ptr() not in base]
        extra = sorted(set(saved_tensors) - set(dict(self.named_parameters())))  # e.g. a decoder it trained
        check_saved_tensors(path, {name: trainable[name] for name in copied}, copied, missing, extra)
        with torch.no_grad():
            for name, tensor in copied.items():
                trainable[name].copy_(tensor)
        return saved.source_format

    def check_base(self, unet: UNet2DConditionModel) -> None:
        """Raise ``AdapterFormatError`` (one line, naming what the adapter was made for and what ``unet`` is) when
        the adapter was made for another UNet layout; ``adapters.registry`` calls it after every load. Nothing to
        check by default."""

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [parameter for parameter in self.parameters() if parameter.requires_grad]

    def param_groups(self, learning_rate: float) -> list[dict[str, Any]]:
        """Optimizer parameter groups; adapters with parts that train at another rate override this."""
        return [{"params": self.trainable_parameters(), "lr": learning_rate}]

    def enable_gradient_checkpointing(self) -> bool:
        """Recompute activations in the backward pass (less memory, ~30% more compute) in every diffusers model of
        the adapter that supports it; returns whether any does. Adapters whose layers live in the UNet (GLIGEN) are
        covered by the UNet's own checkpointing."""
        enabled = False
        for module in self.modules():
            if isinstance(module, ModelMixin):
                try:
                    module.enable_gradient_checkpointing()
                    enabled = True
                except ValueError:  # a diffusers model without checkpointing support (T2IAdapter): its own call
                    pass
        return enabled

    def training_scalars(self) -> dict[str, torch.Tensor]:
        """0-d tensors about the adapter's own state worth watching while it trains (logged as ``train/<name>``),
        e.g. how far GLIGEN's gates have opened; none by default. Tensors, not floats: they are computed every step,
        and a float would wait for the GPU each time, while Lightning reads them only when it writes its logs."""
        return {}


def check_saved_tensors(
    path: Path,
    built: dict[str, torch.Tensor],
    saved: dict[str, torch.Tensor],
    missing: list[str],
    extra: list[str] = (),
) -> None:
    """One-line ``AdapterFormatError`` when saved weights do not fit the built ones: tensors the built adapter
    trains that ``path`` lacks (``missing``), saved ones it has no place for (``extra``), or tensors saved with
    other shapes than ``built``'s."""
    reshaped = [
        f"{name} {tuple(saved[name].shape)} saved, {tuple(built[name].shape)} built"
        for name in built
        if saved[name].shape != built[name].shape
    ]
    problems = [
        f"{len(found)} {what}: " + ", ".join(found[:3]) + (", ..." if len(found) > 3 else "")
        for what, found in (("not saved", missing), ("saved but not built", extra), ("of other shapes", reshaped))
        if found
    ]
    if problems:
        raise AdapterFormatError(
            f"{path} does not fit the adapter this run builds: tensors {'; '.join(problems)}; compare the adapter's "
            "build settings (conditioning channels, rank, widths) with the saved ones"
        )
