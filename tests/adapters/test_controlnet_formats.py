"""ControlNet weight formats: the original single-file layout written and read, format detection, clear errors."""

from __future__ import annotations

import pytest
import torch
from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint
from safetensors.torch import load_file, save_file

from adapters import AdapterFormatError, ControlNetAdapter
from adapters.controlnet_formats import CONTROL_PREFIX, load_controlnet, save_controlnet_single_file
from tests.adapters.test_adapters import adapter_kwargs, dummy_inputs, randomize_zero_convs


@pytest.fixture
def trained_controlnet(tiny_backbone) -> ControlNetAdapter:
    adapter = ControlNetAdapter.from_unet(tiny_backbone.unet, vae_scale_factor=tiny_backbone.vae_scale_factor)
    randomize_zero_convs(adapter)
    return adapter


def assert_same_outputs(first: ControlNetAdapter, second: ControlNetAdapter, backbone) -> None:
    inputs = dummy_inputs(backbone)
    with torch.no_grad():
        a, b = adapter_kwargs(first, inputs), adapter_kwargs(second, inputs)
    assert torch.equal(a["mid_block_additional_residual"], b["mid_block_additional_residual"])
    assert all(
        torch.equal(x, y) for x, y in zip(a["down_block_additional_residuals"], b["down_block_additional_residuals"])
    )
    assert torch.count_nonzero(a["mid_block_additional_residual"]) > 0  # the comparison can fail


def test_original_single_file_round_trip_gives_identical_outputs(tmp_path, tiny_backbone, trained_controlnet):
    path = tmp_path / "control_tiny_canny.safetensors"
    save_controlnet_single_file(trained_controlnet.controlnet, path)
    keys = load_file(str(path)).keys()
    assert all(key.startswith(CONTROL_PREFIX) for key in keys)
    # the tiny model's f=4 VAE gives a 4-conv hint encoder: conv_out sits at input_hint_block.6, not SD's .14
    assert {f"{CONTROL_PREFIX}input_hint_block.6.weight", f"{CONTROL_PREFIX}zero_convs.0.0.weight"} <= set(keys)
    loaded, found = load_controlnet(path, tiny_backbone.unet)
    assert found == "original"
    assert_same_outputs(trained_controlnet, loaded, tiny_backbone)


def test_writer_matches_diffusers_reader_on_the_sd_hint_encoder(tiny_backbone):
    """With SD's f=8 hint encoder (conv_out at input_hint_block.14) diffusers' own converter reads what we write."""
    adapter = ControlNetAdapter.from_unet(tiny_backbone.unet, vae_scale_factor=8)
    randomize_zero_convs(adapter)
    ours = adapter.controlnet.state_dict()
    from adapters.controlnet_formats import controlnet_key_to_ldm

    original = {CONTROL_PREFIX + controlnet_key_to_ldm(k, adapter.controlnet.config): v for k, v in ours.items()}
    converted = convert_controlnet_checkpoint(original, adapter.controlnet.config)
    assert set(converted) == set(ours)
    assert all(torch.equal(converted[key], ours[key]) for key in ours)


def test_pth_with_state_dict_wrapper_and_diffusers_weights_file_load(tmp_path, tiny_backbone, trained_controlnet):
    original = tmp_path / "control.safetensors"
    save_controlnet_single_file(trained_controlnet.controlnet, original)
    wrapped = tmp_path / "control.pth"  # as the original training code saves: {"state_dict": {...}}
    torch.save({"state_dict": load_file(str(original))}, wrapped)
    loaded, found = load_controlnet(wrapped, tiny_backbone.unet)
    assert found == "original"
    assert_same_outputs(trained_controlnet, loaded, tiny_backbone)

    weights_only = tmp_path / "diffusion_pytorch_model.safetensors"
    save_file({k: v.contiguous() for k, v in trained_controlnet.controlnet.state_dict().items()}, str(weights_only))
    loaded, found = load_controlnet(weights_only, tiny_backbone.unet)
    assert found == "diffusers-weights"
    assert_same_outputs(trained_controlnet, loaded, tiny_backbone)

    folder = tmp_path / "folder"
    trained_controlnet.save_pretrained(folder)
    loaded, found = load_controlnet(folder, tiny_backbone.unet)
    assert found == "diffusers"
    assert_same_outputs(trained_controlnet, loaded, tiny_backbone)


def test_corrupted_and_foreign_checkpoints_name_the_file_and_the_formats(tmp_path, tiny_backbone, trained_controlnet):
    corrupted = tmp_path / "broken.safetensors"
    save_controlnet_single_file(trained_controlnet.controlnet, corrupted)
    corrupted.write_bytes(corrupted.read_bytes()[:1000])
    with pytest.raises(
        AdapterFormatError, match=r"cannot read .*broken\.safetensors.*tried: diffusers folder"
    ) as error:
        load_controlnet(corrupted, tiny_backbone.unet)
    assert "\n" not in str(error.value)

    foreign = tmp_path / "vae.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_backbone.vae.state_dict().items()}, str(foreign))
    with pytest.raises(AdapterFormatError, match=r"vae\.safetensors is not a ControlNet checkpoint.*original single"):
        load_controlnet(foreign, tiny_backbone.unet)

    with pytest.raises(AdapterFormatError, match=r"missing\.safetensors not found; expected one of"):
        load_controlnet(tmp_path / "missing.safetensors", tiny_backbone.unet)


def test_a_pickle_that_needs_code_is_refused(tmp_path, tiny_backbone):
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {}, "callback": print}, path)  # a function: weights_only cannot rebuild it
    with pytest.raises(AdapterFormatError, match=r"refused to load .*evil\.pth.*arbitrary code"):
        load_controlnet(path, tiny_backbone.unet)


def test_weights_for_another_base_are_rejected_by_name(tmp_path, tiny_backbone, trained_controlnet):
    path = tmp_path / "control.safetensors"
    save_controlnet_single_file(trained_controlnet.controlnet, path)
    state = load_file(str(path))
    state[f"{CONTROL_PREFIX}input_blocks.99.0.in_layers.0.weight"] = torch.zeros(1)
    save_file(state, str(path))
    with pytest.raises(AdapterFormatError, match=r"control\.safetensors: 1 original ControlNet keys do not fit"):
        load_controlnet(path, tiny_backbone.unet)
