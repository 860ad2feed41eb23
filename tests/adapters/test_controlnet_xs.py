"""ControlNet-XS: sampling equal to diffusers' ``StableDiffusionControlNetXSPipeline`` (on a tiny SD 2.x-layout
pipeline: diffusers builds ControlNet-XS for two layers per block), the UNet run through ``run_unet`` without a
branch on the adapter, guidance routing, composition limits, and the shipped tiny model's one-layer layout."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import ControlNetXSAdapter, StableDiffusionControlNetXSPipeline, UNetControlNetXSModel
from PIL import Image

from adapters import ControlNetAdapter, make_scheduler, sample_latents
from adapters.base import AdapterFormatError, run_unet
from adapters.composition import Composition, ControlUnit
from adapters.controlnet_xs import ControlNetXS
from adapters.registry import load_adapter
from lightning_modules.backbone import build_tiny_backbone, load_pretrained_backbone
from lightning_modules.commands.generate import run_generate
from lightning_modules.commands.train import train
from lightning_modules.system import AdapterTrainingSystem
from tests.lightning_modules.commands.test_generate import PROMPTS, compose_generate

STEPS = 6


@pytest.fixture(scope="module")
def sd2(sd2_pipeline_dir):
    """The tiny SD 2.x-layout model (two layers per block, f=2 VAE, v-prediction), as ctrlkit loads it."""
    return load_pretrained_backbone(str(sd2_pipeline_dir))


def trained(adapter: ControlNetXS, seed: int = 1) -> ControlNetXS:
    """Every weight moved off its initial value (the zero convolutions too), as training would."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in adapter.trainable_parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.05)
    return adapter.eval()


def edge_condition(seed: int = 0, batch: int = 2) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (torch.rand(batch, 3, 64, 64, generator=generator) > 0.9).float()


def sample(backbone, composition=None, scheduler: str = "unipc") -> torch.Tensor:
    latents = sample_latents(
        backbone.unet,
        make_scheduler(scheduler, backbone.noise_scheduler.config),
        backbone.encode_prompts(PROMPTS),
        (len(PROMPTS), 4, 32, 32),
        composition=composition,
        uncond_hidden_states=backbone.encode_prompts([""] * len(PROMPTS)),
        guidance_scale=5.0,
        num_inference_steps=STEPS,
        generator=torch.Generator().manual_seed(0),
    )
    return backbone.decode_latents(latents)


def diffusers_pipeline(backbone, adapter: ControlNetXS, scheduler: str) -> StableDiffusionControlNetXSPipeline:
    components = backbone.to_pipeline().components
    components.pop("image_encoder", None)  # StableDiffusionPipeline's; the ControlNet-XS pipeline has none
    pipeline = StableDiffusionControlNetXSPipeline(**components, controlnet=adapter.controlnet)
    pipeline.scheduler = make_scheduler(scheduler, backbone.noise_scheduler.config)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@pytest.mark.parametrize(("scheduler", "scale", "start", "end"), [("unipc", 1.0, 0.0, 1.0), ("ddim", 0.7, 0.2, 0.6)])
def test_one_unit_equals_diffusers_controlnet_xs_pipeline(sd2, scheduler, scale, start, end):
    # size_ratio 0.5 gives 16- and 32-channel control blocks: widths at which diffusers' pipeline model normalises
    # over other groups than ControlNetXSAdapter builds (follow_fused_group_norms), so the comparison covers it
    adapter = trained(ControlNetXS.from_unet(sd2.unet, vae_scale_factor=sd2.vae_scale_factor, size_ratio=0.5))
    condition = edge_condition()
    unit = ControlUnit(adapter, condition, scale=scale, start=start, end=end)
    ours = sample(sd2, Composition([unit]), scheduler)

    theirs = diffusers_pipeline(sd2, adapter, scheduler)(
        PROMPTS,
        image=condition,
        height=64,
        width=64,
        num_inference_steps=STEPS,
        guidance_scale=5.0,
        controlnet_conditioning_scale=scale,
        control_guidance_start=start,
        control_guidance_end=end,
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
    ).images
    assert ours.shape == theirs.shape == (2, 3, 64, 64)
    assert (ours - theirs).abs().max() <= 1e-3
    assert (ours - sample(sd2, scheduler=scheduler)).abs().max() > 1e-2  # the unit mattered: the test can fail


