"""SDXL bases (issue 20): on a tiny random SDXL-architecture pipeline, ``ctrlkit generate model=sdxl`` with one
ControlNet equals diffusers' ``StableDiffusionXLControlNetPipeline``, with one T2I-Adapter (``full_adapter_xl``, its
pyramid derived from the UNet) equals ``StableDiffusionXLAdapterPipeline``, both compose, and an adapter made for
another base stops with one line naming both."""

from __future__ import annotations

from unittest.mock import patch

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLAdapterPipeline, StableDiffusionXLControlNetPipeline
from PIL import Image
from safetensors.torch import load_file, save_file

from adapters import ControlNetAdapter, make_scheduler
from adapters.controlnet_formats import save_controlnet_single_file
from adapters.t2i_adapter import T2IAdapterAdapter
from conditions.ranges import images_to_numpy
from conditions.shapes import render_scene
from lightning_modules.backbone import load_pretrained_backbone, load_tiny_backbone
from lightning_modules.commands import generate as generate_command
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
    """``ctrlkit generate`` on the tiny SDXL pipeline -> the written images (B, H, W, 3) in [0, 1]."""
    return generate_float(sdxl, tmp_path, *units)[0]


def generate_float(sdxl, tmp_path, *units: str) -> tuple[np.ndarray, np.ndarray]:
    """``ctrlkit generate`` -> (the PNGs it wrote, the decoded float images before 8-bit rounding), each
    (B, H, W, 3) in [0, 1]; the float images are taken where generate turns them into uint8."""
    decoded = []

    def keep_float(images: torch.Tensor) -> np.ndarray:
        decoded.append(images.permute(0, 2, 3, 1).float().numpy())
        return images_to_numpy(images)

    cfg = compose_generate(
        tmp_path,
        "model=sdxl",
        f"model.path={sdxl / 'pipeline'}",
        f"prompts=[{PROMPTS[0]},{PROMPTS[1]}]",
        f"units=[{','.join(units)}]",
        f"num_inference_steps={STEPS}",
        "scheduler=euler",
    )
    with patch.object(generate_command, "images_to_numpy", keep_float):
        paths = run_generate(cfg)
    written = np.stack([np.asarray(Image.open(path)) for path in paths]).astype(np.float32) / 255
    return written, decoded[0]


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


def assert_same(ours: tuple[np.ndarray, np.ndarray], theirs: np.ndarray) -> None:
    """generate's float images equal diffusers' (max abs diff <= 1e-3, the issue's bound), and its PNGs are
    diffusers' images rounded to 8 bits (one level apart at most, where a float sits on a rounding boundary)."""
    written, decoded = ours
    difference = np.abs(decoded - theirs).max()
    print(f"max abs difference of the float images: {difference:.2e}")  # shown with pytest -s
    assert difference <= 1e-3
    assert np.abs(written - np.round(theirs * 255) / 255).max() <= 1 / 255 + 1e-6


def test_one_controlnet_equals_diffusers_sdxl_controlnet_pipeline(sdxl, tmp_path):
    ours = generate_float(
        sdxl, tmp_path, f"{{adapter: {sdxl / 'controlnet'}, condition_image: {sdxl / 'mask.png'}, scale: 0.8}}"
    )

    pipeline = StableDiffusionXLControlNetPipeline(
        **pipeline_components(sdxl),
        controlnet=ControlNetAdapter.from_pretrained(sdxl / "controlnet").controlnet,
        add_watermarker=False,
    )
    theirs = diffusers_images(pipeline, sdxl, controlnet_conditioning_scale=0.8)

    assert_same(ours, theirs)
    base = generate(sdxl, tmp_path / "base")
    assert np.abs(ours[0] - base).max() > 0.05  # the ControlNet acts (the comparison could fail)


def test_sdxl_controlnet_single_files_generate_what_the_folder_does(sdxl, tmp_path):
    """SDXL ControlNet releases ship one diffusers-keyed file (e.g. ``diffusers_xl_canny_full.safetensors``; SDXL's
    ``add_embedding`` included); the original layout writes it as ``label_emb`` (which diffusers' own single-file
    reader does not map for SDXL yet). Both, read with the base model's UNet, generate the folder's images."""
    controlnet = ControlNetAdapter.from_pretrained(sdxl / "controlnet").controlnet
    release = tmp_path / "diffusers_xl_tiny_full.safetensors"
    save_file({key: value.contiguous() for key, value in controlnet.state_dict().items()}, str(release))
    original = tmp_path / "control_xl_tiny.safetensors"
    save_controlnet_single_file(controlnet, original)
    assert "control_model.label_emb.0.0.weight" in load_file(str(original))

    def unit(adapter) -> str:
        return f"{{adapter: {adapter}, condition_image: {sdxl / 'mask.png'}, scale: 0.8}}"

    folder_images = generate(sdxl, tmp_path / "folder", unit(sdxl / "controlnet"))
    for single_file in (release, original):
        assert np.array_equal(generate(sdxl, tmp_path / single_file.stem, unit(single_file)), folder_images)


def test_one_t2i_adapter_equals_diffusers_sdxl_adapter_pipeline(sdxl, tmp_path):
    ours = generate_float(
        sdxl, tmp_path, f"{{adapter: {sdxl / 't2i'}, condition_image: {sdxl / 'mask.png'}, scale: 0.8}}"
    )

    pipeline = StableDiffusionXLAdapterPipeline(
        **pipeline_components(sdxl), adapter=T2IAdapterAdapter.from_pretrained(sdxl / "t2i").t2i_adapter
    )
    theirs = diffusers_images(pipeline, sdxl, adapter_conditioning_scale=0.8)

    assert_same(ours, theirs)


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

    assert_same(generate_float(sdxl, tmp_path), images.permute(0, 2, 3, 1).numpy())
