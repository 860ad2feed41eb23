"""Training steps at the size researchers train (SD1.5 / SDXL architectures, random weights, no download).

Shared by ``benchmarks/memory.py`` (CPU: peak RSS and seconds per step, one process per configuration) and
``benchmarks/gpu_train.py`` (one GPU: samples/s and ``torch.cuda.max_memory_allocated``). Two loops on the same
modules and batch:

- ``ours``: ``AdapterTrainingSystem.compute_loss`` with the system's own precision casting
  (``apply_precision``), gradient checkpointing and its default caches (each item's VAE posterior and each
  prompt's embedding computed once, in the warm-up), as ``ctrlkit train`` runs it;
- ``diffusers``: the step of diffusers' ``examples/controlnet/train_controlnet.py`` written out (VAE and text
  encoder every step, frozen models cast to the weight dtype, ControlNet fp32 under autocast), with its documented
  low-memory flags when asked (gradient checkpointing, 8-bit Adam, ``set_to_none``).

A configuration is a dict: loop, precision ("fp32" / "bf16" / "fp16"), checkpointing, optimizer ("adamw" /
"adamw8bit"), compile, channels_last, batch, size, architecture ("sd15" / "sdxl").
"""

from __future__ import annotations

import contextlib
import time

import torch
import torch.nn.functional as F

from adapters import ControlNetAdapter
from lightning_modules.backbone import architecture_unet, build_random_backbone
from lightning_modules.precision import compile_repeated_blocks
from lightning_modules.system import AdapterTrainingSystem

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
LIGHTNING_PRECISION = {"fp32": "32-true", "bf16": "bf16-mixed", "fp16": "16-mixed"}


def make_optimizer(parameters, name: str, device: str):
    if name == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError as error:
            raise SystemExit("optimizer adamw8bit needs bitsandbytes: pip install bitsandbytes (CUDA only)") from error
        return bnb.optim.AdamW8bit(parameters, lr=1e-5)
    return torch.optim.AdamW(parameters, lr=1e-5, fused=device == "cuda")


def autocast(device: str, precision: str):
    dtype = PRECISIONS[precision]
    return torch.autocast(device, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def sd15_step(config: dict, device: str):
    """A closure running one SD1.5-architecture ControlNet training step of ``config`` on ``device``."""
    backbone = build_random_backbone("sd15").to(device)
    adapter = ControlNetAdapter.from_unet(backbone.unet, vae_scale_factor=8).to(device)
    batch_size, size = config["batch"], config["size"]
    pixel_values = torch.rand(batch_size, 3, size, size, device=device) * 2 - 1
    condition = torch.rand(batch_size, 3, size, size, device=device)
    prompts = ["a photograph of a red bicycle"] * batch_size
    if config["checkpointing"]:
        backbone.unet.enable_gradient_checkpointing()
        adapter.enable_gradient_checkpointing()
    optimizer = make_optimizer(adapter.trainable_parameters(), config["optimizer"], device)
    if config["loop"] == "ours":
        # ctrlkit's defaults: each item's VAE posterior and each prompt's embedding computed once (the warm-up)
        system = AdapterTrainingSystem(backbone, adapter, cache_latents=True, cache_text_embeddings=True)
        system.apply_precision(LIGHTNING_PRECISION[config["precision"]])
        index = torch.arange(batch_size)
        batch = {"pixel_values": pixel_values, "condition": condition, "prompt": prompts, "index": index}

        def loss_of_step():
            return system.compute_loss(batch)

    else:
        weight_dtype = PRECISIONS[config["precision"]] or torch.float32
        for module in (backbone.vae, backbone.text_encoder, backbone.unet):
            module.to(weight_dtype)
        scheduler = backbone.noise_scheduler
        input_ids = backbone.tokenizer(
            prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt"
        ).input_ids.to(device)

        def loss_of_step():  # train_controlnet.py's step body
            latents = backbone.vae.encode(pixel_values.to(weight_dtype)).latent_dist.sample()
            latents = latents * backbone.vae.config.scaling_factor
            noise = torch.randn_like(latents)
            timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (batch_size,), device=device).long()
            noisy_latents = scheduler.add_noise(latents.float(), noise.float(), timesteps).to(weight_dtype)
            encoder_hidden_states = backbone.text_encoder(input_ids, return_dict=False)[0]
            down, mid = adapter.controlnet(
                noisy_latents,
                timesteps,
                encoder_hidden_states=encoder_hidden_states,
                controlnet_cond=condition.to(weight_dtype),
                return_dict=False,
            )
            model_pred = backbone.unet(
                noisy_latents,
                timesteps,
                encoder_hidden_states=encoder_hidden_states,
                down_block_additional_residuals=[sample.to(dtype=weight_dtype) for sample in down],
                mid_block_additional_residual=mid.to(dtype=weight_dtype),
                return_dict=False,
            )[0]
            return F.mse_loss(model_pred.float(), noise.float(), reduction="mean")

    if config.get("channels_last"):  # NHWC convolutions: faster on tensor cores, measured per GPU (CPU: 4% slower)
        for module in (backbone.unet, adapter, backbone.vae):
            module.to(memory_format=torch.channels_last)
    if config.get("compile"):  # as system.compile: the repeated blocks, short compile time, most of the compute
        compile_repeated_blocks(backbone.unet)
        compile_repeated_blocks(adapter)

    def step() -> None:
        with autocast(device, config["precision"]):
            loss = loss_of_step()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def sdxl_step(config: dict, device: str):
    """One SDXL-architecture ControlNet step on the bare modules (ctrlkit's backbone holds one text encoder, so
    SDXL runs the diffusers-style loop): UNet + ControlNet at ``size``, text embeddings and time ids given."""
    from diffusers import ControlNetModel

    unet = architecture_unet("sdxl").to(device)
    weight_dtype = PRECISIONS[config["precision"]] or torch.float32
    controlnet = ControlNetModel.from_unet(unet).to(device).train()
    unet.to(weight_dtype)
    if config["checkpointing"]:
        unet.enable_gradient_checkpointing()
        controlnet.enable_gradient_checkpointing()
    optimizer = make_optimizer(controlnet.parameters(), config["optimizer"], device)
    batch_size, latent = config["batch"], config["size"] // 8
    latents = torch.randn(batch_size, 4, latent, latent, device=device, dtype=weight_dtype)
    condition = torch.rand(batch_size, 3, config["size"], config["size"], device=device, dtype=weight_dtype)
    states = torch.randn(batch_size, 77, 2048, device=device, dtype=weight_dtype)
    added = {
        "text_embeds": torch.randn(batch_size, 1280, device=device, dtype=weight_dtype),
        "time_ids": torch.tensor([[1024, 1024, 0, 0, 1024, 1024]] * batch_size, device=device, dtype=weight_dtype),
    }

    def step() -> None:
        timesteps = torch.randint(0, 1000, (batch_size,), device=device)
        with autocast(device, config["precision"]):
            down, mid = controlnet(
                latents, timesteps, states, controlnet_cond=condition, added_cond_kwargs=added, return_dict=False
            )
            prediction = unet(
                latents,
                timesteps,
                states,
                added_cond_kwargs=added,
                down_block_additional_residuals=[sample.to(weight_dtype) for sample in down],
                mid_block_additional_residual=mid.to(weight_dtype),
                return_dict=False,
            )[0]
            loss = F.mse_loss(prediction.float(), latents.float())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def time_steps(step, repeats: int, warmup: int, synchronize=lambda: None) -> float:
    """Median seconds per step after ``warmup`` steps."""
    for _ in range(warmup):
        step()
    synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]
