"""T2I-Adapter: a pyramid derived from the UNet, features computed once per sampling run, diffusers round trips,
and `ctrlkit train adapter=t2i_adapter` end to end."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, T2IAdapter, UNet2DConditionModel
from PIL import Image

from adapters import sample_latents
from adapters.composition import Composition, ControlUnit
from adapters.t2i_adapter import T2IAdapterAdapter, T2IFeatures, t2i_config_for, unet_feature_pyramid
from lightning_modules.commands.train import train


def small_unet(down_block_types, block_out_channels) -> UNet2DConditionModel:
    torch.manual_seed(0)
    up = tuple(reversed([t.replace("Down", "Up") for t in down_block_types]))
    return UNet2DConditionModel(
        sample_size=16,
        block_out_channels=block_out_channels,
        layers_per_block=1,
        down_block_types=down_block_types,
        up_block_types=up,
        cross_attention_dim=16,
        attention_head_dim=2,
        norm_num_groups=8,
    )


SD_LIKE = (("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",), (8, 16, 32, 32))  # SD1.5: four levels
SDXL_LIKE = (("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"), (8, 16, 32))  # SDXL: three levels


def run_unet(unet, adapter, condition, latent_size):
    latents = torch.randn(2, 4, latent_size, latent_size)
    states = torch.randn(2, 5, unet.config.cross_attention_dim)
    kwargs = adapter(condition, noisy_latents=latents, timesteps=torch.tensor(3), encoder_hidden_states=states)
    return unet(latents, 3, states, **kwargs).sample


@pytest.mark.parametrize(
    ("layout", "adapter_type", "vae_scale_factor", "expected_sizes"),
    [
        (SD_LIKE, "full_adapter", 8, [16, 8, 4, 2]),
        (SD_LIKE, "light_adapter", 8, [16, 8, 4, 2]),
        (SDXL_LIKE, "full_adapter_xl", 8, [8, 8, 4, 4]),  # after the first block's downsampler, and the mid block
    ],
)
def test_the_pyramid_matches_each_unet_layout(layout, adapter_type, vae_scale_factor, expected_sizes):
    unet = small_unet(*layout)
    adapter = T2IAdapterAdapter.from_unet(unet, vae_scale_factor=vae_scale_factor, adapter_type=adapter_type)
    condition = torch.rand(2, 3, 16 * vae_scale_factor, 16 * vae_scale_factor)
    features = adapter.prepare(condition).features
    assert [f.shape[-1] for f in features] == expected_sizes
    assert run_unet(unet, adapter, condition, 16).shape == (2, 4, 16, 16)


def test_tiny_unet_gets_three_levels_where_diffusers_default_fails(tiny_backbone):
    unet = tiny_backbone.unet
    assert unet_feature_pyramid(unet, 4)[:-1] == [(32, 4), (64, 8), (64, 16)]
    assert t2i_config_for(unet, "full_adapter", 4) == {"channels": (32, 64, 64), "downscale_factor": 4}
    assert t2i_config_for(unet, "light_adapter", 4) == {"channels": (32, 64), "downscale_factor": 4}
    condition = torch.rand(2, 3, 64, 64)
    for adapter_type in ("full_adapter", "light_adapter"):
        adapter = T2IAdapterAdapter.from_unet(unet, vae_scale_factor=4, adapter_type=adapter_type)
        assert run_unet(unet, adapter, condition, 16).shape == (2, 4, 16, 16)
    # diffusers' SD default (four levels of SD's widths) does not fit the tiny three-level UNet
    default = T2IAdapterAdapter(T2IAdapter(in_channels=3, downscale_factor=4))
    with pytest.raises(RuntimeError, match="size"):
        run_unet(unet, default, condition, 16)


def test_a_layout_that_does_not_fit_is_refused_naming_the_ones_that_do(tiny_backbone):
    with pytest.raises(ValueError, match=r"type 'full_adapter_xl' cannot match .* types that fit: full_adapter"):
        T2IAdapterAdapter.from_unet(tiny_backbone.unet, vae_scale_factor=4, adapter_type="full_adapter_xl")
    with pytest.raises(ValueError, match=r"unknown T2I-Adapter type 'huge'; choose one of"):
        T2IAdapterAdapter.from_unet(tiny_backbone.unet, vae_scale_factor=4, adapter_type="huge")
    adapter = T2IAdapterAdapter.from_unet(tiny_backbone.unet, vae_scale_factor=4)
    with pytest.raises(ValueError, match=r"divisible by the adapter's total downscale factor 16"):
        adapter.prepare(torch.rand(1, 3, 40, 40))


class CountingAdapter(T2IAdapterAdapter):
    """Counts the diffusers adapter's forward calls; ``per_step`` turns the once-per-run preparation off."""

    def __init__(self, t2i_adapter, per_step=False):
        super().__init__(t2i_adapter)
        self.calls = 0
        self.per_step = per_step
        self.t2i_adapter.register_forward_pre_hook(lambda *_: setattr(self, "calls", self.calls + 1))

    def prepare(self, condition):
        return condition if self.per_step else super().prepare(condition)


