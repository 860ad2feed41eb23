"""The adapter contract on ControlNet: zero init, what trains, save/load, shapes and errors."""

from __future__ import annotations

import pytest
import torch
from diffusers import ControlNetModel

from adapters import AdapterFormatError, ControlNetAdapter
from adapters.base import UNET_FORWARD_ARGUMENTS
from adapters.controlnet import DECODER_WEIGHTS_NAME, hint_channels_for


def dummy_inputs(backbone, batch_size: int = 2, image_size: int = 64, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    latent = image_size // backbone.vae_scale_factor
    return {
        "condition": torch.rand(batch_size, 3, image_size, image_size, generator=generator),
        "noisy_latents": torch.randn(batch_size, 4, latent, latent, generator=generator),
        "timesteps": torch.randint(0, 1000, (batch_size,), generator=generator),
        "encoder_hidden_states": torch.randn(batch_size, 32, 64, generator=generator),
    }


def adapter_kwargs(adapter, inputs: dict) -> dict:
    return adapter(
        inputs["condition"],
        noisy_latents=inputs["noisy_latents"],
        timesteps=inputs["timesteps"],
        encoder_hidden_states=inputs["encoder_hidden_states"],
    )


def unet_output(backbone, inputs: dict, adapter=None) -> torch.Tensor:
    kwargs = {} if adapter is None else adapter_kwargs(adapter, inputs)
    with torch.no_grad():
        return backbone.unet(
            inputs["noisy_latents"], inputs["timesteps"], inputs["encoder_hidden_states"], **kwargs
        ).sample


def randomize_zero_convs(adapter: ControlNetAdapter, seed: int = 1) -> None:
    """Give the zero convolutions non-zero weights, as training would, so residuals are not all zero."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in adapter.controlnet.named_parameters():
            if "controlnet_down_blocks" in name or "controlnet_mid_block" in name or "conv_out" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)


def test_returned_keys_are_unet_forward_arguments(tiny_backbone):
    adapter = ControlNetAdapter.from_unet(tiny_backbone.unet, vae_scale_factor=tiny_backbone.vae_scale_factor)
    inputs = dummy_inputs(tiny_backbone)
    kwargs = adapter_kwargs(adapter, inputs)
    assert set(kwargs) == {"down_block_additional_residuals", "mid_block_additional_residual"}
    assert set(kwargs) <= UNET_FORWARD_ARGUMENTS


def test_zero_initialised_controlnet_leaves_unet_output_unchanged(tiny_backbone):
    adapter = ControlNetAdapter.from_unet(tiny_backbone.unet, vae_scale_factor=tiny_backbone.vae_scale_factor)
    inputs = dummy_inputs(tiny_backbone)
    torch.testing.assert_close(
        unet_output(tiny_backbone, inputs, adapter), unet_output(tiny_backbone, inputs), rtol=0, atol=0
    )
    randomize_zero_convs(adapter)  # the check above must be able to fail
    assert not torch.equal(unet_output(tiny_backbone, inputs, adapter), unet_output(tiny_backbone, inputs))


def test_only_adapter_parameters_require_grad(tiny_backbone):
    adapter = ControlNetAdapter.from_unet(tiny_backbone.unet, vae_scale_factor=tiny_backbone.vae_scale_factor)
    assert not any(p.requires_grad for p in tiny_backbone.parameters())
    assert all(p.requires_grad for p in adapter.parameters())
    groups = adapter.param_groups(1e-4)
    assert len(groups) == 1 and groups[0]["lr"] == 1e-4
    assert sum(p.numel() for p in groups[0]["params"]) == sum(p.numel() for p in adapter.controlnet.parameters())


def test_unlocked_decoder_trains_at_its_own_rate(tiny_backbone):
    adapter = ControlNetAdapter.from_unet(
        tiny_backbone.unet, vae_scale_factor=4, unlock_unet_decoder=True, decoder_learning_rate=2e-6
    )
    trainable_unet = {name for name, p in tiny_backbone.unet.named_parameters() if p.requires_grad}
    assert trainable_unet and all(
        name.startswith(("up_blocks", "conv_norm_out", "conv_out")) for name in trainable_unet
    )
    assert not any(p.requires_grad for p in tiny_backbone.unet.down_blocks.parameters())
    controlnet_group, decoder_group = adapter.param_groups(1e-4)
    assert decoder_group["lr"] == 2e-6 and controlnet_group["lr"] == 1e-4
    assert {id(p) for p in decoder_group["params"]} == {id(p) for p in tiny_backbone.unet.up_blocks.parameters()} | {
        id(p) for p in tiny_backbone.unet.conv_norm_out.parameters()
    } | {id(p) for p in tiny_backbone.unet.conv_out.parameters()}


def test_only_mid_control_passes_zero_skip_residuals(tiny_backbone):
    adapter = ControlNetAdapter.from_unet(tiny_backbone.unet, vae_scale_factor=4, only_mid_control=True)
    randomize_zero_convs(adapter)
    inputs = dummy_inputs(tiny_backbone)
    kwargs = adapter_kwargs(adapter, inputs)
    assert all(torch.count_nonzero(r) == 0 for r in kwargs["down_block_additional_residuals"])
    assert torch.count_nonzero(kwargs["mid_block_additional_residual"]) > 0


def test_save_load_round_trip_gives_identical_outputs(tiny_backbone, tmp_path):
    adapter = ControlNetAdapter.from_unet(tiny_backbone.unet, vae_scale_factor=4)
    randomize_zero_convs(adapter)
    adapter.save_pretrained(tmp_path / "cn")
    inputs = dummy_inputs(tiny_backbone)
    reloaded = ControlNetAdapter.from_pretrained(tmp_path / "cn")
    torch.testing.assert_close(
        unet_output(tiny_backbone, inputs, reloaded), unet_output(tiny_backbone, inputs, adapter), rtol=0, atol=0
    )
    # The folder is a plain diffusers ControlNetModel.
    diffusers_model = ControlNetModel.from_pretrained(tmp_path / "cn")
    for name, tensor in adapter.controlnet.state_dict().items():
        assert torch.equal(diffusers_model.state_dict()[name], tensor), name


def test_unlocked_decoder_round_trips_into_the_unet(tiny_backbone, tmp_path):
    adapter = ControlNetAdapter.from_unet(tiny_backbone.unet, vae_scale_factor=4, unlock_unet_decoder=True)
    with torch.no_grad():
        tiny_backbone.unet.conv_out.weight.add_(1.0)
    adapter.save_pretrained(tmp_path / "cn")
    assert (tmp_path / "cn" / DECODER_WEIGHTS_NAME).is_file()
    from lightning_modules.backbone import build_tiny_backbone

    fresh = build_tiny_backbone(seed=0)
    with pytest.raises(AdapterFormatError, match="pass the base unet"):
        ControlNetAdapter.from_pretrained(tmp_path / "cn")
    ControlNetAdapter.from_pretrained(tmp_path / "cn", unet=fresh.unet)
    assert torch.equal(fresh.unet.conv_out.weight, tiny_backbone.unet.conv_out.weight)


def test_condition_of_the_wrong_size_is_named(tiny_backbone):
    adapter = ControlNetAdapter.from_unet(tiny_backbone.unet, vae_scale_factor=4)
    inputs = dummy_inputs(tiny_backbone)
    with pytest.raises(ValueError, match=r"condition has shape \(2, 3, 32, 32\); expected \(B, 3, 64, 64\)"):
        adapter(
            inputs["condition"][..., :32, :32],
            noisy_latents=inputs["noisy_latents"],
            timesteps=inputs["timesteps"],
            encoder_hidden_states=inputs["encoder_hidden_states"],
        )


@pytest.mark.parametrize(("factor", "channels"), [(1, (16,)), (4, (16, 32, 96)), (8, (16, 32, 96, 256))])
def test_hint_encoder_matches_the_vae_factor(tiny_backbone, factor, channels):
    assert hint_channels_for(factor) == channels


def test_hint_encoder_rejects_unsupported_factors():
    with pytest.raises(ValueError, match="vae_scale_factor must be 1, 2, 4 or 8"):
        hint_channels_for(3)


def test_loading_something_else_is_a_clear_error(tmp_path):
    with pytest.raises(AdapterFormatError, match="not a diffusers ControlNetModel folder"):
        ControlNetAdapter.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text('{"_class_name": "ControlNetModel"}')
    (tmp_path / "diffusion_pytorch_model.safetensors").write_bytes(b"garbage")
    with pytest.raises(AdapterFormatError, match="cannot load a ControlNetModel from"):
        ControlNetAdapter.from_pretrained(tmp_path)
