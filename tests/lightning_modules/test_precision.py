"""Mixed precision: frozen weights in the compute dtype, trained weights fp32, on this CPU in bf16."""

from __future__ import annotations

import pytest
import torch

from lightning_modules.commands.train import train
from lightning_modules.errors import CtrlkitError


@pytest.mark.parametrize("adapter", ["controlnet", "gligen"])
def test_bf16_mixed_trains_with_frozen_weights_in_bf16_and_the_adapter_in_fp32(make_train_config, adapter):
    overrides = ["trainer.precision=bf16-mixed", "trainer.max_steps=2", f"adapter={adapter}"]
    if adapter == "gligen":
        overrides += ["condition=boxes", "adapter.build.max_objects=4", "adapter.build.export_unet=false"]
    metrics, objects = train(make_train_config(*overrides))
    system = objects["system"]
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))
    trainable = [p for p in system.adapter.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    frozen = [p for p in system.backbone.parameters() if not p.requires_grad]
    assert frozen and all(p.dtype == torch.bfloat16 for p in frozen)
    assert system.backbone.unet.conv_in.weight.dtype == torch.bfloat16


def test_vae_dtype_keeps_the_vae_in_fp32(make_train_config):
    cfg = make_train_config("trainer.precision=bf16-mixed", "trainer.max_steps=1", "model.vae_dtype=float32")
    metrics, objects = train(cfg)
    backbone = objects["system"].backbone
    assert all(p.dtype == torch.float32 for p in backbone.vae.parameters())
    assert backbone.text_encoder.dtype == torch.bfloat16


def test_a_true_half_precision_run_stops_with_one_line(make_train_config):
    with pytest.raises(CtrlkitError, match=r"trainable weights are bfloat16; they must stay float32"):
        train(make_train_config("trainer.precision=bf16-true", "trainer.max_steps=1"))


@pytest.mark.parametrize("adapter", ["controlnet", "t2i_adapter", "gligen"])
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(make_train_config, adapter):
    """Recomputed activations are the same computation: loss and gradients equal to 1e-6 (float32 on one CPU)."""
    from hydra.utils import instantiate

    overrides = [f"adapter={adapter}"] + (
        ["condition=boxes", "adapter.build.max_objects=4"] if adapter == "gligen" else []
    )
    cfg = make_train_config(*overrides)
    results = []
    for checkpointing in (False, True):
        backbone = instantiate(cfg.model)
        system = instantiate(
            cfg.system, backbone=backbone, adapter=instantiate(cfg.adapter.build)(backbone.unet, vae_scale_factor=4)
        )
        if checkpointing:
            backbone.unet.enable_gradient_checkpointing()
            system.adapter.enable_gradient_checkpointing()
        datamodule = instantiate(cfg.data, extractor=instantiate(cfg.condition.extractor), _convert_="all")
        batch = datamodule.fixed_batch(2)
        torch.manual_seed(0)
        loss = system.compute_loss(batch, generator=torch.Generator().manual_seed(0))
        loss.backward()
        grads = torch.cat([p.grad.flatten() for p in system.adapter.trainable_parameters() if p.grad is not None])
        results.append((loss.detach(), grads))
    assert torch.allclose(results[0][0], results[1][0], atol=1e-6)
    assert torch.allclose(results[0][1], results[1][1], atol=1e-6) and results[0][1].abs().sum() > 0
    assert backbone.unet.is_gradient_checkpointing


def test_attention_runs_through_sdpa(tiny_backbone):
    from adapters import ControlNetAdapter
    from lightning_modules.precision import check_sdpa_attention

    adapter = ControlNetAdapter.from_unet(tiny_backbone.unet, vae_scale_factor=4)
    assert check_sdpa_attention({"unet": tiny_backbone.unet, "adapter": adapter}) == {}
    from diffusers.models.attention_processor import AttnProcessor

    tiny_backbone.unet.set_attn_processor(AttnProcessor())  # the slow path: found and named
    assert check_sdpa_attention({"unet": tiny_backbone.unet}) == {"unet": {"AttnProcessor"}}


def test_optimizer_groups_build_what_they_name(make_train_config):
    from hydra.utils import instantiate

    from lightning_modules.optimizers import adamw

    parameter = torch.nn.Parameter(torch.zeros(3))
    optimizer = instantiate(make_train_config().optimizer)([{"params": [parameter], "lr": 1e-3}])
    assert isinstance(optimizer, torch.optim.AdamW) and optimizer.defaults["weight_decay"] == 0.01
    assert not optimizer.defaults["fused"]  # on a CPU: the plain implementation, as torch's default
    assert adamw([{"params": [parameter], "lr": 1e-3}]).defaults["betas"] == (0.9, 0.999)


def test_8bit_adam_says_what_it_needs(make_train_config):
    with pytest.raises(CtrlkitError, match=r"optimizer=adamw8bit (needs bitsandbytes|keeps 8-bit states on a CUDA)"):
        train(make_train_config("optimizer=adamw8bit", "trainer.max_steps=1"))


@pytest.mark.slow
def test_sd15_architecture_controlnet_trains_a_step_in_bf16_with_checkpointing(make_train_config):
    """SD1.5 at full size (random weights, no download), 64x64, batch 1, bf16-mixed + gradient checkpointing, the
    VAE kept fp32 (``model.vae_dtype``): one step, and the ControlNet's weights stay fp32. About 75 s and 8.5 GB on
    a CPU with native bf16 (AVX512-BF16/AMX); ~50x slower per bf16 matmul on an AVX2-only CPU."""
    cfg = make_train_config(
        "model=sd15_random",
        "model.vae_dtype=float32",
        "data.image_size=64",
        "data.batch_size=1",
        "data.val_size=1",
        "trainer.precision=bf16-mixed",
        "system.gradient_checkpointing=true",
        "trainer.max_steps=1",
        "+trainer.limit_val_batches=0",
        "callbacks.sample_grid.every_n_steps=0",
        "callbacks.sample_grid.num_samples=1",
        "callbacks.sample_grid.num_inference_steps=1",
        "callbacks.controllability.every_n_steps=0",
        "callbacks.controllability.num_samples=1",
        "callbacks.controllability.num_inference_steps=1",
    )
    metrics, objects = train(cfg)
    system = objects["system"]
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))
    assert all(p.dtype == torch.float32 for p in system.adapter.parameters() if p.requires_grad)
    assert system.backbone.unet.dtype == torch.bfloat16 and system.backbone.unet.is_gradient_checkpointing
    assert system.backbone.vae.dtype == torch.float32 and system.backbone.text_encoder.dtype == torch.bfloat16


