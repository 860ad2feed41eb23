"""Our writer of the original LDM key layout is the exact inverse of diffusers' reader."""

import torch
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

from adapters.ldm_layout import UNET_PREFIX, VAE_PREFIX, unet_to_ldm, vae_to_ldm


def assert_same_state(converted: dict, original: dict) -> None:
    assert set(converted) == set(original)
    for name, tensor in original.items():
        assert torch.equal(converted[name], tensor), name


def test_unet_round_trips_through_diffusers_reader(tiny_backbone):
    ldm = unet_to_ldm(tiny_backbone.unet.state_dict(), tiny_backbone.unet.config)
    assert all(key.startswith(UNET_PREFIX) for key in ldm)
    assert f"{UNET_PREFIX}input_blocks.0.0.weight" in ldm and f"{UNET_PREFIX}middle_block.1.proj_in.weight" in ldm
    assert_same_state(convert_ldm_unet_checkpoint(ldm, tiny_backbone.unet.config), tiny_backbone.unet.state_dict())


def test_vae_round_trips_through_diffusers_reader(tiny_backbone):
    ldm = vae_to_ldm(tiny_backbone.vae.state_dict(), tiny_backbone.vae.config)
    assert ldm[f"{VAE_PREFIX}encoder.mid.attn_1.q.weight"].ndim == 4  # LDM uses 1x1 convolutions there
    assert_same_state(convert_ldm_vae_checkpoint(ldm, tiny_backbone.vae.config), tiny_backbone.vae.state_dict())
