"""A tiny SDXL-architecture pipeline built in code with random weights, as diffusers' own SDXL tests build theirs:
a UNet with SDXL's text-time conditioning (pooled text + micro-conditioning time ids), two CLIP text encoders
(the second with a projection) and their tokenizers, a two-level VAE. Saved with ``save_pretrained`` it is what
``model=sdxl model.path=<folder>`` loads."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

TEXT_WIDTH = 32  # each text encoder's hidden size and the projection's: cross_attention_dim 64, pooled 32
TIME_EMBED = 8  # addition_time_embed_dim: 6 time ids x 8 + pooled 32 = projection_class_embeddings_input_dim 80


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
        projection_class_embeddings_input_dim=6 * TIME_EMBED + TEXT_WIDTH,
        cross_attention_dim=2 * TEXT_WIDTH,
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
    text_config = CLIPTextConfig(
        hidden_size=TEXT_WIDTH,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=3,
        vocab_size=1000,
        hidden_act="gelu",
        projection_dim=TEXT_WIDTH,
        max_position_embeddings=77,
    )
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1, timestep_spacing="leading"
    )
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=CLIPTextModel(text_config),
        text_encoder_2=CLIPTextModelWithProjection(text_config),
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