def sample(unet, adapter=None, composition=None, guidance_scale=3.0):
    torch.manual_seed(0)
    states = torch.randn(2, 5, unet.config.cross_attention_dim)
    return sample_latents(
        unet,
        DDIMScheduler(num_train_timesteps=100),
        states,
        (2, 4, 16, 16),
        adapter=adapter,
        condition=torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1)),
        composition=composition,
        uncond_hidden_states=torch.zeros_like(states),
        guidance_scale=guidance_scale,
        num_inference_steps=6,
        generator=torch.Generator().manual_seed(2),
    )


def test_the_adapter_runs_once_per_sampling_run_not_once_per_step(tiny_backbone):
    unet = tiny_backbone.unet
    built = T2IAdapterAdapter.from_unet(unet, vae_scale_factor=4)
    per_step = CountingAdapter(copy.deepcopy(built.t2i_adapter), per_step=True)
    once = CountingAdapter(built.t2i_adapter)
    latents_once = sample(unet, adapter=once)
    assert once.calls == 1
    latents_per_step = sample(unet, adapter=per_step)
    assert per_step.calls == 6
    torch.testing.assert_close(latents_once, latents_per_step)  # the features do not depend on the step
    # a composition (ctrlkit generate's path), with the adapter on the conditional half only
    condition = torch.rand(2, 3, 64, 64)
    once.calls = 0
    sample(unet, composition=Composition([ControlUnit(once, condition, mode="control", end=0.5)]))
    assert once.calls == 1


def test_prepared_features_double_for_guidance_and_scale(tiny_backbone):
    adapter = T2IAdapterAdapter.from_unet(tiny_backbone.unet, vae_scale_factor=4)
    prepared = adapter.prepare(torch.rand(2, 3, 64, 64))
    assert isinstance(prepared, T2IFeatures) and adapter.prepare(prepared) is prepared
    kwargs = adapter(
        prepared,
        noisy_latents=torch.randn(2, 4, 16, 16),
        timesteps=torch.tensor(1),
        encoder_hidden_states=torch.randn(2, 32, 64),
        conditioning_scale=0.5,
    )
    residuals = kwargs["down_intrablock_additional_residuals"]
    assert [torch.equal(r, f * 0.5) for r, f in zip(residuals, prepared.features)] == [True] * 3
    latents = torch.randn(2, 4, 16, 16)
    again = adapter(prepared, noisy_latents=latents, timesteps=None, encoder_hidden_states=None)
    assert again["down_intrablock_additional_residuals"] is not residuals  # a new list per call: the UNet pops


def test_save_and_load_round_trip_in_diffusers_format(tiny_backbone, tmp_path):
    adapter = T2IAdapterAdapter.from_unet(tiny_backbone.unet, vae_scale_factor=4, adapter_type="light_adapter")
    adapter.save_pretrained(tmp_path / "t2i")
    assert (tmp_path / "t2i" / "diffusion_pytorch_model.safetensors").is_file()
    loaded = T2IAdapterAdapter.from_pretrained(tmp_path / "t2i")
    condition = torch.rand(1, 3, 64, 64)
    for a, b in zip(adapter.prepare(condition).features, loaded.prepare(condition).features):
        assert torch.equal(a, b)
    diffusers_adapter = T2IAdapter.from_pretrained(tmp_path / "t2i")
    assert diffusers_adapter.config.adapter_type == "light_adapter"
    assert torch.equal(diffusers_adapter(condition)[-1], adapter.prepare(condition).features[-1])


