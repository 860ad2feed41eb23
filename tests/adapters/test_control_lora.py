"""Control-LoRA: a small file, exact reload onto its own base only, LoRA weights that train on a frozen copy, and a
merged export that diffusers loads as a plain ControlNet."""

from __future__ import annotations

import sys

import pytest
import torch
from diffusers import ControlNetModel, UNet2DConditionModel
from hydra.utils import instantiate

from adapters.base import AdapterFormatError
from adapters.control_lora import FULLY_TRAINED, MERGED_FOLDER, WEIGHTS_NAME, ControlLoraAdapter, PeftMissingError
from adapters.controlnet import ControlNetAdapter
from adapters.registry import load_adapter
from lightning_modules.backbone import build_tiny_backbone, load_tiny_backbone
from tests.adapters.test_adapter_contract import image_condition, perturb, unet_inputs, unet_output


def configured_control_lora(make_train_config, unet) -> ControlLoraAdapter:
    """The adapter ``ctrlkit train adapter=control_lora`` builds (conf/adapter/control_lora.yaml's settings)."""
    cfg = make_train_config("adapter=control_lora")
    return instantiate(cfg.adapter.build, _convert_="all")(unet, vae_scale_factor=4)


def test_saved_file_is_at_most_15_percent_of_a_controlnet_on_the_shipped_tiny_model(make_train_config, tmp_path):
    unet = load_tiny_backbone().unet
    control_lora = configured_control_lora(make_train_config, unet)
    control_lora.save_pretrained(tmp_path / "control_lora")
    controlnet = ControlNetAdapter.from_unet(unet, vae_scale_factor=4)
    controlnet.save_pretrained(tmp_path / "controlnet")
    small = (tmp_path / "control_lora" / WEIGHTS_NAME).stat().st_size
    full = (tmp_path / "controlnet" / "diffusion_pytorch_model.safetensors").stat().st_size
    # the floor at any rank: the hint encoder and zero convolutions, saved whole (13.0% on the tiny model)
    fully_trained = sum(parameter.numel() for parameter in control_lora.fully_trained_parameters())
    floor = fully_trained / sum(parameter.numel() for parameter in controlnet.parameters())
    print(
        f"Control-LoRA rank {control_lora.rank}: {small} bytes, ControlNet {full} bytes: ratio {small / full:.4f} "
        f"(hint encoder + zero convolutions alone: {floor:.4f} of the ControlNet's parameters)"
    )
    assert small / full <= 0.15
    lora = sum(parameter.numel() for parameter in control_lora.lora_parameters())
    assert lora > 0 and small > (fully_trained + lora) * 4  # all in fp32, plus the safetensors header


def test_reload_gives_identical_outputs_and_the_merged_folder_is_a_diffusers_controlnet(tmp_path):
    unet = load_tiny_backbone().unet
    adapter = ControlLoraAdapter.from_unet(unet, vae_scale_factor=4, rank=2)
    perturb(adapter)  # as training moves them: LoRA A and B, zero convolutions, hint encoder
    condition, inputs = image_condition(2), unet_inputs()
    expected = unet_output(unet, adapter, condition, inputs)
    adapter.save_pretrained(tmp_path / "saved")

    loaded, found = load_adapter(tmp_path / "saved", load_tiny_backbone().unet)
    assert isinstance(loaded, ControlLoraAdapter) and found == "Control-LoRA, Control-LoRA folder"
    assert loaded.rank == 2
    assert torch.equal(unet_output(unet, loaded, condition, inputs), expected)

    # the LoRA merged into the copy: a ControlNetModel folder that diffusers (and ctrlkit, as a ControlNet) loads
    merged = ControlNetModel.from_pretrained(tmp_path / "saved" / MERGED_FOLDER)
    merged_output = unet_output(unet, ControlNetAdapter(merged), condition, inputs)
    assert torch.allclose(merged_output, expected, atol=1e-5)
    as_controlnet, _ = load_adapter(tmp_path / "saved" / MERGED_FOLDER, unet)
    assert type(as_controlnet) is ControlNetAdapter


