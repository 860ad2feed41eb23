"""SDXL bases (issue 20): on a tiny random SDXL-architecture pipeline, ``ctrlkit generate model=sdxl`` with one
ControlNet equals diffusers' ``StableDiffusionXLControlNetPipeline``, with one T2I-Adapter (``full_adapter_xl``, its
pyramid derived from the UNet) equals ``StableDiffusionXLAdapterPipeline``, both compose, and an adapter made for
another base stops with one line naming both."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLAdapterPipeline, StableDiffusionXLControlNetPipeline
from PIL import Image

from adapters import ControlNetAdapter, make_scheduler
from adapters.t2i_adapter import T2IAdapterAdapter
from conditions.shapes import render_scene
from lightning_modules.backbone import load_pretrained_backbone, load_tiny_backbone
from lightning_modules.commands.generate import run_generate
from lightning_modules.errors import USER_ERRORS
from tests.adapters.test_adapters import randomize_zero_convs
from tests.helpers.tiny_sdxl import save_tiny_sdxl_pipeline
from tests.lightning_modules.commands.test_generate import PROMPTS, compose_generate

STEPS = 4


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    """A saved tiny SDXL pipeline, a ControlNet and a T2I-Adapter for it (non-trivial weights), a condition map."""
    folder = tmp_path_factory.mktemp("sdxl")
    save_tiny_sdxl_pipeline(folder / "pipeline")
    backbone = load_pretrained_backbone(str(folder / "pipeline"))
    controlnet = ControlNetAdapter.from_unet(backbone.unet, vae_scale_factor=backbone.vae_scale_factor)
    randomize_zero_convs(controlnet)
    controlnet.save_pretrained(folder / "controlnet")
    torch.manual_seed(1)
    t2i = T2IAdapterAdapter.from_unet(
        backbone.unet, vae_scale_factor=backbone.vae_scale_factor, adapter_type="full_adapter_xl"
    )
    t2i.save_pretrained(folder / "t2i")
    mask = render_scene(np.random.default_rng(3), 64).foreground_mask
    Image.fromarray((mask * 255).astype("uint8")).convert("RGB").save(folder / "mask.png")
    return folder


def generate(sdxl, tmp_path, *units: str) -> np.ndarray:
    cfg = compose_generate(
        tmp_path,
        "model=sdxl",
        f"model.path={sdxl / 'pipeline'}",
        f"prompts=[{PROMPTS[0]},{PROMPTS[1]}]",
        f"units=[{','.join(units)}]",
        f"num_inference_steps={STEPS}",
        "scheduler=euler",
    )
    paths = run_generate(cfg)
    return np.stack([np.asarray(Image.open(path)) for path in paths]).astype(np.float32) / 255


def pipeline_components(sdxl) -> dict:
    backbone = load_pretrained_backbone(str(sdxl / "pipeline"))
    components = {k: v for k, v in backbone.to_pipeline().components.items() if v is not None}
    components.pop("image_encoder", None), components.pop("feature_extractor", None)
    components["scheduler"] = make_scheduler("euler", backbone.noise_scheduler.config)
    return components


def condition(sdxl) -> torch.Tensor:
    return torch.from_numpy(np.asarray(Image.open(sdxl / "mask.png"))).permute(2, 0, 1)[None].float() / 255


def diffusers_images(pipeline, sdxl, **scale) -> np.ndarray:
    """The diffusers pipeline's images for ``PROMPTS`` under the mask condition, with generate's settings."""
    pipeline.set_progress_bar_config(disable=True)
    return pipeline(
        PROMPTS,
        image=condition(sdxl).expand(2, -1, -1, -1),
        height=64,
        width=64,
        num_inference_steps=STEPS,
        guidance_scale=7.5,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
        **scale,
    ).images


def assert_same_through_png(ours: np.ndarray, theirs: np.ndarray) -> None:
    # both through 8-bit rounding: at most one level apart where a float sits on a rounding boundary
    assert np.abs(ours - np.round(theirs * 255) / 255).max() <= 1 / 255 + 1e-6


def test_one_controlnet_equals_diffusers_sdxl_controlnet_pipeline(sdxl, tmp_path):
    ours = generate(
        sdxl, tmp_path, f"{{adapter: {sdxl / 'controlnet'}, condition_image: {sdxl / 'mask.png'}, scale: 0.8}}"
    )

    pipeline = StableDiffusionXLControlNetPipeline(
        **pipeline_components(sdxl),
        controlnet=ControlNetAdapter.from_pretrained(sdxl / "controlnet").controlnet,
        add_watermarker=False,
    )
    theirs = diffusers_images(pipeline, sdxl, controlnet_conditioning_scale=0.8)

    assert_same_through_png(ours, theirs)
    base = generate(sdxl, tmp_path / "base")
    assert np.abs(ours - base).max() > 0.05  # the ControlNet acts (the comparison could fail)


def test_one_t2i_adapter_equals_diffusers_sdxl_adapter_pipeline(sdxl, tmp_path):
    ours = generate(sdxl, tmp_path, f"{{adapter: {sdxl / 't2i'}, condition_image: {sdxl / 'mask.png'}, scale: 0.8}}")

    pipeline = StableDiffusionXLAdapterPipeline(
        **pipeline_components(sdxl), adapter=T2IAdapterAdapter.from_pretrained(sdxl / "t2i").t2i_adapter
    )
    theirs = diffusers_images(pipeline, sdxl, adapter_conditioning_scale=0.8)

    assert_same_through_png(ours, theirs)


def test_controlnet_and_t2i_adapter_compose_on_sdxl(sdxl, tmp_path):
    controlnet = f"{{adapter: {sdxl / 'controlnet'}, condition_image: {sdxl / 'mask.png'}, end: 0.5}}"
    t2i = f"{{adapter: {sdxl / 't2i'}, condition_image: {sdxl / 'mask.png'}, scale: 0.5}}"

    both = generate(sdxl, tmp_path / "both", controlnet, t2i)
    alone = generate(sdxl, tmp_path / "alone", controlnet)

    assert both.shape == (2, 64, 64, 3)
    assert np.abs(both - alone).max() > 0.02  # the second unit acts


def test_an_sd15_controlnet_on_an_sdxl_base_stops_naming_both(sdxl, tmp_path):
    sd15 = tmp_path / "sd15_controlnet"
    ControlNetAdapter.from_unet(load_tiny_backbone().unet, vae_scale_factor=4).save_pretrained(sd15)

    with pytest.raises(USER_ERRORS) as raised:
        generate(sdxl, tmp_path, f"{{adapter: {sd15}, condition_image: {sdxl / 'mask.png'}}}")

    message = str(raised.value)
    assert "\n" not in message
    assert str(sd15) in message and "cross_attention_dim 64" in message and "text_time" in message


def test_an_sdxl_t2i_adapter_on_an_sd15_base_stops_naming_both(sdxl, tmp_path):
    cfg = compose_generate(tmp_path, f"units=[{{adapter: {sdxl / 't2i'}, condition_image: {sdxl / 'mask.png'}}}]")

    with pytest.raises(USER_ERRORS) as raised:
        run_generate(cfg)

    message = str(raised.value)
    assert "\n" not in message and str(sdxl / "t2i") in message and "full_adapter_xl" in message


def test_the_training_callbacks_sampler_equals_generate_on_sdxl(sdxl, tmp_path):
    """``Backbone.generate`` (sample grids, controllability) gives the UNet the same added inputs and the same
    all-zero empty negative prompt as ``ctrlkit generate``."""
    backbone = load_pretrained_backbone(str(sdxl / "pipeline"))
    images = backbone.generate(PROMPTS, (64, 64), num_inference_steps=STEPS, guidance_scale=7.5, scheduler="euler")

    ours = images.permute(0, 2, 3, 1).numpy()
    assert_same_through_png(generate(sdxl, tmp_path), ours)
