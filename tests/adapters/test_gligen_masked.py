"""Box-masked GLIGEN: GLIGEN's weights at init, a visual token reads only the grounding tokens of boxes over its
cell, padded slots and null grounding, batch alignment under guidance and composition, save/load, `ctrlkit
generate`, and the experiment config training end to end."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel
from PIL import Image

from adapters import AdapterFormatError, ControlNetAdapter, GroundingCondition
from adapters.composition import Composition, ControlUnit
from adapters.gligen import GligenAdapter
from adapters.gligen_masked import (
    BoxedGroundingTokens,
    BoxMaskedGatedSelfAttention,
    BoxMaskedGligenAdapter,
)
from adapters.grounding import token_grid
from adapters.registry import load_adapter
from lightning_modules.backbone import build_tiny_backbone, load_tiny_backbone
from lightning_modules.commands.config_checks import check_train_config
from lightning_modules.commands.generate import run_generate
from lightning_modules.commands.train import train
from tests.adapters.test_adapters import randomize_zero_convs
from tests.lightning_modules.commands.test_generate import compose_generate

TOP_LEFT, BOTTOM_RIGHT = [0.0, 0.0, 0.5, 0.5], [0.5, 0.5, 1.0, 1.0]
# the bottom right quarter's right half: not symmetric under transposition, so rows and columns cannot swap unseen
RIGHT_EDGE = [0.75, 0.5, 1.0, 1.0]


def grounding(boxes: list[list[float]], slots: int = 30, batch: int = 2, seed: int = 0) -> GroundingCondition:
    """``boxes`` real in every image, the other slots padded with random boxes and phrases (as noise to ignore)."""
    generator = torch.Generator().manual_seed(seed)
    corners = torch.rand(batch, slots, 2, generator=generator) * 0.5
    padded_boxes = torch.cat([corners, corners + 0.5], dim=-1)
    padded_boxes[:, : len(boxes)] = torch.tensor(boxes)
    masks = torch.zeros(batch, slots)
    masks[:, : len(boxes)] = 1.0
    embeddings = torch.randn(batch, slots, 64, generator=generator)
    return GroundingCondition(boxes=padded_boxes, masks=masks, phrase_embeddings=embeddings)


def real_slots_only(condition: GroundingCondition, count: int) -> GroundingCondition:
    return GroundingCondition(
        boxes=condition.boxes[:, :count],
        masks=condition.masks[:, :count],
        phrase_embeddings=condition.phrase_embeddings[:, :count],
    )


def open_gates(adapter: GligenAdapter, seed: int = 1) -> None:
    """Gates open and null tokens moved off zero, as training leaves them; the attention's output widened so the
    grounding changes the output well beyond rounding."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for fuser in adapter.fusers:
            fuser.alpha_attn.fill_(1.5)
            fuser.alpha_dense.fill_(0.5)
            fuser.attn.to_out[0].weight.mul_(4.0)
        for null in (adapter.position_net.null_positive_feature, adapter.position_net.null_position_feature):
            null.copy_(torch.randn(null.shape, generator=generator))


def plain_gligen_with_the_same_weights(masked: BoxMaskedGligenAdapter) -> GligenAdapter:
    """Plain GLIGEN on a second copy of the same base UNet, loaded with the masked adapter's weights."""
    plain = GligenAdapter.from_unet(build_tiny_backbone(seed=0).unet)
    plain.unet.load_state_dict(masked.gligen_state_dict(), strict=False)
    return plain


