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
