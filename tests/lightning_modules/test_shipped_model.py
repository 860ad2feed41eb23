"""The tiny base model shipped in the package: loads through model=tiny and through diffusers, offline."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from hydra.utils import instantiate

from adapters.sampling import make_scheduler, sample_latents
from lightning_modules.backbone import SHIPPED_TINY_MODEL
from lightning_modules.errors import CtrlkitError


def test_shipped_folder_is_small():
    size = sum(path.stat().st_size for path in SHIPPED_TINY_MODEL.rglob("*") if path.is_file())
    assert 0 < size <= 20 * 2**20


def test_model_tiny_loads_the_shipped_folder_and_samples(make_train_config, no_network):
    backbone = instantiate(make_train_config("model=tiny").model)
    text = backbone.encode_prompts(["a red circle on a blue background"])
    latents = sample_latents(
        backbone.unet,
        make_scheduler("unipc", backbone.noise_scheduler.config),
        text,
        (1, 4, 16, 16),
        uncond_hidden_states=backbone.encode_prompts([""]),
        guidance_scale=5.0,
        num_inference_steps=4,
        generator=torch.Generator().manual_seed(0),
    )
    images = backbone.decode_latents(latents)
    assert images.shape == (1, 3, 64, 64) and torch.isfinite(images).all()


def test_diffusers_pipeline_loads_the_shipped_folder(no_network):
    pipeline = StableDiffusionPipeline.from_pretrained(SHIPPED_TINY_MODEL, local_files_only=True)
    pipeline.set_progress_bar_config(disable=True)
    images = pipeline(
        "a green square on a white background",
        height=64,
        width=64,
        num_inference_steps=4,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images
    assert images.shape == (1, 64, 64, 3) and np.isfinite(images).all()


def test_shipped_model_draws_the_captioned_shape_and_colour():
    """The shipped base alone (no adapter), with classifier-free guidance, draws what 64 validation captions ask
    for: caption accuracy (right colour and right shape, by the shapes metric) >= 0.9."""
    from lightning_modules.backbone import load_tiny_backbone
    from lightning_modules.commands.pretrain_base import caption_accuracy, render_pool

    _, val_scenes = render_pool(64, 64, seed=1000003)  # conf/pretrain_base.yaml's validation set
    scores = caption_accuracy(load_tiny_backbone(), val_scenes, guidance_scale=5.0, steps=25)
    assert scores["caption_accuracy"] >= 0.9, scores


def test_diffusers_pipeline_draws_recognisable_shapes(no_network):
    from conditions.metrics import score_shapes_image
    from lightning_modules.commands.pretrain_base import render_pool

    _, scenes = render_pool(16, 64, seed=1000003)
    pipeline = StableDiffusionPipeline.from_pretrained(SHIPPED_TINY_MODEL, local_files_only=True)
    pipeline.set_progress_bar_config(disable=True)
    images = pipeline(
        [scene.caption for scene in scenes],
        height=64,
        width=64,
        num_inference_steps=25,
        guidance_scale=5.0,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images
    images = (images * 255).round().astype(np.uint8)
    correct = [
        score_shapes_image(image, scene.objects[0].colour, scene.objects[0].shape, scene.background).caption_correct
        for image, scene in zip(images, scenes)
    ]
    assert np.mean(correct) >= 0.8, correct


def test_real_size_architectures_build_from_the_shipped_configs():
    """SD1.5 / SDXL at full size from a few KB of JSON, no download: the published parameter counts (built on the
    meta device, so the test allocates nothing)."""
    from lightning_modules.backbone import architecture_unet

    with torch.device("meta"):
        unet, sdxl = architecture_unet("sd15"), architecture_unet("sdxl")
    assert sum(p.numel() for p in unet.parameters()) == 859_520_964  # SD1.5's UNet
    assert not any(p.requires_grad for p in unet.parameters())
    assert sum(p.numel() for p in sdxl.parameters()) == 2_567_463_684  # SDXL base's UNet
    assert sdxl.config.addition_embed_type == "text_time"


def test_sd15_random_model_config_composes_with_its_size_checks(make_train_config):
    from lightning_modules.commands.config_checks import check_train_config

    cfg = make_train_config("model=sd15_random", "data.image_size=128")
    assert cfg.model.name == "sd15" and cfg.recipe.adapter_learning_rate == 1e-5
    check_train_config(cfg)  # 128 is a multiple of 8 x 8
    with pytest.raises(CtrlkitError, match=r"data.image_size=100 must be a positive multiple of 64"):
        check_train_config(make_train_config("model=sd15_random", "data.image_size=100"))


@pytest.mark.parametrize(
    ("override", "message"),
    [("vae.steps=-1", r"vae.steps=-1; allowed: an integer >= 1"), ("denoiser.batch_size=0", r"denoiser.batch_size=0")],
)
def test_pretrain_base_names_a_bad_setting_before_it_renders_anything(tmp_path, override, message, monkeypatch):
    from lightning_modules.commands import pretrain_base as module
    from tests.conftest import compose_config

    monkeypatch.setattr(module, "render_pool", lambda *args, **kwargs: pytest.fail("rendered before the check"))
    cfg = compose_config("pretrain_base", tmp_path, [override, "pool_size=8"])
    with pytest.raises(CtrlkitError, match=message):
        module.pretrain_base(cfg)
