"""``ctrlkit generate init_image=... [mask_image=...]``: img2img (SDEdit) and inpainting under a composition, equal to
diffusers' ControlNet img2img and inpainting pipelines for one ControlNet on the shipped tiny model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionControlNetImg2ImgPipeline, StableDiffusionControlNetInpaintPipeline
from omegaconf import open_dict
from PIL import Image

from adapters import ControlNetAdapter, InitImage, make_scheduler, sample_latents
from conditions.shapes import render_scene
from lightning_modules.backbone import build_tiny_backbone, load_tiny_backbone
from lightning_modules.commands.generate import run_generate
from lightning_modules.errors import CtrlkitError
from tests.adapters.test_adapters import randomize_zero_convs
from tests.conftest import compose_config

PROMPTS = ["a red circle on a blue background", "a green square on a white background"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A ControlNet with non-zero zero-convs for the shipped model, an edge map, a scene and a mask (left half)."""
    folder = tmp_path_factory.mktemp("from_image")
    adapter = ControlNetAdapter.from_unet(load_tiny_backbone().unet, vae_scale_factor=4)
    randomize_zero_convs(adapter)
    adapter.save_pretrained(folder / "adapter")
    Image.fromarray(render_scene(np.random.default_rng(3), 64).image).save(folder / "scene.png")
    edges = (np.random.default_rng(0).random((64, 64)) > 0.9).astype(np.uint8) * 255
    Image.fromarray(np.stack([edges] * 3, axis=-1)).save(folder / "edges.png")
    mask = np.zeros((64, 64), np.uint8)
    mask[:, :32] = 255
    Image.fromarray(mask).save(folder / "mask.png")
    return folder


def generate(tmp_path, files, *overrides) -> np.ndarray:
    unit = f"{{adapter: {files / 'adapter'}, condition_image: {files / 'edges.png'}, scale: 0.8}}"
    cfg = compose_config(
        "generate",
        tmp_path,
        [f"prompts=[{PROMPTS[0]},{PROMPTS[1]}]", f"units=[{unit}]", "num_inference_steps=8", *overrides],
    )
    with open_dict(cfg):
        cfg.output_dir = str(tmp_path)
    return np.stack([np.asarray(Image.open(path)) for path in run_generate(cfg)]).astype(np.float32) / 255


def diffusers_pipeline(pipeline_class, files):
    backbone = load_tiny_backbone()
    controlnet = ControlNetAdapter.from_pretrained(files / "adapter").controlnet
    pipeline = pipeline_class(**backbone.to_pipeline().components, controlnet=controlnet)
    pipeline.scheduler = make_scheduler("unipc", backbone.noise_scheduler.config)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def pipeline_settings() -> dict:
    """What generate() sets, as diffusers' pipelines take it (the same seed: the same draws)."""
    return {
        "height": 64,
        "width": 64,
        "num_inference_steps": 8,
        "guidance_scale": 7.5,
        "controlnet_conditioning_scale": 0.8,
        "generator": torch.Generator().manual_seed(0),
        "output_type": "np",
    }


def as_batch(path, channels: int = 3) -> torch.Tensor:
    image = np.asarray(Image.open(path).convert("RGB" if channels == 3 else "L"), dtype=np.float32) / 255
    tensor = torch.from_numpy(image).reshape(64, 64, channels).permute(2, 0, 1)[None]
    return tensor.expand(2, -1, -1, -1)


def test_img2img_equals_diffusers_controlnet_img2img(tmp_path, files):
    ours = generate(tmp_path, files, f"init_image={files / 'scene.png'}", "strength=0.6")
    theirs = diffusers_pipeline(StableDiffusionControlNetImg2ImgPipeline, files)(
        PROMPTS,
        image=as_batch(files / "scene.png"),
        control_image=as_batch(files / "edges.png"),
        strength=0.6,
        **pipeline_settings(),
    ).images
    assert np.abs(ours - np.round(theirs * 255) / 255).max() <= 1e-3 + 1 / 255  # one 8-bit level at most


def test_inpainting_equals_diffusers_controlnet_inpainting_and_keeps_the_unmasked_part(tmp_path, files):
    scene = np.asarray(Image.open(files / "scene.png"), dtype=np.float32) / 255
    for strength in (1.0, 0.7):
        ours = generate(
            tmp_path / str(strength), files, f"init_image={files / 'scene.png'}",
            f"mask_image={files / 'mask.png'}", f"strength={strength}", "keep_unmasked_pixels=false",
        )  # fmt: skip
        theirs = diffusers_pipeline(StableDiffusionControlNetInpaintPipeline, files)(
            PROMPTS,
            image=as_batch(files / "scene.png"),
            mask_image=as_batch(files / "mask.png", channels=1),
            control_image=as_batch(files / "edges.png"),
            strength=strength,
            **pipeline_settings(),
        ).images
        assert np.abs(ours - np.round(theirs * 255) / 255).max() <= 1e-3 + 1 / 255
        # outside the mask (right half, away from the border) the scene is kept: its latents exactly (next test);
        # in pixels up to what the VAE decoder, whose mid-block attention sees the whole image, carries over
        kept = np.abs(ours[:, 8:-8, 40:] - scene[None, 8:-8, 40:]).mean()
        repainted = np.abs(ours[:, 8:-8, :24] - scene[None, 8:-8, :24]).mean()
        assert kept < 0.1 and repainted > 3 * kept, (kept, repainted)


