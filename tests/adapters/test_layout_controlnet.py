"""The layout ControlNet (adapters/layout_controlnet.py): the map it draws from boxes + phrases (each box's
projected phrase, the later slot in front, box count, outlines; empty slots and dropped items draw nothing), its
gradient reaching the projection, its saved folder, and one-line errors for a wrong condition."""

from __future__ import annotations

import pytest
import torch

from adapters.grounding import GroundingCondition
from adapters.layout_controlnet import LayoutControlNetAdapter
from adapters.registry import load_adapter
from lightning_modules.backbone import build_tiny_backbone

SIZE = (32, 32)


def build() -> LayoutControlNetAdapter:
    return LayoutControlNetAdapter.from_unet(build_tiny_backbone().unet, vae_scale_factor=4, embedding_channels=3)


def two_boxes(dim: int) -> GroundingCondition:
    """Box 0 the left half, box 1 the top half (they overlap in the top-left quarter), slot 2 empty."""
    boxes = torch.tensor([[[0.0, 0.0, 0.5, 1.0], [0.0, 0.0, 1.0, 0.5], [0.5, 0.5, 1.0, 1.0]]])
    embeddings = torch.randn(1, 3, dim, generator=torch.Generator().manual_seed(0))
    return GroundingCondition(boxes=boxes, masks=torch.tensor([[1.0, 1.0, 0.0]]), phrase_embeddings=embeddings)


def test_the_map_holds_each_boxs_projected_phrase_with_the_later_slot_in_front():
    adapter = build()
    condition = two_boxes(adapter.projection.in_features)
    projected = adapter.projection(condition.phrase_embeddings)[0].detach()  # (3, C)
    layout = adapter.layout_map(condition, SIZE)[0].detach()
    assert layout.shape == (3 + 2, *SIZE)
    embedding, count, outlines = layout[:3], layout[3], layout[4]
    torch.testing.assert_close(embedding[:, 24, 8], projected[0])  # bottom-left: box 0 only
    torch.testing.assert_close(embedding[:, 8, 24], projected[1])  # top-right: box 1 only
    torch.testing.assert_close(embedding[:, 8, 8], projected[1])  # both: the later slot in front
    assert embedding[:, 24, 24].abs().sum() == 0  # bottom-right: only the empty slot's box, which draws nothing
    assert (count[8, 8], count[24, 8], count[8, 24], count[24, 24]) == (2, 1, 1, 0)
    assert outlines[0, 0] == 1 and outlines[31, 0] == 1 and outlines[15, 20] == 1  # borders of boxes 0 and 1
    assert outlines[24, 8] == 0 and outlines[24, 24] == 0  # inside box 0; the empty slot's border


def test_dropped_items_draw_an_empty_map_and_the_projection_learns():
    adapter = build()
    condition = two_boxes(adapter.projection.in_features)
    dropped = adapter.drop_condition(condition, torch.tensor([True]))
    assert adapter.layout_map(dropped, SIZE).abs().sum() == 0
    adapter.layout_map(condition, SIZE)[:, :3].sum().backward()
    assert adapter.projection.weight.grad is not None and adapter.projection.weight.grad.abs().sum() > 0


def test_saved_folder_loads_back_with_the_same_projection(tmp_path):
    adapter = build()
    with torch.no_grad():
        adapter.projection.weight.add_(1.0)
    adapter.save_pretrained(tmp_path / "layout")
    assert (tmp_path / "layout" / "config.json").is_file()  # the ControlNet is a diffusers folder
    loaded, _ = load_adapter(tmp_path / "layout", build_tiny_backbone().unet)
    assert isinstance(loaded, LayoutControlNetAdapter)
    torch.testing.assert_close(loaded.projection.weight, adapter.projection.weight)
    assert loaded.max_objects == adapter.max_objects == 30
    condition = two_boxes(adapter.projection.in_features)
    torch.testing.assert_close(loaded.layout_map(condition, SIZE), adapter.layout_map(condition, SIZE))


def test_a_condition_it_cannot_draw_is_a_one_line_error():
    adapter = build()
    with pytest.raises(ValueError, match="takes a GroundingCondition"):
        adapter.layout_map(torch.zeros(1, 3, *SIZE), SIZE)
    with pytest.raises(ValueError, match="phrase embeddings are 5-dimensional"):
        adapter.layout_map(two_boxes(5), SIZE)


def test_an_unlocked_decoder_trains_at_its_own_rate_and_loads_back_into_the_unet(tmp_path):
    unet = build_tiny_backbone().unet
    adapter = LayoutControlNetAdapter.from_unet(
        unet, vae_scale_factor=4, embedding_channels=3, unlock_unet_decoder=True, decoder_learning_rate=1e-4
    )
    groups = adapter.param_groups(1e-3)
    grouped = {id(parameter): group["lr"] for group in groups for parameter in group["params"]}
    assert grouped[id(adapter.projection.weight)] == 1e-3
    assert grouped[id(unet.conv_out.weight)] == 1e-4  # the decoder is the UNet's own, trained in place
    assert set(grouped) == {id(parameter) for parameter in adapter.trainable_parameters()}
    with torch.no_grad():
        unet.conv_out.weight.add_(1.0)
    adapter.save_pretrained(tmp_path / "layout")
    fresh = build_tiny_backbone().unet
    loaded, _ = load_adapter(tmp_path / "layout", fresh)
    assert loaded.unet_decoder is not None
    torch.testing.assert_close(fresh.conv_out.weight, unet.conv_out.weight)


def test_by_default_guidance_gives_the_layout_to_the_conditional_half_only():
    """Its guidance_mode is "control": with no mode, a unit's unconditional half gets no residual."""
    from adapters.composition import Composition, ControlUnit
    from tests.adapters.test_adapters import randomize_zero_convs

    backbone = build_tiny_backbone()
    adapter = LayoutControlNetAdapter.from_unet(backbone.unet, vae_scale_factor=4, embedding_channels=3)
    randomize_zero_convs(adapter)  # zero convolutions would give zeros on both halves
    condition = two_boxes(backbone.unet.config.cross_attention_dim)
    unit = ControlUnit(adapter, condition)
    assert unit.mode == "control"
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    hidden = torch.randn(2, 4, backbone.unet.config.cross_attention_dim)
    with torch.no_grad():
        kwargs = Composition([unit])(latents, torch.tensor(500), hidden, step_index=0, num_steps=1, guided=True)
    mid = kwargs["mid_block_additional_residual"]
    assert torch.count_nonzero(mid[:1]) == 0 and torch.count_nonzero(mid[1:]) > 0