def test_generate_with_a_saved_controlnet_xs_equals_diffusers(sd2, sd2_pipeline_dir, tmp_path):
    adapter = trained(ControlNetXS.from_unet(sd2.unet, vae_scale_factor=sd2.vae_scale_factor, size_ratio=0.5))
    adapter.save_pretrained(tmp_path / "xs")
    # the folder is diffusers' own format: its class loads it, with no ctrlkit key in the config
    reloaded = ControlNetXSAdapter.from_pretrained(tmp_path / "xs")
    assert "layers_per_block" not in json.loads((tmp_path / "xs" / "config.json").read_text())
    assert all(
        torch.equal(a, b) for a, b in zip(reloaded.state_dict().values(), adapter.controlnet.state_dict().values())
    )
    edges = (edge_condition(3, batch=1)[0, 0].numpy() * 255).astype(np.uint8)
    Image.fromarray(np.stack([edges] * 3, axis=-1)).save(tmp_path / "edges.png")
    unit = f"{{adapter: {tmp_path / 'xs'}, condition_image: {tmp_path / 'edges.png'}, scale: 0.8}}"
    cfg = compose_generate(
        tmp_path / "generated",
        "model=sd2",
        f"model.path={sd2_pipeline_dir}",
        f"prompts=[{PROMPTS[0]},{PROMPTS[1]}]",
        f"units=[{unit}]",
        f"num_inference_steps={STEPS}",
    )
    ours = np.stack([np.asarray(Image.open(path)) for path in run_generate(cfg)]).astype(np.float32) / 255

    control = torch.from_numpy(np.stack([edges] * 3)).float()[None].expand(2, -1, -1, -1) / 255
    theirs = diffusers_pipeline(sd2, ControlNetXS(reloaded, sd2.unet), "unipc")(
        PROMPTS,
        image=control,
        height=64,
        width=64,
        num_inference_steps=STEPS,
        guidance_scale=7.5,
        controlnet_conditioning_scale=0.8,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images
    # both through 8-bit PNG rounding: at most one level apart where a float sits on a rounding boundary
    assert np.abs(ours - np.round(theirs * 255) / 255).max() <= 1 / 255 + 1e-6


def test_the_view_shares_the_unet_and_adapter_weights_and_equals_diffusers_copy(sd2):
    adapter = trained(ControlNetXS.from_unet(sd2.unet, vae_scale_factor=2, size_ratio=0.5))
    fused = adapter.fused
    assert (
        fused.base_conv_in is sd2.unet.conv_in
        and fused.down_blocks[1].ctrl_resnets is adapter.controlnet.down_blocks[1].resnets
    )
    # the adapter's state dict is its own weights only: checkpoints and the optimizer never see the UNet
    assert all(name.startswith("controlnet.") for name in adapter.state_dict())
    copied = UNetControlNetXSModel.from_unet(sd2.unet, adapter.controlnet)  # what the pipeline runs
    generator = torch.Generator().manual_seed(0)
    latents, text = torch.randn(2, 4, 32, 32, generator=generator), torch.randn(2, 16, 32, generator=generator)
    condition = edge_condition()
    with torch.no_grad():
        theirs = copied(latents, 500, text, controlnet_cond=condition, conditioning_scale=0.7).sample
        kwargs = adapter(
            condition, noisy_latents=latents, timesteps=500, encoder_hidden_states=text, conditioning_scale=0.7
        )
        ours = run_unet(sd2.unet, latents, 500, text, **kwargs)
    # diffusers' copy rebuilds the UNet's ResNets with GroupNorm eps 1e-6 where the UNet has 1e-5: the view runs
    # the UNet's own modules
    assert (ours - theirs).abs().max() <= 1e-3


def test_under_control_mode_the_unconditional_half_gets_the_plain_unet():
    backbone = build_tiny_backbone()
    adapter = trained(ControlNetXS.from_unet(backbone.unet, vae_scale_factor=4, size_ratio=0.5))
    generator = torch.Generator().manual_seed(0)
    latents, text = torch.randn(4, 4, 16, 16, generator=generator), torch.randn(4, 32, 64, generator=generator)
    condition = edge_condition(batch=2)

    def prediction(mode: str) -> torch.Tensor:
        composition = Composition([ControlUnit(adapter, condition, scale=0.9, mode=mode)])
        kwargs = composition(latents, torch.tensor(300), text, step_index=0, num_steps=1, guided=True)
        return run_unet(backbone.unet, latents, torch.tensor(300), text, **kwargs)

    with torch.no_grad():
        plain = backbone.unet(latents, torch.tensor(300), text).sample
        balanced, control = prediction("balanced"), prediction("control")
    torch.testing.assert_close(control[:2], plain[:2], rtol=0, atol=1e-5)
    torch.testing.assert_close(control[2:], balanced[2:], rtol=0, atol=1e-5)
    assert (balanced[:2] - plain[:2]).abs().max() > 1e-3  # balanced controls both halves


def test_composition_limits_are_one_line_errors():
    backbone = build_tiny_backbone()
    xs = ControlNetXS.from_unet(backbone.unet, vae_scale_factor=4, size_ratio=0.5)
    controlnet = ControlNetAdapter.from_unet(backbone.unet, vae_scale_factor=4)
    condition = edge_condition()
    with pytest.raises(ValueError, match=r"unit 'xs': ControlNet-XS runs the UNet itself .* composes with no other"):
        Composition([ControlUnit(xs, condition, name="xs"), ControlUnit(controlnet, condition, name="cn")])
    with pytest.raises(ValueError, match=r"unit 'xs': ControlNet-XS runs the UNet itself .* takes no mode=prompt"):
        ControlUnit(xs, condition, mode="prompt", name="xs")
    with pytest.raises(ValueError, match=r"takes no mask; scale, start/end and mode balanced or control apply"):
        ControlUnit(xs, condition, mask=torch.ones(1, 1, 64, 64), name="xs")
    with pytest.raises(ValueError, match=r"runs the UNet it was built or loaded with"):
        run_unet(
            build_tiny_backbone().unet,
            torch.zeros(2, 4, 16, 16),
            10,
            torch.zeros(2, 8, 64),
            **xs(
                condition,
                noisy_latents=torch.zeros(2, 4, 16, 16),
                timesteps=10,
                encoder_hidden_states=torch.zeros(2, 8, 64),
            ),
        )


def test_size_ratio_and_base_mismatch_are_one_line_errors(sd2, tmp_path):
    tiny_unet = build_tiny_backbone().unet  # (32, 64, 64) channels, 8 heads per block
    with pytest.raises(ValueError, match=r"size_ratio 0.2 gives ControlNet-XS blocks of \[6, 12, 12\] channels"):
        ControlNetXS.from_unet(tiny_unet, vae_scale_factor=4, size_ratio=0.2)
    ControlNetXS.from_unet(tiny_unet, vae_scale_factor=4, size_ratio=0.5).save_pretrained(tmp_path / "tiny_xs")
    with pytest.raises(AdapterFormatError) as error:
        load_adapter(tmp_path / "tiny_xs", sd2.unet)
    message = str(error.value)
    assert "\n" not in message and "tiny_xs" in message
    assert "block_out_channels [32, 64, 64], layers_per_block 1" in message
    assert "block_out_channels [32, 64], layers_per_block 2" in message


def test_the_tiny_models_one_layer_layout_saves_its_layer_count_and_loads_back(tmp_path):
    unet = build_tiny_backbone().unet
    adapter = trained(ControlNetXS.from_unet(unet, vae_scale_factor=4, size_ratio=0.5))
    adapter.save_pretrained(tmp_path / "xs")
    config = json.loads((tmp_path / "xs" / "config.json").read_text())
    assert config["_class_name"] == "ControlNetXSAdapter" and config["layers_per_block"] == 1
    assert [len(block.resnets) for block in adapter.controlnet.down_blocks] == [1, 1, 1]
    assert [len(up.ctrl_to_base) for up in adapter.controlnet.up_connections] == [2, 2, 2]  # one per UNet skip
    loaded, found = load_adapter(tmp_path / "xs", unet)
    assert found == "ControlNet-XS, diffusers folder"
    for (name, mine), (_, theirs) in zip(adapter.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(mine, theirs), name


def test_a_learned_time_embedding_starts_as_the_unets():
    backbone = build_tiny_backbone()
    adapter = ControlNetXS.from_unet(
        backbone.unet, vae_scale_factor=4, size_ratio=0.5, learn_time_embedding=True, time_embedding_mix=0.5
    )
    generator = torch.Generator().manual_seed(0)
    latents, text = torch.randn(2, 4, 16, 16, generator=generator), torch.randn(2, 8, 64, generator=generator)
    kwargs = adapter(
        edge_condition(), noisy_latents=latents, timesteps=torch.tensor([100, 800]), encoder_hidden_states=text
    )
    with torch.no_grad():
        ours = run_unet(backbone.unet, latents, torch.tensor([100, 800]), text, **kwargs)
        plain = backbone.unet(latents, torch.tensor([100, 800]), text).sample
    torch.testing.assert_close(ours, plain, rtol=0, atol=1e-5)


def test_a_training_step_reaches_the_adapter_and_not_the_unet_with_or_without_checkpointing():
    backbone = build_tiny_backbone()
    adapter = trained(ControlNetXS.from_unet(backbone.unet, vae_scale_factor=4, size_ratio=0.5)).train()
    system = AdapterTrainingSystem(backbone, adapter)
    batch = {
        "pixel_values": torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1,
        "prompt": ["a red circle on a blue background", "a green square on a white background"],
        "condition": edge_condition(),
    }

    def gradients() -> dict[str, torch.Tensor]:
        adapter.zero_grad(set_to_none=True)
        system.compute_loss(batch, generator=torch.Generator().manual_seed(0)).backward()
        return {name: parameter.grad for name, parameter in adapter.named_parameters()}

    plain = gradients()
    assert all(grad is not None and grad.abs().sum() > 0 for grad in plain.values())
    assert all(parameter.grad is None for parameter in backbone.unet.parameters())
    # the interleaved blocks recompute both streams in the backward pass: the same gradients
    backbone.unet.enable_gradient_checkpointing()
    assert adapter.enable_gradient_checkpointing()
    recomputed = gradients()
    for name, grad in plain.items():
        torch.testing.assert_close(recomputed[name], grad, rtol=1e-4, atol=1e-7, msg=name)


def test_ctrlkit_train_controlnet_xs_exports_a_folder_that_loads_back(make_train_config):
    cfg = make_train_config("adapter=controlnet_xs", "trainer.max_steps=2")
    _, objects = train(cfg)
    exported = Path(cfg.paths.output_dir) / "adapter"
    assert json.loads((exported / "config.json").read_text())["layers_per_block"] == 1
    # the tiny UNet's one-layer layout is ctrlkit's to load, and the model card says so
    assert 'load_adapter("adapter", unet)' in (exported / "README.md").read_text()
    loaded, _ = load_adapter(exported, objects["backbone"].unet)
    trained_weights = objects["system"].adapter.state_dict()
    assert all(torch.equal(tensor, trained_weights[name]) for name, tensor in loaded.state_dict().items())
    assert any(tensor.abs().sum() > 0 for name, tensor in trained_weights.items() if "ctrl_to_base" in name)
