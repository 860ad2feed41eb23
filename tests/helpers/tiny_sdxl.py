"""A tiny SDXL-architecture pipeline built in code with random weights, as diffusers' own SDXL tests build theirs:
a UNet with SDXL's text-time conditioning (pooled text + micro-conditioning time ids), two CLIP text encoders
(the second with a projection) and their tokenizers, a two-level VAE. Saved with ``save_pretrained`` it is what
``model=sdxl model.path=<folder>`` loads."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

# the two text encoders have different widths, as SDXL's (768 and 1280): a mix-up of the two cannot load silently
TEXT_WIDTH = 32  # text_encoder's hidden size
TEXT_WIDTH_2 = 48  # text_encoder_2's hidden size and projection (the pooled embedding): cross_attention_dim 80
TIME_EMBED = 8  # addition_time_embed_dim: 6 time ids x 8 + pooled 48 = projection_class_embeddings_input_dim 96


def build_tiny_sdxl_pipeline(seed: int = 0) -> StableDiffusionXLPipeline:
    from tests.conftest import build_clip_tokenizer

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64, 128),
        layers_per_block=2,
        sample_size=32,
        in_channels=4,
        out_channels=4,
        # SDXL's layout: a first level without attention, then cross-attention levels
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4, 8),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=TIME_EMBED,
        transformer_layers_per_block=(1, 1, 2),
        projection_class_embeddings_input_dim=6 * TIME_EMBED + TEXT_WIDTH_2,
        cross_attention_dim=TEXT_WIDTH + TEXT_WIDTH_2,
        norm_num_groups=8,
    )
    vae = AutoencoderKL(
        block_out_channels=[32, 64],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
        latent_channels=4,
        norm_num_groups=8,
        scaling_factor=0.13025,  # SDXL's VAE factor
    )
    text_config, text_config_2 = (
        CLIPTextConfig(
            hidden_size=width,
            intermediate_size=37,
            num_attention_heads=4,
            num_hidden_layers=3,
            vocab_size=1000,
            hidden_act="gelu",
            projection_dim=width,
            max_position_embeddings=77,
        )
        for width in (TEXT_WIDTH, TEXT_WIDTH_2)
    )
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1, timestep_spacing="leading"
    )
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=CLIPTextModel(text_config),
        text_encoder_2=CLIPTextModelWithProjection(text_config_2),
        tokenizer=build_clip_tokenizer(16),
        tokenizer_2=build_clip_tokenizer(16),
        unet=unet,
        scheduler=scheduler,
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )


def save_tiny_sdxl_pipeline(folder: Path, seed: int = 0) -> Path:
    build_tiny_sdxl_pipeline(seed).save_pretrained(folder)
    return folder