def unet_output(adapter, condition=None, latent_size=(16, 16), seed=0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn(2, 4, *latent_size, generator=generator)
    states = torch.randn(2, 32, 64, generator=generator)
    kwargs = {}
    if condition is not None:
        kwargs = adapter(condition, noisy_latents=latents, timesteps=torch.tensor(400), encoder_hidden_states=states)
    with torch.no_grad():
        return adapter.unet(latents, 400, states, **kwargs).sample


def test_at_init_the_unet_is_unchanged_and_the_weights_are_gligens(tiny_backbone):
    generator = torch.Generator().manual_seed(0)
    latents, states = torch.randn(2, 4, 16, 16, generator=generator), torch.randn(2, 32, 64, generator=generator)
    with torch.no_grad():
        before = tiny_backbone.unet(latents, 400, states).sample
    adapter = BoxMaskedGligenAdapter.from_unet(tiny_backbone.unet)
    assert torch.equal(unet_output(adapter, grounding([TOP_LEFT])), before)
    plain = GligenAdapter.from_unet(build_tiny_backbone(seed=0).unet)
    ours, theirs = adapter.gligen_state_dict(), plain.gligen_state_dict()
    with pytest.raises(ValueError, match=r"GLIGEN layers are not those of BoxMaskedGligenAdapter"):
        BoxMaskedGligenAdapter(plain.unet)  # plain layers would run without the mask
    assert {name: t.shape for name, t in ours.items()} == {name: t.shape for name, t in theirs.items()}
    open_gates(adapter)  # the first check must be able to fail
    assert not torch.allclose(unet_output(adapter, grounding([TOP_LEFT])), before)


@pytest.mark.parametrize("latent_size", [(16, 16), (16, 24)])
def test_outside_every_box_a_visual_token_ignores_the_grounding(tiny_backbone, latent_size):
    adapter = BoxMaskedGligenAdapter.from_unet(tiny_backbone.unet)
    open_gates(adapter)
    calls = []
    hooks = [
        fuser.register_forward_hook(lambda module, args, _: calls.append((module, *args))) for fuser in adapter.fusers
    ]
    first = grounding([TOP_LEFT, RIGHT_EDGE])
    other_phrases = first.with_embeddings(first.phrase_embeddings + torch.randn(2, 30, 64))
    unet_output(adapter, first, latent_size)
    unet_output(adapter, other_phrases, latent_size)
    for hook in hooks:
        hook.remove()
    first_calls, other_calls = calls[: len(calls) // 2], calls[len(calls) // 2 :]
    height, width = latent_size
    token_counts = set()
    # each fuser on the same visual tokens with either grounding: every block, every resolution
    for (fuser, visual, tokens), (_, _, other_tokens) in zip(first_calls, other_calls, strict=True):
        with torch.no_grad():
            change = (fuser(visual, tokens) - fuser(visual, other_tokens)).abs().amax(-1)  # (B, n)
        stride = round((height * width / visual.shape[1]) ** 0.5)
        rows, cols = height // stride, width // stride
        change = change.reshape(2, rows, cols)
        inside = torch.zeros(rows, cols, dtype=torch.bool)
        inside[: rows // 2, : cols // 2] = True
        inside[rows // 2 :, 3 * cols // 4 :] = True  # the columns whose cells reach past x = 0.75
        assert change[:, ~inside].max() <= 1e-6, f"{rows}x{cols}: a token outside every box read a grounding token"
        assert change[:, inside].min() > 1e-4, f"{rows}x{cols}: a token inside a box ignored its phrase"
        token_counts.add(rows * cols)
    assert token_counts == {height * width, height * width // 4, height * width // 16}


def test_token_grid_follows_the_unets_rounding():
    assert token_grid((16, 24), 384) == (16, 24, 1) and token_grid((16, 24), 24) == (4, 6, 4)
    assert token_grid((10, 6), 15) == (5, 3, 2) and token_grid((10, 6), 6) == (3, 2, 4)  # ceil per level
    with pytest.raises(ValueError, match=r"7 visual tokens fit no grid of a 10x6 latent"):
        token_grid((10, 6), 7)


def test_padded_slots_are_read_by_no_visual_token(tiny_backbone):
    adapter = BoxMaskedGligenAdapter.from_unet(tiny_backbone.unet)
    open_gates(adapter)
    padded = grounding([TOP_LEFT, BOTTOM_RIGHT])  # 28 padded slots with boxes and phrases of their own
    torch.testing.assert_close(
        unet_output(adapter, padded), unet_output(adapter, real_slots_only(padded, 2)), rtol=0, atol=1e-5
    )
    # the comparison can fail: plain GLIGEN's visual tokens read the padded slots' null tokens
    plain = plain_gligen_with_the_same_weights(adapter)
    assert (unet_output(plain, padded) - unet_output(plain, real_slots_only(padded, 2))).abs().max() > 1e-3


def test_null_grounding_reads_the_visual_tokens_only(tiny_backbone):
    adapter = BoxMaskedGligenAdapter.from_unet(tiny_backbone.unet)
    open_gates(adapter)
    null = adapter.drop_condition(grounding([TOP_LEFT, BOTTOM_RIGHT]), torch.tensor([True, True]))
    ours = unet_output(adapter, null)
    assert torch.isfinite(ours).all()  # no softmax row is fully masked
    plain = plain_gligen_with_the_same_weights(adapter)
    # the gated self-attention over the visual tokens alone: plain GLIGEN given no grounding token at all
    torch.testing.assert_close(ours, unet_output(plain, real_slots_only(null, 0)), rtol=0, atol=1e-5)
    # not plain GLIGEN's null grounding, whose visual tokens read the learnt null tokens (the docstring's choice)
    assert (ours - unet_output(plain, null)).abs().max() > 1e-3


def test_guided_and_composed_rows_equal_single_calls(tiny_backbone):
    controlnet = ControlNetAdapter.from_unet(tiny_backbone.unet, vae_scale_factor=4)
    randomize_zero_convs(controlnet)
    adapter = BoxMaskedGligenAdapter.from_unet(tiny_backbone.unet)
    open_gates(adapter)
    generator = torch.Generator().manual_seed(2)
    edges = (torch.rand(2, 3, 64, 64, generator=generator) > 0.9).float()
    boxes = grounding([TOP_LEFT], batch=2)
    boxes.boxes[1, 0] = torch.tensor(BOTTOM_RIGHT)  # each image its own box
    latents = torch.randn(2, 4, 16, 16, generator=generator)
    prompts, empty = torch.randn(2, 32, 64, generator=generator), torch.randn(2, 32, 64, generator=generator)

    def run(edge_maps, condition, latent, states, guided):
        units = [ControlUnit(controlnet, edge_maps), ControlUnit(adapter, condition)]
        kwargs = Composition(units)(latent, torch.tensor(400), states, step_index=0, num_steps=1, guided=guided)
        with torch.no_grad():
            return tiny_backbone.unet(latent, 400, states, **kwargs).sample

    guided = run(edges, boxes, torch.cat([latents, latents]), torch.cat([empty, prompts]), guided=True)
    for item in range(2):
        one = boxes[item]
        latent, edge_map = latents[item : item + 1], edges[item : item + 1]
        conditional = run(edge_map, one, latent, prompts[item : item + 1], guided=False)
        null = adapter.drop_condition(one, torch.tensor([True]))
        unconditional = run(edge_map, null, latent, empty[item : item + 1], guided=False)
        torch.testing.assert_close(guided[2 + item], conditional[0], rtol=0, atol=1e-5)
        torch.testing.assert_close(guided[item], unconditional[0], rtol=0, atol=1e-5)
    # the rows can tell the images' boxes apart: image 0 with image 1's box is another result
    swapped = boxes[1]
    assert (run(edges[:1], swapped, latents[:1], prompts[:1], guided=False)[0] - guided[2]).abs().max() > 1e-3


def test_save_and_from_pretrained_round_trip(tiny_backbone, tmp_path):
    adapter = BoxMaskedGligenAdapter.from_unet(tiny_backbone.unet, scheduled_sampling_beta=0.5)
    open_gates(adapter)
    condition = grounding([TOP_LEFT, BOTTOM_RIGHT])
    expected = unet_output(adapter, condition)
    adapter.save_pretrained(tmp_path / "masked")
    folder = tmp_path / "masked"
    assert sorted(p.name for p in folder.iterdir()) == [
        "README.md",
        "ctrlkit_adapter.json",
        "gligen.safetensors",
        "gligen_config.json",
        "unet",
    ]
    assert json.loads((folder / "gligen_config.json").read_text())["variant"] == "gligen_masked"
    assert "without the box mask" in (folder / "README.md").read_text()
    loaded = BoxMaskedGligenAdapter.from_pretrained(folder, build_tiny_backbone(seed=0).unet)
    assert isinstance(loaded, BoxMaskedGligenAdapter) and loaded.scheduled_sampling_beta == 0.5
    assert torch.equal(unet_output(loaded, condition), expected)
    # a plain GLIGEN loader refuses it rather than dropping the mask, and the masked loader refuses plain folders
    with pytest.raises(
        AdapterFormatError, match=r"holds 'gligen_masked' GLIGEN weights; GligenAdapter loads 'gligen'"
    ):
        GligenAdapter.from_pretrained(folder, build_tiny_backbone(seed=0).unet)
    GligenAdapter.from_unet(build_tiny_backbone(seed=0).unet, export_unet=False).save_pretrained(tmp_path / "plain")
    assert json.loads((tmp_path / "plain" / "gligen_config.json").read_text())["variant"] == "gligen"
    with pytest.raises(AdapterFormatError, match=r"holds 'gligen' GLIGEN weights; BoxMaskedGligenAdapter loads"):
        BoxMaskedGligenAdapter.from_pretrained(tmp_path / "plain", build_tiny_backbone(seed=0).unet)
    # what the README says: diffusers loads unet/ as a plain gated UNet and runs it without the mask
    exported = UNet2DConditionModel.from_pretrained(folder / "unet")
    assert exported.config.attention_type == "gated"
    generator = torch.Generator().manual_seed(0)
    latents, states = torch.randn(2, 4, 16, 16, generator=generator), torch.randn(2, 32, 64, generator=generator)
    gligen = {
        "boxes": condition.boxes,
        "positive_embeddings": condition.phrase_embeddings,
        "masks": condition.masks,
    }
    with torch.no_grad():
        unmasked = exported(latents, 400, states, cross_attention_kwargs={"gligen": gligen}).sample
    assert (unmasked - expected).abs().max() > 1e-3


def test_ctrlkit_generate_runs_a_masked_unit(tmp_path):
    adapter = BoxMaskedGligenAdapter.from_unet(load_tiny_backbone().unet, export_unet=False)
    open_gates(adapter)
    adapter.save_pretrained(tmp_path / "masked")
    loaded, found = load_adapter(tmp_path / "masked", load_tiny_backbone().unet)
    assert isinstance(loaded, BoxMaskedGligenAdapter) and found == "box-masked GLIGEN, ctrlkit adapter folder"
    # the same weights saved as plain GLIGEN: generate must tell the two apart
    shutil.copytree(tmp_path / "masked", tmp_path / "plain")
    config = json.loads((tmp_path / "plain" / "gligen_config.json").read_text())
    (tmp_path / "plain" / "gligen_config.json").write_text(json.dumps({**config, "variant": "gligen"}))
    (tmp_path / "plain" / "ctrlkit_adapter.json").write_text(json.dumps({"family": "gligen"}))

    def generate(folder: Path) -> np.ndarray:
        unit = f"{{adapter: {folder}, boxes: [[0.1, 0.1, 0.6, 0.6]], phrases: [red circle]}}"
        cfg = compose_generate(tmp_path / f"out_{folder.name}", f"units=[{unit}]", "num_inference_steps=4")
        return np.asarray(Image.open(run_generate(cfg)[0])).astype(int)

    masked = generate(tmp_path / "masked")
    assert masked.shape == (64, 64, 3)
    assert np.abs(masked - generate(tmp_path / "plain")).max() > 0


def test_the_experiment_composes_and_trains_three_steps(make_train_config):
    cfg = make_train_config("experiment=gligen_masked_boxes_shapes")
    check_train_config(cfg)
    assert cfg.adapter.name == "gligen_masked" and cfg.condition.name == "boxes"
    assert 600 <= cfg.trainer.max_steps <= 800 and cfg.adapter.build.gate_learning_rate_scale == 10.0
    assert cfg.trainer.val_check_interval == cfg.callbacks.controllability.every_n_steps == 100
    metrics, objects = train(make_train_config("experiment=gligen_masked_boxes_shapes", "trainer.max_steps=3"))
    assert isinstance(objects["adapter"], BoxMaskedGligenAdapter)
    assert torch.isfinite(torch.tensor(metrics["train/loss"])) and objects["adapter"].gate_values()["attn"] > 0.0
    exported = Path(cfg.paths.output_dir) / "adapter"
    assert json.loads((exported / "gligen_config.json").read_text())["variant"] == "gligen_masked"
    assert (exported / "README.md").is_file()


@pytest.mark.parametrize("instance_attention", [False, True])
def test_instance_attention_keeps_a_boxed_token_to_its_own_boxes_tokens(instance_attention):
    fuser = BoxMaskedGatedSelfAttention(query_dim=8, context_dim=8, n_heads=2, d_head=4)
    with torch.no_grad():
        fuser.alpha_attn.fill_(1.0)
        fuser.alpha_dense.fill_(0.0)  # the attention alone: the feed-forward mixes no tokens anyway
    boxes = torch.tensor([[TOP_LEFT, BOTTOM_RIGHT]])
    objs = BoxedGroundingTokens(torch.randn(1, 2, 8), boxes, torch.ones(1, 2), (4, 4), instance_attention)
    x = torch.randn(1, 16, 8, generator=torch.Generator().manual_seed(0))
    changed = x.clone()
    bottom_right = torch.tensor([10, 11, 14, 15])  # the 4 x 4 grid's cells inside BOTTOM_RIGHT only
    changed[:, bottom_right] += torch.randn(1, 4, 8, generator=torch.Generator().manual_seed(1))  # not a shift:
    # the fuser's LayerNorm would remove one
    with torch.no_grad():
        before, after = fuser(x, objs), fuser(changed, objs)
    top_left, outside = torch.tensor([0, 1, 4, 5]), torch.tensor([2, 3, 6, 7, 8, 9, 12, 13])
    moved = (after - before)[0, top_left].abs().max()
    # with instance attention the top-left box's tokens read only each other (and their grounding token)
    assert (moved < 1e-6) if instance_attention else (moved > 1e-3)
    assert (after - before)[0, outside].abs().max() > 1e-3  # a token in no box still reads every visual token


def test_instance_attention_is_saved_and_loaded(tiny_backbone, tmp_path):
    adapter = BoxMaskedGligenAdapter.from_unet(tiny_backbone.unet, instance_attention=True, export_unet=False)
    open_gates(adapter)
    condition = grounding([TOP_LEFT, RIGHT_EDGE])
    expected = unet_output(adapter, condition)
    adapter.save_pretrained(tmp_path / "instance")
    loaded = BoxMaskedGligenAdapter.from_pretrained(tmp_path / "instance", build_tiny_backbone(seed=0).unet)
    assert loaded.instance_attention and torch.equal(unet_output(loaded, condition), expected)
    loaded.instance_attention = False  # the option changes the model: the comparison can fail
    assert (unet_output(loaded, condition) - expected).abs().max() > 1e-4