@pytest.mark.slow
def test_compiled_blocks_give_the_same_output(tiny_backbone):
    """``system.compile``: the UNet's and the ControlNet's blocks compiled one by one, the same prediction."""
    from adapters import ControlNetAdapter
    from lightning_modules.precision import compile_repeated_blocks

    adapter = ControlNetAdapter.from_unet(tiny_backbone.unet, vae_scale_factor=4)
    generator = torch.Generator().manual_seed(0)
    latents, states = torch.randn(2, 4, 16, 16, generator=generator), torch.randn(2, 32, 64, generator=generator)
    condition = torch.rand(2, 3, 64, 64, generator=generator)

    def predict():
        with torch.no_grad():
            timestep = torch.tensor(500)
            kwargs = adapter(condition, noisy_latents=latents, timesteps=timestep, encoder_hidden_states=states)
            return tiny_backbone.unet(latents, 500, states, **kwargs).sample

    expected = predict()
    assert compile_repeated_blocks(tiny_backbone.unet) == 7 and compile_repeated_blocks(adapter) == 4
    assert torch.allclose(predict(), expected, atol=1e-5)


@pytest.mark.slow
def test_a_compiled_run_trains_compiled_and_validates_eager(make_train_config, monkeypatch):
    """``system.compile=true`` through a whole run (validation, sample grid, controllability, export): the blocks
    run compiled in training steps and eager elsewhere, where every other batch size and grad mode would be another
    graph (before: recompiles past dynamo's limit, then an inductor error on dynamic shapes ended the run)."""
    from torch._dynamo import eval_frame  # its _stance is replaced on each change: read it at call time
    from torch._dynamo.utils import counters

    from lightning_modules.backbone import Backbone
    from lightning_modules.system import AdapterTrainingSystem

    seen = {"training": set(), "validation": set(), "sampling": set()}
    compute_loss, validation_step = AdapterTrainingSystem.compute_loss, AdapterTrainingSystem.validation_step
    generate = Backbone.generate

    def generate_seen(self, *args, **kwargs):
        seen["sampling"].add(eval_frame._stance.stance)
        return generate(self, *args, **kwargs)

    def compute_loss_seen(self, *args, **kwargs):
        seen["training" if self.training else "validation"].add(eval_frame._stance.stance)
        return compute_loss(self, *args, **kwargs)

    def validation_step_seen(self, *args, **kwargs):
        seen["validation"].add(eval_frame._stance.stance)
        return validation_step(self, *args, **kwargs)

    monkeypatch.setattr(AdapterTrainingSystem, "compute_loss", compute_loss_seen)
    monkeypatch.setattr(AdapterTrainingSystem, "validation_step", validation_step_seen)
    monkeypatch.setattr(Backbone, "generate", generate_seen)
    counters.clear()
    cfg = make_train_config("system.compile=true", "trainer.max_steps=2", "trainer.val_check_interval=2")
    metrics, _ = train(cfg)
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))
    assert seen == {"training": {"default"}, "validation": {"force_eager"}, "sampling": {"force_eager"}}
    assert counters["stats"]["unique_graphs"] > 0  # the blocks did compile
    assert eval_frame._stance.stance == "default"  # given back after the run

    def compute_loss_fails(self, *args, **kwargs):
        raise RuntimeError("a step that fails")

    monkeypatch.setattr(AdapterTrainingSystem, "compute_loss", compute_loss_fails)
    with pytest.raises(RuntimeError, match="a step that fails"):
        train(make_train_config("system.compile=true", "trainer.max_steps=2"))
    assert eval_frame._stance.stance == "default"  # and after a run that raised