def test_inpainting_pastes_the_unmasked_pixels_back_by_default(tmp_path, files):
    decoded = generate(
        tmp_path / "decoded", files, f"init_image={files / 'scene.png'}", f"mask_image={files / 'mask.png'}",
        "keep_unmasked_pixels=false",
    )  # fmt: skip
    ours = generate(tmp_path / "kept", files, f"init_image={files / 'scene.png'}", f"mask_image={files / 'mask.png'}")
    scene = np.asarray(Image.open(files / "scene.png"), dtype=np.float32) / 255
    assert np.array_equal(ours[:, :, 32:], np.broadcast_to(scene[None, :, 32:], ours[:, :, 32:].shape))
    assert np.array_equal(ours[:, :, :32], decoded[:, :, :32])


def test_strength_zero_returns_the_init_image(tmp_path, files):
    ours = generate(tmp_path, files, f"init_image={files / 'scene.png'}", "strength=0")
    scene = np.asarray(Image.open(files / "scene.png"), dtype=np.float32) / 255
    backbone = load_tiny_backbone()
    pixels = (torch.from_numpy(scene).permute(2, 0, 1)[None] * 2 - 1).expand(2, -1, -1, -1)
    round_trip = backbone.decode_latents(backbone.encode_images(pixels, torch.Generator().manual_seed(0)))
    round_trip = round_trip.permute(0, 2, 3, 1).numpy()
    assert np.abs(ours - round_trip).max() <= 1 / 255 + 1e-6  # exactly the VAE round trip, through PNG
    print("round trip", np.abs(ours - scene[None]).mean())
    assert np.abs(ours - scene[None]).mean() < 0.05  # which is close to the image


def test_inpainting_keeps_the_latents_outside_the_mask_exactly(tiny_backbone):
    unet = tiny_backbone.unet
    latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    mask = torch.zeros(2, 1, 16, 16)
    mask[..., 4:12, 4:12] = 1
    text = tiny_backbone.encode_prompts(PROMPTS)
    for strength in (1.0, 0.5):
        out = sample_latents(
            unet, make_scheduler("unipc", tiny_backbone.noise_scheduler.config), text, (2, 4, 16, 16),
            uncond_hidden_states=tiny_backbone.encode_prompts(["", ""]), guidance_scale=7.5,
            num_inference_steps=6, init=InitImage(latents, strength, mask),
        )  # fmt: skip
        assert torch.equal(out * (1 - mask), latents * (1 - mask))
        assert (out - latents)[..., 4:12, 4:12].abs().mean() > 0.1


def test_an_inpainting_unet_reads_the_mask_and_the_masked_image():
    """A 9-channel UNet gets latents | mask | masked-image latents and is not blended."""
    backbone = build_tiny_backbone(seed=0)
    config = dict(backbone.unet.config)
    config["in_channels"] = 9
    unet = type(backbone.unet).from_config(config)
    seen = []
    unet.conv_in.register_forward_hook(lambda module, args, output: seen.append(args[0]))
    latents = torch.randn(1, 4, 16, 16)
    mask = torch.zeros(1, 1, 16, 16)
    mask[..., :8] = 1
    text = torch.randn(1, 77, unet.config.cross_attention_dim)
    init = InitImage(latents, strength=1.0, mask=mask, masked_image_latents=latents * (1 - mask))
    scheduler = make_scheduler("ddim", backbone.noise_scheduler.config)
    sample_latents(unet, scheduler, text, (1, 4, 16, 16), num_inference_steps=2, init=init)
    assert [tuple(x.shape) for x in seen] == [(1, 9, 16, 16)] * 2
    assert torch.equal(seen[0][:, 4:5], mask) and torch.equal(seen[0][:, 5:], latents * (1 - mask))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["mask_image=MASK"], "mask_image needs init_image"),
        (["init_image=/nowhere.png"], "init_image='/nowhere.png' is not an image file"),
        (["init_image=SCENE", "strength=1.5"], r"strength=1.5; allowed: a number in \[0, 1\]"),
        (["init_image=SCENE", "strength=-1"], r"strength=-1; allowed: a number >= 0"),
        (["init_image=/nowhere.png", "strength=1.5"], r"strength=1.5; allowed"),  # said before any image is read
        (["height=50"], r"height=50 must be a positive multiple of 16 for this model .*e.g. 48"),
        (["width=72"], r"width=72 must be a positive multiple of 16 .*e.g. (64|80)"),
    ],
)
def test_bad_image_settings_are_named(tmp_path, files, overrides, message):
    paths = {"MASK": str(files / "mask.png"), "SCENE": str(files / "scene.png")}
    overrides = [o.replace("MASK", paths["MASK"]).replace("SCENE", paths["SCENE"]) for o in overrides]
    with pytest.raises(CtrlkitError, match=message):
        generate(tmp_path, files, *overrides)