def test_loading_a_folder_without_an_adapter_is_one_line(tmp_path):
    from adapters import AdapterFormatError

    with pytest.raises(AdapterFormatError, match=r"is not a diffusers T2IAdapter folder: .*config.json not found"):
        T2IAdapterAdapter.from_pretrained(tmp_path)


@pytest.mark.parametrize("adapter", ["t2i_adapter", "t2i_adapter_light"])
def test_ctrlkit_train_t2i_adapter_on_canny_end_to_end(make_train_config, adapter):
    cfg = make_train_config(f"adapter={adapter}", "condition=canny", "trainer.max_steps=2")
    metrics, objects = train(cfg)
    run = Path(cfg.paths.output_dir)
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))
    exported = T2IAdapter.from_pretrained(run / "adapter")
    for name, tensor in objects["adapter"].t2i_adapter.state_dict().items():
        assert torch.equal(exported.state_dict()[name], tensor), name
    assert sorted(p.name for p in (run / "samples").glob("*.png")) == ["step_000000.png", "step_000002.png"]
    assert Image.open(run / "samples" / "step_000002.png").size == (3 * 64 + 4 * 2, 2 * 64 + 3 * 2)
    controllability = json.loads((run / "controllability.json").read_text())
    assert controllability["jump_metric"] == "canny_f1" and "mask_iou" in controllability["final"]
    assert not any(p.requires_grad for p in objects["backbone"].parameters())


def test_ctrlkit_generate_with_a_t2i_adapter_equals_diffusers_adapter_pipeline(tmp_path):
    from diffusers import StableDiffusionAdapterPipeline

    from adapters import make_scheduler
    from conditions.shapes import render_scene
    from lightning_modules.backbone import load_tiny_backbone
    from lightning_modules.commands.generate import run_generate
    from tests.lightning_modules.commands.test_generate import PROMPTS, compose_generate

    backbone = load_tiny_backbone()
    torch.manual_seed(0)
    adapter = T2IAdapterAdapter.from_unet(backbone.unet, vae_scale_factor=4)
    adapter.save_pretrained(tmp_path / "t2i")
    mask = render_scene(np.random.default_rng(3), 64).foreground_mask
    Image.fromarray((mask * 255).astype("uint8")).convert("RGB").save(tmp_path / "mask.png")
    unit = f"{{adapter: {tmp_path / 't2i'}, condition_image: {tmp_path / 'mask.png'}, scale: 0.8}}"
    cfg = compose_generate(tmp_path / "out", f"prompts=[{PROMPTS[0]},{PROMPTS[1]}]", f"units=[{unit}]")
    with pytest.MonkeyPatch.context() as patch:
        counting = CountingAdapter(adapter.t2i_adapter)
        patch.setattr("adapters.t2i_adapter.T2IAdapterAdapter.from_pretrained", lambda path, unet=None: counting)
        paths = run_generate(cfg)
    assert counting.calls == 1  # once for the whole run, both prompts, both guidance halves, every step
    ours = torch.stack([torch.from_numpy(np.asarray(Image.open(p))) for p in paths]).float() / 255

    pipeline = StableDiffusionAdapterPipeline(
        **{k: v for k, v in backbone.to_pipeline().components.items() if k != "image_encoder"},
        adapter=adapter.t2i_adapter,
    )
    pipeline.scheduler = make_scheduler(cfg.scheduler, backbone.noise_scheduler.config)
    pipeline.set_progress_bar_config(disable=True)
    theirs = pipeline(
        PROMPTS,
        image=[Image.open(tmp_path / "mask.png")] * 2,
        height=64,
        width=64,
        num_inference_steps=cfg.num_inference_steps,
        guidance_scale=cfg.guidance_scale,
        adapter_conditioning_scale=0.8,
        generator=torch.Generator().manual_seed(cfg.seed),
        output_type="np",
    ).images
    theirs = torch.from_numpy(theirs * 255).round() / 255
    # both through 8-bit rounding: at most one level apart where a float sits on a rounding boundary
    assert (ours - theirs).abs().max() <= 1 / 255 + 1e-6
