"""GLIGEN: identity at init, only its layers train, weights round trip, the exported gated UNet is diffusers', null
grounding and scheduled sampling, and `ctrlkit train adapter=gligen condition=boxes` end to end."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, UNet2DConditionModel
from PIL import Image

from adapters import AdapterFormatError, GroundingCondition, sample_latents
from adapters.gligen import GligenAdapter, is_gligen_parameter
from conditions.boxes import BOX_COLOUR
from lightning_modules.backbone import build_tiny_backbone
from lightning_modules.commands.train import train


def grounding(batch=2, slots=30, width=64, seed=0) -> GroundingCondition:
    generator = torch.Generator().manual_seed(seed)
    corners = torch.rand(batch, slots, 2, generator=generator) * 0.5
    boxes = torch.cat([corners, corners + 0.2 + 0.3 * torch.rand(batch, slots, 2, generator=generator)], dim=-1)
    masks = torch.zeros(batch, slots)
    masks[:, :3] = 1.0
    embeddings = torch.randn(batch, slots, width, generator=generator)
    return GroundingCondition(boxes=boxes, masks=masks, phrase_embeddings=embeddings)


def unet_output(unet, adapter=None, condition=None, seed=0):
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn(2, 4, 16, 16, generator=generator)
    states = torch.randn(2, 32, 64, generator=generator)
    kwargs = {}
    if adapter is not None:
        kwargs = adapter(condition, noisy_latents=latents, timesteps=torch.tensor(400), encoder_hidden_states=states)
    with torch.no_grad():
        return unet(latents, 400, states, **kwargs).sample


def open_gates(adapter: GligenAdapter) -> None:
    """Move the gates and null tokens off their initial values, as training does."""
    torch.manual_seed(1)
    for fuser in adapter.fusers:
        fuser.alpha_attn.data.fill_(0.7)
        fuser.alpha_dense.data.fill_(-0.4)
    adapter.position_net.null_positive_feature.data.normal_()
    adapter.position_net.null_position_feature.data.normal_()


def test_gligen_at_init_leaves_the_unet_output_unchanged(tiny_backbone):
    before = unet_output(tiny_backbone.unet)
    adapter = GligenAdapter.from_unet(tiny_backbone.unet)
    assert len(adapter.fusers) == 7  # every transformer block: 2 down, 1 mid, 4 up
    assert torch.equal(unet_output(tiny_backbone.unet, adapter, grounding()), before)
    assert adapter.gate_values() == {"attn": 0.0, "dense": 0.0}
    open_gates(adapter)
    assert not torch.allclose(unet_output(tiny_backbone.unet, adapter, grounding()), before)


def test_only_the_gated_layers_and_the_position_net_train(tiny_backbone):
    adapter = GligenAdapter.from_unet(tiny_backbone.unet)
    trainable = {name for name, p in tiny_backbone.named_parameters() if p.requires_grad}
    assert trainable and all(is_gligen_parameter(name.removeprefix("unet.")) for name in trainable)
    assert {n for n in trainable if "position_net" in n} and {n for n in trainable if ".fuser.alpha_attn" in n}
    assert {id(p) for p in adapter.trainable_parameters()} == {
        id(p) for p in tiny_backbone.parameters() if p.requires_grad
    }
    # the adapter's own state holds GLIGEN's layers only, not the frozen UNet
    assert all(name.startswith(("fusers.", "position_net.")) for name in adapter.state_dict())


def test_gates_train_at_their_own_learning_rate(tiny_backbone):
    adapter = GligenAdapter.from_unet(tiny_backbone.unet, gate_learning_rate_scale=10.0)
    rest, gates = adapter.param_groups(1e-3)
    assert rest["lr"] == 1e-3 and gates["lr"] == pytest.approx(1e-2) and gates["weight_decay"] == 0.0
    names = {id(parameter): name for name, parameter in adapter.named_parameters()}
    assert len(gates["params"]) == 2 * len(adapter.fusers)
    assert all(names[id(p)].endswith(("alpha_attn", "alpha_dense")) for p in gates["params"])
    assert {id(p) for p in rest["params"] + gates["params"]} == {id(p) for p in adapter.trainable_parameters()}
    assert not {id(p) for p in rest["params"]} & {id(p) for p in gates["params"]}
    with pytest.raises(ValueError, match="gate_learning_rate_scale must be > 0"):
        GligenAdapter(tiny_backbone.unet, gate_learning_rate_scale=0.0)


def test_adapter_only_weights_round_trip(tiny_backbone, tmp_path):
    adapter = GligenAdapter.from_unet(tiny_backbone.unet, scheduled_sampling_beta=0.5)
    open_gates(adapter)
    expected = unet_output(tiny_backbone.unet, adapter, grounding())
    adapter.export_unet = False
    adapter.save_pretrained(tmp_path / "gligen")
    assert sorted(p.name for p in (tmp_path / "gligen").iterdir()) == [
        "ctrlkit_adapter.json",
        "gligen.safetensors",
        "gligen_config.json",
    ]
    fresh = build_tiny_backbone(seed=0)  # the same base weights, without GLIGEN layers
    loaded = GligenAdapter.from_pretrained(tmp_path / "gligen", fresh.unet)
    assert loaded.scheduled_sampling_beta == 0.5
    assert torch.equal(unet_output(fresh.unet, loaded, grounding()), expected)


def test_weights_for_another_unet_are_refused(tiny_backbone, tmp_path):
    GligenAdapter.from_unet(tiny_backbone.unet, export_unet=False).save_pretrained(tmp_path / "gligen")
    other = UNet2DConditionModel(
        sample_size=8,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=64,
        attention_head_dim=8,
    )
    with pytest.raises(AdapterFormatError, match=r"gligen.safetensors does not fit this UNet: \d+ missing keys"):
        GligenAdapter.from_pretrained(tmp_path / "gligen", other)
    with pytest.raises(AdapterFormatError, match=r"is not a ctrlkit GLIGEN folder: gligen.safetensors not found"):
        GligenAdapter.from_pretrained(tmp_path, build_tiny_backbone().unet)


def test_exported_unet_loads_in_diffusers_gated_and_matches_ours(tiny_backbone, tmp_path):
    adapter = GligenAdapter.from_unet(tiny_backbone.unet)
    open_gates(adapter)
    condition = grounding(seed=3)
    ours = unet_output(tiny_backbone.unet, adapter, condition)
    adapter.save_pretrained(tmp_path / "gligen")
    exported = UNet2DConditionModel.from_pretrained(tmp_path / "gligen" / "unet")
    assert exported.config.attention_type == "gated"
    gligen = {
        "boxes": condition.boxes,
        "positive_embeddings": condition.phrase_embeddings,
        "masks": condition.masks,
    }
    generator = torch.Generator().manual_seed(0)
    latents, states = torch.randn(2, 4, 16, 16, generator=generator), torch.randn(2, 32, 64, generator=generator)
    with torch.no_grad():
        theirs = exported(latents, 400, states, cross_attention_kwargs={"gligen": gligen}).sample
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-6)


def test_null_grounding_is_every_slot_empty(tiny_backbone):
    adapter = GligenAdapter.from_unet(tiny_backbone.unet)
    open_gates(adapter)
    condition = grounding()
    dropped = adapter.drop_condition(condition, torch.tensor([True, False]))
    assert dropped.masks[0].sum() == 0 and torch.equal(dropped.masks[1], condition.masks[1])
    empty = dataclasses.replace(condition, masks=torch.zeros_like(condition.masks))
    # an empty slot is the learnt null tokens whatever its box and phrase say
    moved = dataclasses.replace(empty, boxes=torch.rand_like(empty.boxes), phrase_embeddings=torch.randn(2, 30, 64))
    unet = tiny_backbone.unet
    torch.testing.assert_close(unet_output(unet, adapter, empty), unet_output(unet, adapter, moved))


def test_bad_grounding_is_named(tiny_backbone):
    adapter = GligenAdapter.from_unet(tiny_backbone.unet, max_objects=4)
    with pytest.raises(ValueError, match=r"30 grounding slots; GLIGEN takes at most max_objects=4"):
        unet_output(tiny_backbone.unet, adapter, grounding())
    with pytest.raises(ValueError, match=r"phrase embeddings are 32-dimensional; .* takes 64"):
        unet_output(tiny_backbone.unet, adapter, grounding(slots=4, width=32))
    with pytest.raises(ValueError, match=r"already has GLIGEN layers"):
        GligenAdapter.from_unet(tiny_backbone.unet)


def test_scheduled_sampling_grounds_the_first_beta_of_the_steps(tiny_backbone):
    adapter = GligenAdapter.from_unet(tiny_backbone.unet, scheduled_sampling_beta=0.3)
    assert adapter.sampling_window == (0.0, 0.3)
    calls = []
    adapter.register_forward_pre_hook(lambda *_: calls.append(1))
    states = torch.randn(2, 32, 64)
    sample_latents(
        tiny_backbone.unet,
        DDIMScheduler(num_train_timesteps=100),
        states,
        (2, 4, 16, 16),
        adapter=adapter,
        condition=grounding(),
        uncond_hidden_states=torch.zeros_like(states),
        guidance_scale=3.0,
        num_inference_steps=10,
    )
    assert len(calls) == 3  # diffusers: int(beta * steps) grounded steps, then the plain UNet


def test_ctrlkit_train_gligen_on_boxes_end_to_end(make_train_config):
    cfg = make_train_config("adapter=gligen", "condition=boxes", "trainer.max_steps=2")
    assert list(cfg.data.num_objects) == [1, 3] and cfg.callbacks.controllability.jump_metric == "box_iou"
    metrics, objects = train(cfg)
    run = Path(cfg.paths.output_dir)
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))
    # one step moves the gates off zero; how far they are open is logged
    assert objects["adapter"].gate_values()["attn"] > 0.0
    assert 0.0 <= metrics["train/gate_attn"] <= 1.0 and 0.0 <= metrics["train/gate_dense"] <= 1.0
    # exported: adapter-only weights, and the gated UNet that diffusers loads
    assert (run / "adapter" / "gligen.safetensors").is_file()
    assert UNet2DConditionModel.from_pretrained(run / "adapter" / "unet").config.attention_type == "gated"
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert checkpoint["state_dict"] and all(n.startswith("adapter.") for n in checkpoint["state_dict"])
    # the grid draws the boxes: magenta outlines
    grid = np.asarray(Image.open(run / "samples" / "step_000002.png").convert("RGB"))
    assert grid.shape[:2] == (2 * 64 + 3 * 2, 3 * 64 + 4 * 2)
    assert (grid == np.array(BOX_COLOUR, dtype=np.uint8)).all(-1).sum() > 20
    controllability = json.loads((run / "controllability.json").read_text())
    assert controllability["jump_metric"] == "box_iou" and "box_iou" in controllability["base_without_adapter"]
    assert 0.0 <= controllability["final"]["box_iou"] <= 1.0
    assert controllability["dataset_images"]["box_iou"] > 0.5  # the scenes' own images score high
