"""SD 2.x bases (issue 20): ``model=sd2`` loads a local SD 2.x pipeline folder or single file, reads the prediction
type from its scheduler config, trains against the velocity of a v-prediction model (the noise of a 2.x-base one),
and ``ctrlkit train`` / ``ctrlkit generate`` run end to end on a tiny random SD 2.x-architecture pipeline
(``tests/conftest.py``: ``sd2_pipeline_dir``), the sampling equal to diffusers' ControlNet pipeline."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from diffusers import ControlNetModel, StableDiffusionControlNetPipeline, UniPCMultistepScheduler
from hydra.utils import instantiate
from PIL import Image
from safetensors.torch import load_file

from adapters import SCHEDULERS, ControlNetAdapter, make_scheduler
from lightning_modules.backbone import load_pretrained_backbone
from lightning_modules.commands.config_checks import check_train_config
from lightning_modules.commands.generate import run_generate
from lightning_modules.commands.train import train
from lightning_modules.step_inputs import randn
from lightning_modules.system import AdapterTrainingSystem
from tests.conftest import compose_train_config
from tests.lightning_modules.commands.test_generate import PROMPTS, compose_generate

STEPS = 4


@pytest.fixture(scope="module")
def sd2_base_dir(sd2_pipeline_dir, tmp_path_factory):
    """The tiny SD 2.x pipeline as a 2.x-base folder: the same weights, an epsilon scheduler config."""
    folder = tmp_path_factory.mktemp("sd2_base") / "pipeline"
    shutil.copytree(sd2_pipeline_dir, folder)
    config_path = folder / "scheduler" / "scheduler_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "prediction_type": "epsilon"}))
    return folder


def test_model_sd2_composes_and_loads_a_v_prediction_folder(make_train_config, sd2_pipeline_dir, no_network):
    cfg = make_train_config("model=sd2", f"model.path={sd2_pipeline_dir}")
    check_train_config(cfg)
    assert cfg.system.learning_rate == 1e-5 and cfg.system.timestep_sampling == "uniform"

    backbone = instantiate(cfg.model)

    assert backbone.noise_scheduler.config.prediction_type == "v_prediction"
    assert backbone.unet.config.use_linear_projection and backbone.unet.config.cross_attention_dim == 32
    assert backbone.text_encoder.config.hidden_act == "gelu"
    assert backbone.encode_prompts(["a red circle"]).shape == (1, 16, 32)
    # every sampler generate and the training callbacks build carries the prediction type
    for name in SCHEDULERS:
        assert make_scheduler(name, backbone.noise_scheduler.config).config.prediction_type == "v_prediction", name


@pytest.mark.parametrize(("folder", "target"), [("sd2_pipeline_dir", "velocity"), ("sd2_base_dir", "noise")])
def test_the_training_target_is_the_velocity_of_a_v_prediction_model(folder, target, request):
    """For the same draws, the target is ``get_velocity(latents, noise, t)`` = sqrt(a_t) noise - sqrt(1 - a_t)
    latents for a 2.x-v folder and the noise for a 2.x-base folder: the folder's scheduler config decides."""
    backbone = load_pretrained_backbone(str(request.getfixturevalue(folder)))
    adapter = ControlNetAdapter.from_unet(backbone.unet, vae_scale_factor=backbone.vae_scale_factor)
    system = AdapterTrainingSystem(backbone, adapter)
    pixels = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1
    batch = {
        "pixel_values": pixels,
        "prompt": ["a red circle", "a blue square"],
        "condition": torch.rand(2, 3, 64, 64),
    }

    inputs = system.training_inputs(batch, generator=torch.Generator().manual_seed(0))

    # the same draws, in the order training_inputs makes them
    generator = torch.Generator().manual_seed(0)
    latents = backbone.encode_images(pixels, generator=generator)
    noise = randn(latents.shape, generator, dtype=latents.dtype)
    timesteps = system.sample_timesteps(2, generator)
    scheduler = backbone.noise_scheduler
    assert torch.equal(inputs.timesteps, timesteps)
    assert torch.equal(inputs.noisy_latents, scheduler.add_noise(latents, noise, timesteps))
    if target == "velocity":
        assert torch.equal(inputs.target, scheduler.get_velocity(latents, noise, timesteps))
        alphas = scheduler.alphas_cumprod[timesteps].view(-1, 1, 1, 1)
        torch.testing.assert_close(inputs.target, alphas.sqrt() * noise - (1 - alphas).sqrt() * latents)
        assert (inputs.target - noise).abs().max() > 0.1  # not the noise: the test can fail
    else:
        assert torch.equal(inputs.target, noise)
    assert torch.isfinite(system.prediction_loss(inputs))


