"""Step 0 of a zero-initialized adapter reuses the base model's samples and scores, and only when that is exact."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import open_dict

from lightning_modules.callbacks import controllability
from lightning_modules.callbacks.base_model import adapter_is_inert, base_model_key
from lightning_modules.callbacks.samples import generate_in_eval_mode
from lightning_modules.commands.train import train

GLIGEN = ["condition=boxes", "adapter.build.max_objects=4"]


def build_system(cfg):
    backbone = instantiate(cfg.model)
    adapter = instantiate(cfg.adapter.build)(backbone.unet, vae_scale_factor=backbone.vae_scale_factor)
    system = instantiate(cfg.system, backbone=backbone, adapter=adapter)
    datamodule = instantiate(cfg.data, extractor=instantiate(cfg.condition.extractor), _convert_="all")
    return system, datamodule


@pytest.mark.parametrize(
    ("overrides", "inert"),
    [
        (["adapter=controlnet"], True),
        (["adapter=controlnet_xs"], True),
        (["adapter=gligen", *GLIGEN], True),
        (["adapter=t2i_adapter"], False),
    ],
)
def test_an_inert_adapter_samples_exactly_as_the_base_model(make_train_config, overrides, inert):
    system, datamodule = build_system(make_train_config(*overrides))
    batch = datamodule.fixed_batch(2)
    assert adapter_is_inert(system, batch) is inert
    sampling = {"num_inference_steps": 2, "guidance_scale": 7.5, "scheduler": "unipc", "seed": 0}
    with_adapter = generate_in_eval_mode(system, batch, sampling)
    without = generate_in_eval_mode(system, batch, sampling, use_adapter=False)
    assert torch.equal(with_adapter, without) is inert  # what the reuse relies on, checked on the images


def test_a_trained_adapter_is_not_inert(make_train_config, tmp_path):
    cfg = make_train_config("trainer.max_steps=1", "optimizer=sgd", "adapter.learning_rate=1.0")
    _, objects = train(cfg)
    assert not adapter_is_inert(objects["system"], objects["datamodule"].fixed_batch(2))


def test_step_zero_reuses_the_base_model_and_matches_what_generating_gives(make_train_config, tmp_path, monkeypatch):
    """The reused step 0 (grid PNG and scores) equals the one generated with the adapter, on the first run (base
    samples generated without the adapter and kept) and the second (read back)."""

    def run(name: str, reuse: bool) -> tuple[dict, bytes]:
        overrides = ["trainer.max_steps=1", "callbacks.sample_grid.every_n_steps=0"]
        if reuse:
            overrides.append(f"callbacks.sample_grid.base_cache_dir={tmp_path / 'base'}")
        cfg = make_train_config(*overrides)
        with open_dict(cfg):
            cfg.paths.output_dir = str(tmp_path / name)
        with monkeypatch.context() as patch:
            if not reuse:  # the reference: step 0 generated with the adapter, as before the reuse
                patch.setattr(controllability, "adapter_is_inert", lambda *args: False)
            train(cfg)
        summary = json.loads((tmp_path / name / "controllability.json").read_text())
        return summary, (tmp_path / name / "samples" / "step_000000.png").read_bytes()

    reference, reference_grid = run("reference", reuse=False)
    first, first_grid = run("first", reuse=True)  # base samples generated, kept
    second, second_grid = run("second", reuse=True)  # read back
    assert len(list((tmp_path / "base").glob("*.safetensors"))) == 1
    assert first_grid == reference_grid == second_grid
    step0 = {key: value for key, value in reference["curve"][0].items() if key != "step"}
    assert first["curve"][0] == reference["curve"][0] == second["curve"][0]
    assert step0 == reference["base_without_adapter"]


def test_the_base_model_key_of_a_gligen_run_leaves_out_its_layers_in_the_unet(make_train_config):
    """GLIGEN's gated layers (0-dim gates included) live inside the UNet: the base model's key is computable and
    is the same whatever they hold, so the base model's samples and scores are shared across GLIGEN runs."""
    system, datamodule = build_system(make_train_config("adapter=gligen", *GLIGEN))
    batch = datamodule.fixed_batch(2)
    trainer = SimpleNamespace(precision="32-true")
    key = base_model_key(trainer, system, batch, {"num_inference_steps": 2})
    with torch.no_grad():
        for fuser in system.adapter.fusers:
            fuser.alpha_attn.fill_(0.5)
        system.adapter.position_net.null_position_feature.normal_()
    assert base_model_key(trainer, system, batch, {"num_inference_steps": 2}) == key
    # the base model's own weights are in it
    with torch.no_grad():
        next(system.backbone.unet.conv_in.parameters()).add_(1.0)
    assert base_model_key(trainer, system, batch, {"num_inference_steps": 2}) != key
