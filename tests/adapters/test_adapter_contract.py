"""The adapter contract, held for every adapter: one parameter per adapter family.

A new adapter needs one file in ``adapters/``, one yaml in ``conf/adapter/`` and one entry in ``ADAPTERS`` here.
``ConvIdentityAdapter`` below shows it end to end: defined outside the package, it registers itself, trains, is
exported, and ``ctrlkit generate`` loads it from its folder with no edit to ``lightning_modules/``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

from adapters.base import (
    MARKER_NAME,
    UNET_FORWARD_ARGUMENTS,
    UNET_FORWARD_KEY,
    ConditioningAdapter,
    UNetKwargs,
    run_unet,
)
from adapters.control_lora import ControlLoraAdapter
from adapters.controlnet import ControlNetAdapter
from adapters.controlnet_xs import ControlNetXS
from adapters.gligen import GligenAdapter
from adapters.gligen_masked import BoxMaskedGligenAdapter
from adapters.grounding import GroundingCondition
from adapters.layout_controlnet import LayoutControlNetAdapter
from adapters.multi_condition import MultiConditionControlNetAdapter
from adapters.registry import (
    adapter_class_for,
    adapter_families,
    initialize_from_saved,
    load_adapter,
    load_adapters,
)
from adapters.t2i_adapter import T2IAdapterAdapter
from lightning_modules.backbone import build_tiny_backbone
from lightning_modules.commands.train import train

REPO = Path(__file__).resolve().parents[2]


class ConvIdentityAdapter(ConditioningAdapter):
    """The smallest adapter: the condition, average-pooled to the latent size, through one zero-initialised 1x1
    convolution, added inside the UNet's first down block (a one-level T2I-Adapter)."""

    family = "test_conv_identity"
    title = "1x1-conv test adapter"
    accepts = "image"
    zero_initialized = True

    def __init__(self, conditioning_channels: int, out_channels: int, vae_scale_factor: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(conditioning_channels, out_channels, kernel_size=1)
        nn.init.zeros_(self.conv.weight)
        nn.init.zeros_(self.conv.bias)
        self.vae_scale_factor = vae_scale_factor

    @classmethod
    def from_unet(
        cls, unet: UNet2DConditionModel, *, vae_scale_factor: int = 8, conditioning_channels: int = 3
    ) -> ConvIdentityAdapter:
        return cls(conditioning_channels, unet.config.block_out_channels[0], vae_scale_factor)

    @property
    def condition_channels(self) -> int:
        return self.conv.in_channels

    def forward(self, condition, *, noisy_latents, timesteps, encoder_hidden_states) -> UNetKwargs:
        pooled = F.avg_pool2d(condition.to(noisy_latents.dtype), self.vae_scale_factor)
        return {"down_intrablock_additional_residuals": [self.conv(pooled)]}

    def save_weights(self, directory: Path) -> None:
        save_file(self.conv.state_dict(), str(directory / "conv.safetensors"))
        config = {"conditioning_channels": self.conv.in_channels, "out_channels": self.conv.out_channels}
        (directory / "conv_config.json").write_text(json.dumps({**config, "vae_scale_factor": self.vae_scale_factor}))

    @classmethod
    def from_pretrained(cls, path, unet=None) -> ConvIdentityAdapter:
        adapter = cls(**json.loads((Path(path) / "conv_config.json").read_text()))
        adapter.conv.load_state_dict(load_file(str(Path(path) / "conv.safetensors")))
        return adapter


def image_condition(batch: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(batch, 3, 64, 64, generator=torch.Generator().manual_seed(seed))


def multi_condition(batch: int, seed: int = 0) -> torch.Tensor:
    """Two parts (1 and 2 channels) with their presence planes set: the layout of ``conditions.multi``."""
    return torch.cat([image_condition(batch, seed), torch.ones(batch, 2, 64, 64)], dim=1)


def grounding_condition(batch: int, seed: int = 0) -> GroundingCondition:
    generator = torch.Generator().manual_seed(seed)
    corners = torch.rand(batch, 4, 2, generator=generator) * 0.5
    boxes = torch.cat([corners, corners + 0.2 + 0.3 * torch.rand(batch, 4, 2, generator=generator)], dim=-1)
    masks = torch.tensor([[1.0, 1.0, 0.0, 0.0]]).repeat(batch, 1)
    embeddings = torch.randn(batch, 4, 64, generator=generator)
    return GroundingCondition(boxes=boxes, masks=masks, phrase_embeddings=embeddings)


# family -> (build from a UNet, a condition for a batch)
ADAPTERS: dict[str, tuple[Callable, Callable]] = {
    "control_lora": (lambda unet: ControlLoraAdapter.from_unet(unet, vae_scale_factor=4), image_condition),
    "controlnet": (lambda unet: ControlNetAdapter.from_unet(unet, vae_scale_factor=4), image_condition),
    "controlnet_multi": (
        lambda unet: MultiConditionControlNetAdapter.from_unet(
            unet, vae_scale_factor=4, part_names=["edges", "depth"], part_channels=[1, 2]
        ),
        multi_condition,
    ),
    "controlnet_xs": (lambda unet: ControlNetXS.from_unet(unet, vae_scale_factor=4, size_ratio=0.5), image_condition),
    "t2i_adapter": (lambda unet: T2IAdapterAdapter.from_unet(unet, vae_scale_factor=4), image_condition),
    "gligen": (lambda unet: GligenAdapter.from_unet(unet, max_objects=4, export_unet=False), grounding_condition),
    "gligen_masked": (
        lambda unet: BoxMaskedGligenAdapter.from_unet(unet, max_objects=4, export_unet=False),
        grounding_condition,
    ),
    "layout_controlnet": (
        lambda unet: LayoutControlNetAdapter.from_unet(unet, vae_scale_factor=4, embedding_channels=4),
        grounding_condition,
    ),
    "test_conv_identity": (lambda unet: ConvIdentityAdapter.from_unet(unet, vae_scale_factor=4), image_condition),
}


def test_every_registered_family_is_a_parameter_here():
    assert set(adapter_families()) == set(ADAPTERS)


def unet_inputs(batch: int = 2, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    return {
        "noisy_latents": torch.randn(batch, 4, 16, 16, generator=generator),
        "timesteps": torch.randint(100, 900, (batch,), generator=generator),
        "encoder_hidden_states": torch.randn(batch, 32, 64, generator=generator),
    }


def unet_output(unet, adapter=None, condition=None, inputs=None) -> torch.Tensor:
    inputs = inputs or unet_inputs()
    kwargs = {} if adapter is None else adapter(condition, **inputs)
    with torch.no_grad():
        return run_unet(unet, inputs["noisy_latents"], inputs["timesteps"], inputs["encoder_hidden_states"], **kwargs)


def perturb(adapter: ConditioningAdapter, seed: int = 1) -> None:
    """Move every trainable weight off its initial value, as training does (zero convolutions, gates)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in adapter.trainable_parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.05)


def assert_conditions_equal(first, second) -> None:
    """Tensors, or the tensors of two GroundingConditions, equal."""
    if isinstance(first, torch.Tensor):
        assert torch.equal(first, second)
    else:
        for name in ("boxes", "masks", "phrase_embeddings"):
            assert torch.equal(getattr(first, name), getattr(second, name))


def rows(condition, index: int):
    return condition[index : index + 1]


@pytest.fixture(params=sorted(ADAPTERS))
def family(request) -> str:
    return request.param


def test_returned_keys_are_unet_arguments(family):
    build, make_condition = ADAPTERS[family]
    adapter = build(build_tiny_backbone().unet)
    kwargs = adapter(make_condition(2), **unet_inputs())
    # an adapter that runs the UNet itself gives the forward that replaces the UNet's (run_unet calls it)
    allowed = UNET_FORWARD_ARGUMENTS | ({UNET_FORWARD_KEY} if adapter.runs_unet else set())
    assert kwargs and set(kwargs) <= allowed


def test_zero_initialised_adapters_leave_the_unet_output_unchanged(family):
    build, make_condition = ADAPTERS[family]
    unet = build_tiny_backbone().unet
    before = unet_output(unet)
    adapter = build(unet)
    assert adapter.zero_initialized == (family != "t2i_adapter")  # T2I-Adapter's features are not zero at init
    after = unet_output(unet, adapter, make_condition(2))
    assert torch.equal(after, before) == adapter.zero_initialized
    perturb(adapter)
    assert not torch.allclose(unet_output(unet, adapter, make_condition(2)), before)


def test_only_adapter_parameters_train(family):
    backbone = build_tiny_backbone()
    adapter = ADAPTERS[family][0](backbone.unet)
    trainable = {id(parameter) for parameter in adapter.trainable_parameters()}
    assert trainable
    # parameters that train in the backbone (GLIGEN's layers live in the UNet) are the adapter's, and only those
    assert {id(p) for p in backbone.parameters() if p.requires_grad} <= trainable
    assert {id(p) for p in adapter.parameters() if p.requires_grad} == trainable
    grouped = [id(parameter) for group in adapter.param_groups(1e-4) for parameter in group["params"]]
    assert sorted(grouped) == sorted(trainable)


def save_perturbed(family, folder):
    """Build ``family`` on a tiny UNet, move every weight off its init, save it to ``folder``.

    Returns the saved adapter and the UNet's output with it (the reference a loaded copy must give)."""
    build, make_condition = ADAPTERS[family]
    unet = build_tiny_backbone().unet
    adapter = build(unet)
    perturb(adapter)
    expected = unet_output(unet, adapter, make_condition(2))
    adapter.save_pretrained(folder)
    return adapter, expected


def test_save_and_load_round_trip_exactly(family, tmp_path):
    make_condition = ADAPTERS[family][1]
    adapter, expected = save_perturbed(family, tmp_path / "saved")
    marker = json.loads((tmp_path / "saved" / MARKER_NAME).read_text())
    assert marker["family"] == family and marker["class"].endswith(type(adapter).__qualname__)

    fresh_unet = build_tiny_backbone().unet
    loaded, found = load_adapter(tmp_path / "saved", fresh_unet)
    assert type(loaded) is type(adapter) and found.startswith(type(adapter).title)
    assert torch.equal(unet_output(fresh_unet, loaded, make_condition(2)), expected)


def test_a_fresh_build_starts_from_saved_weights(family, tmp_path):
    """``init_adapter=``: the adapter a run builds from config takes a saved one's trained weights, in place."""
    build, make_condition = ADAPTERS[family]
    adapter, expected = save_perturbed(family, tmp_path / "saved")

    fresh_unet = build_tiny_backbone().unet
    fresh = build(fresh_unet)
    found = initialize_from_saved(fresh, tmp_path / "saved", fresh_unet)
    assert found.startswith(type(adapter).title)
    assert torch.equal(unet_output(fresh_unet, fresh, make_condition(2)), expected)


def test_null_condition_is_what_drop_condition_gives(family):
    build, make_condition = ADAPTERS[family]
    unet = build_tiny_backbone().unet
    adapter = build(unet)
    condition = make_condition(3)
    assert_conditions_equal(adapter.drop_condition(condition, torch.zeros(3, dtype=torch.bool)), condition)
    null = adapter.drop_condition(condition, torch.ones(3, dtype=torch.bool))
    mixed = adapter.drop_condition(condition, torch.tensor([True, False, True]))
    for index, source in ((0, null), (1, condition), (2, null)):
        assert_conditions_equal(rows(mixed, index), rows(source, index))
    # the null condition carries nothing of the condition it replaced
    perturb(adapter)
    other_null = adapter.drop_condition(make_condition(3, seed=5), torch.ones(3, dtype=torch.bool))
    inputs = unet_inputs(3)
    inputs["timesteps"] = torch.tensor([100, 400, 700])
    null_output = unet_output(unet, adapter, null, inputs)
    assert torch.allclose(null_output, unet_output(unet, adapter, other_null, inputs), atol=1e-6)
    assert not torch.allclose(null_output, unet_output(unet, adapter, condition, inputs), atol=1e-4)


def test_load_order_does_not_matter(tmp_path):
    """A GLIGEN unit changes the shared UNet; a ControlNet is built from it: given in either order, the same."""
    unet = build_tiny_backbone().unet
    ControlNetAdapter.from_unet(unet, vae_scale_factor=4).save_pretrained(tmp_path / "controlnet")
    gligen = GligenAdapter.from_unet(build_tiny_backbone().unet, max_objects=4, export_unet=False)
    perturb(gligen)
    gligen.save_pretrained(tmp_path / "gligen")
    first = load_adapters([tmp_path / "gligen", tmp_path / "controlnet"], build_tiny_backbone().unet)
    second = load_adapters([tmp_path / "controlnet", tmp_path / "gligen"], build_tiny_backbone().unet)
    assert [type(adapter) for adapter, _ in first] == [GligenAdapter, ControlNetAdapter]
    for (one, _), (two, _) in zip(first, reversed(second)):
        assert all(torch.equal(a, b) for a, b in zip(one.state_dict().values(), two.state_dict().values()))


def test_folders_without_a_marker_are_recognised_by_their_family(tmp_path):
    unet = build_tiny_backbone().unet
    for family in ("controlnet", "controlnet_xs", "t2i_adapter", "gligen"):
        adapter = ADAPTERS[family][0](build_tiny_backbone().unet if family == "gligen" else unet)
        adapter.save_pretrained(tmp_path / family)
        (tmp_path / family / MARKER_NAME).unlink()  # as diffusers, TencentARC or an older ctrlkit wrote it
        assert adapter_class_for(tmp_path / family) is type(adapter)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("no weights")
    with pytest.raises(ValueError, match=r"other holds no adapter ctrlkit can read: no ctrlkit_adapter.json"):
        adapter_class_for(tmp_path / "other")


ADAPTER_YAML = f"""\
name: conv_identity
accepts: image
learning_rate: ${{recipe.adapter_learning_rate}}
condition_dropout: {{text: 0.5, condition: 0.0, both: 0.0}}
build:
  _target_: {__name__}.ConvIdentityAdapter.from_unet
  _partial_: true
  conditioning_channels: ${{condition.channels}}
"""


def test_a_new_adapter_trains_exports_and_generates_without_editing_lightning_modules(make_train_config, tmp_path):
    # the adapter's one yaml, as conf/adapter/<name>.yaml would hold it, in a config folder of the user's own
    (tmp_path / "conf" / "adapter").mkdir(parents=True)
    (tmp_path / "conf" / "adapter" / "conv_identity.yaml").write_text(ADAPTER_YAML)
    cfg = make_train_config(
        f"hydra.searchpath=[file://{tmp_path / 'conf'}]", "adapter=conv_identity", "trainer.max_steps=5"
    )
    metrics, objects = train(cfg)
    assert isinstance(objects["system"].adapter, ConvIdentityAdapter)
    exported = Path(cfg.paths.output_dir) / "adapter"
    assert json.loads((exported / MARKER_NAME).read_text())["family"] == "test_conv_identity"
    trained = load_file(str(exported / "conv.safetensors"))["weight"]
    assert trained.abs().sum() > 0  # five steps moved the zero convolution

    Image.fromarray(np.full((64, 64, 3), 255, np.uint8)).save(tmp_path / "white.png")
    unit = f"{{adapter: {exported}, condition_image: {tmp_path / 'white.png'}}}"
    done = subprocess.run(
        [sys.executable, "-m", "lightning_modules.commands.cli", "generate", f"units=[{unit}]"]
        + ["num_inference_steps=2", f"hydra.run.dir={tmp_path / 'generated'}"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,  # so the test module named in the marker imports
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "generated" / "image_000.png").is_file()
    assert "1x1-conv test adapter, ctrlkit adapter folder" in done.stderr + done.stdout


def test_a_broken_marker_is_a_one_line_error_naming_the_file(tmp_path):
    from adapters.base import AdapterFormatError

    (tmp_path / "garbled").mkdir()
    (tmp_path / "garbled" / MARKER_NAME).write_text("{not json")
    with pytest.raises(AdapterFormatError, match=r"garbled/ctrlkit_adapter.json is not readable JSON"):
        load_adapter(tmp_path / "garbled", build_tiny_backbone().unet)
    (tmp_path / "gone").mkdir()
    (tmp_path / "gone" / MARKER_NAME).write_text(json.dumps({"family": "gone", "class": "no_such_module:Adapter"}))
    with pytest.raises(AdapterFormatError, match=r"names class no_such_module:Adapter, which cannot be imported"):
        load_adapter(tmp_path / "gone", build_tiny_backbone().unet)
    with pytest.raises(AdapterFormatError, match=r"adapter .*absent not found"):
        load_adapter(tmp_path / "absent", build_tiny_backbone().unet)