def test_train_on_sd2_exports_a_controlnet_that_generate_samples_as_diffusers(sd2_pipeline_dir, tmp_path):
    run = tmp_path / "run"
    _, objects = train(
        compose_train_config(run, ["model=sd2", f"model.path={sd2_pipeline_dir}", "trainer.max_steps=3"])
    )

    assert objects["trainer"].global_step == 3
    assert objects["backbone"].noise_scheduler.config.prediction_type == "v_prediction"
    exported = ControlNetModel.from_pretrained(run / "adapter")
    assert exported.config.use_linear_projection and exported.config.cross_attention_dim == 32
    assert sorted(path.name for path in (run / "samples").glob("*.png")) == ["step_000000.png", "step_000003.png"]

    edges = (np.random.default_rng(0).random((64, 64)) > 0.9).astype(np.uint8) * 255
    Image.fromarray(np.stack([edges] * 3, axis=-1)).save(tmp_path / "edges.png")
    unit = f"{{adapter: {run / 'adapter'}, condition_image: {tmp_path / 'edges.png'}, scale: 0.8}}"
    cfg = compose_generate(
        tmp_path / "generate",
        "model=sd2",
        f"model.path={sd2_pipeline_dir}",
        f"prompts=[{PROMPTS[0]},{PROMPTS[1]}]",
        f"units=[{unit}]",
        f"num_inference_steps={STEPS}",
    )
    paths = run_generate(cfg)
    ours = np.stack([np.asarray(Image.open(path)) for path in paths]).astype(np.float32) / 255
    assert ours.shape == (2, 64, 64, 3) and (tmp_path / "generate" / "grid.png").is_file()

    backbone = load_pretrained_backbone(str(sd2_pipeline_dir))
    pipeline = StableDiffusionControlNetPipeline(**backbone.to_pipeline().components, controlnet=exported)
    pipeline.set_progress_bar_config(disable=True)
    control = torch.from_numpy(np.stack([edges] * 3)).float()[None].expand(2, -1, -1, -1) / 255

    def diffusers_images(scheduler) -> np.ndarray:
        pipeline.scheduler = scheduler
        return pipeline(
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

    theirs = diffusers_images(make_scheduler("unipc", backbone.noise_scheduler.config))
    # both through 8-bit PNG rounding: at most one level apart where a float sits on a rounding boundary
    assert np.abs(ours - np.round(theirs * 255) / 255).max() <= 1 / 255 + 1e-6
    # read as epsilon, the same model samples something else: the comparison checks the prediction type
    as_epsilon = diffusers_images(
        UniPCMultistepScheduler.from_config(pipeline.scheduler.config, prediction_type="epsilon")
    )
    assert np.abs(ours - as_epsilon).max() > 0.05


def test_a_single_file_sd2_checkpoint_loads_with_its_folder_configs(make_train_config, sd2_pipeline_dir, tmp_path):
    """The tiny SD 2.x weights as one .safetensors in the original layout (OpenCLIP text encoder under
    ``cond_stage_model.model.``, written by ``Backbone.save_single_file``) read back through diffusers'
    ``from_single_file`` to the same weights, with the v-prediction scheduler of the config folder."""
    saved = load_pretrained_backbone(str(sd2_pipeline_dir))
    checkpoint = tmp_path / "tiny-sd2.safetensors"
    saved.save_single_file(checkpoint)
    keys = load_file(checkpoint).keys()
    assert "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight" in keys
    assert not any(key.startswith("cond_stage_model.transformer.") for key in keys)  # not SD1's CLIP layout

    cfg = make_train_config("model=sd2", f"model.path={checkpoint}", f"model.config={sd2_pipeline_dir}")
    loaded = instantiate(cfg.model)

    assert loaded.noise_scheduler.config.prediction_type == "v_prediction"
    for part in ("unet", "vae", "text_encoder"):
        ours, theirs = getattr(saved, part).state_dict(), getattr(loaded, part).state_dict()
        assert ours.keys() == theirs.keys(), part
        for name, tensor in ours.items():
            assert torch.equal(theirs[name], tensor), f"{part}.{name}"