def test_lora_weights_train_and_the_frozen_copy_does_not():
    unet = build_tiny_backbone().unet
    adapter = ControlLoraAdapter.from_unet(unet, vae_scale_factor=4, rank=2)
    lora = {name: p for name, p in adapter.controlnet.named_parameters() if ".lora_" in name}
    frozen = {name: p for name, p in adapter.controlnet.named_parameters() if not p.requires_grad}
    assert lora and all(p.requires_grad for p in lora.values())
    assert all(not name.startswith(FULLY_TRAINED) and ".lora_" not in name for name in frozen)
    frozen_before = {name: p.detach().clone() for name, p in frozen.items()}
    lora_before = {name: p.detach().clone() for name, p in lora.items()}
    optimizer = torch.optim.AdamW(adapter.param_groups(1e-3))
    inputs = unet_inputs()
    # step 1 moves the zero convolutions, step 2 LoRA B (A reads x, B is 0), step 3 finds a gradient everywhere
    for _ in range(3):
        optimizer.zero_grad()
        kwargs = adapter(image_condition(2), **inputs)
        prediction = unet(inputs["noisy_latents"], inputs["timesteps"], inputs["encoder_hidden_states"], **kwargs)
        prediction.sample.pow(2).mean().backward()
        optimizer.step()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora.values())
    assert all(not torch.equal(p, lora_before[name]) for name, p in lora.items())
    assert all(p.grad is None and torch.equal(p, frozen_before[name]) for name, p in frozen.items())
    # the frozen copy is the UNet's encoder
    copied = adapter.controlnet.down_blocks[0].resnets[0].conv1.base_layer.weight
    assert torch.equal(copied, unet.down_blocks[0].resnets[0].conv1.weight)
    assert not any(p.requires_grad for p in unet.parameters())


def test_param_groups_give_lora_weights_their_own_learning_rate():
    adapter = ControlLoraAdapter.from_unet(build_tiny_backbone().unet, vae_scale_factor=4, lora_learning_rate_scale=5)
    full, lora = adapter.param_groups(1e-3)
    assert full["lr"] == 1e-3 and lora["lr"] == pytest.approx(5e-3)
    assert {id(p) for p in lora["params"]} == {id(p) for p in adapter.lora_parameters()}


def test_a_load_onto_another_base_is_refused_in_one_line(tmp_path):
    adapter = ControlLoraAdapter.from_unet(build_tiny_backbone(seed=0).unet, vae_scale_factor=4)
    adapter.save_pretrained(tmp_path / "saved")
    other_weights = build_tiny_backbone(seed=1).unet  # same layout, other weights: the rebuilt copy would differ
    with pytest.raises(AdapterFormatError, match=r"saved: the base UNet's encoder weights are not those") as error:
        load_adapter(tmp_path / "saved", other_weights)
    assert "\n" not in str(error.value)
    with pytest.raises(AdapterFormatError, match=r"encoder weights are not those"):
        adapter.check_base(other_weights)
    other_layout = UNet2DConditionModel.from_config({**other_weights.config, "block_out_channels": (32, 64, 128)})
    with pytest.raises(AdapterFormatError, match=r"a Control-LoRA made for a UNet with .*block_out_channels \[32, 64"):
        load_adapter(tmp_path / "saved", other_layout)


def test_the_base_check_accepts_the_same_base_in_half_precision():
    unet = build_tiny_backbone().unet
    adapter = ControlLoraAdapter.from_unet(unet, vae_scale_factor=4)
    for dtype in (torch.float16, torch.bfloat16):
        adapter.check_base(build_tiny_backbone().unet.to(dtype))


def test_without_peft_building_is_a_one_line_error_naming_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)  # `import peft` raises ImportError
    with pytest.raises(PeftMissingError, match=r"needs the peft package.*pip install 'ctrlkit\[lora\]'") as error:
        ControlLoraAdapter.from_unet(build_tiny_backbone().unet, vae_scale_factor=4)
    assert isinstance(error.value, AdapterFormatError)  # the CLI prints it as one line


def test_targets_that_match_no_layer_are_refused():
    with pytest.raises(ValueError, match=r"target_modules \['to_qq'\] match no Linear or Conv2d layer"):
        ControlLoraAdapter.from_unet(build_tiny_backbone().unet, vae_scale_factor=4, target_modules=["to_qq"])


def test_training_checkpoints_leave_out_the_frozen_copy_and_still_load(make_train_config):
    """The frozen copy is rebuilt from the base at every build, so a checkpoint holds only what trains (on SD1.5
    it would otherwise carry a 1.4 GB copy of the encoder); checkpoints that hold it still load. (A killed run's
    bit-for-bit resume: test_resume.py, -m slow.)"""
    from lightning_modules.commands.train import build_system
    from lightning_modules.errors import CtrlkitError

    system = build_system(make_train_config("adapter=control_lora"))[3]
    checkpoint = {"state_dict": system.state_dict()}
    system.on_save_checkpoint(checkpoint)  # what Lightning calls before it writes the file
    trained = {f"adapter.{name}" for name, p in system.adapter.named_parameters() if p.requires_grad}
    frozen = {f"adapter.{name}" for name, p in system.adapter.named_parameters() if not p.requires_grad}
    assert trained and frozen and set(checkpoint["state_dict"]) == trained  # no buffers in this adapter
    system.on_load_checkpoint(checkpoint)  # the new form
    whole = {name: value for name, value in system.state_dict().items() if name.startswith("adapter.")}
    system.on_load_checkpoint({**checkpoint, "state_dict": whole})  # the form before, frozen copy included
    del checkpoint["state_dict"][sorted(trained)[0]]
    with pytest.raises(CtrlkitError, match=r"checkpoint does not match this adapter: 1 missing keys"):
        system.on_load_checkpoint(checkpoint)
