"""``ctrlkit pretrain-base``: train the tiny SD-architecture base model that ``model=tiny`` ships, on ``shapes``.

Two stages, one readable loop each (DiT style): (1) the AutoencoderKL on shape images; (2) the UNet and the CLIP
text encoder on cached VAE latents, with caption dropout so classifier-free guidance works, Min-SNR loss weighting
and an EMA of the weights. The result is a diffusers ``StableDiffusionPipeline`` folder, judged by the shapes
caption-accuracy metric on fixed validation captions.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, UniPCMultistepScheduler
from omegaconf import DictConfig
from tqdm import tqdm

from adapters.sampling import sample_latents
from conditions.metrics import score_shapes_image
from conditions.shapes import render_scene
from lightning_modules.backbone import Backbone, build_tiny_backbone

log = logging.getLogger(__name__)


def render_pool(count: int, size: int, seed: int) -> tuple[torch.Tensor, list]:
    """``count`` scenes as a (N, 3, S, S) uint8 tensor plus the scene records (captions, objects)."""
    scenes = [render_scene(np.random.default_rng([seed, index]), size) for index in range(count)]
    images = torch.from_numpy(np.stack([scene.image for scene in scenes])).permute(0, 3, 1, 2).contiguous()
    return images, scenes


def to_model_range(images: torch.Tensor) -> torch.Tensor:
    return images.float().div(127.5).sub(1.0)


def train_vae(
    backbone: Backbone,
    images: torch.Tensor,
    steps: int,
    batch_size: int,
    learning_rate: float,
    kl_weight: float,
    generator: torch.Generator,
) -> float:
    """Stage 1: reconstruction (L1 + MSE) + a small KL term; returns the final mean L1 error on [-1, 1]."""
    vae = backbone.vae
    vae.train().requires_grad_(True)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=learning_rate, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, learning_rate, total_steps=steps, pct_start=0.05)
    progress = tqdm(range(steps), desc="stage 1: VAE", dynamic_ncols=True)
    recent = []
    for _ in progress:
        batch = to_model_range(images[torch.randint(len(images), (batch_size,), generator=generator)])
        posterior = vae.encode(batch).latent_dist
        reconstruction = vae.decode(posterior.sample(generator)).sample
        l1 = (reconstruction - batch).abs().mean()
        loss = l1 + F.mse_loss(reconstruction, batch) + kl_weight * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        recent = (recent + [l1.item()])[-50:]
        progress.set_postfix(l1=f"{np.mean(recent):.4f}")
    vae.eval().requires_grad_(False)
    return float(np.mean(recent))


@torch.no_grad()
def encode_pool(backbone: Backbone, images: torch.Tensor, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std of every pool image (unscaled), so stage 2 never runs the encoder."""
    means, stds = [], []
    for start in tqdm(range(0, len(images), batch_size), desc="caching latents", dynamic_ncols=True):
        posterior = backbone.vae.encode(to_model_range(images[start : start + batch_size])).latent_dist
        means.append(posterior.mean)
        stds.append(posterior.std)
    return torch.cat(means), torch.cat(stds)


@torch.no_grad()
def update_ema(ema_model: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    for ema_parameter, parameter in zip(ema_model.parameters(), model.parameters()):
        ema_parameter.lerp_(parameter, 1.0 - decay)


@torch.no_grad()
def caption_accuracy(backbone: Backbone, scenes: list, guidance_scale: float, steps: int, seed: int = 0) -> dict:
    """Sample each validation caption once and judge colour and shape with the shapes metric."""
    prompts = [scene.caption for scene in scenes]
    scheduler = UniPCMultistepScheduler.from_config(backbone.noise_scheduler.config)
    text = backbone.encode_prompts(prompts)
    size = scenes[0].image.shape[0] // backbone.vae_scale_factor
    latents = sample_latents(
        backbone.unet,
        scheduler,
        text,
        (len(prompts), 4, size, size),
        uncond_hidden_states=backbone.encode_prompts([""] * len(prompts)),
        guidance_scale=guidance_scale,
        num_inference_steps=steps,
        generator=torch.Generator().manual_seed(seed),
    )
    images = (backbone.decode_latents(latents) * 255).round().byte().permute(0, 2, 3, 1).numpy()
    scores = [
        score_shapes_image(image, scene.objects[0].colour, scene.objects[0].shape, scene.background)
        for image, scene in zip(images, scenes)
    ]
    return {
        "caption_accuracy": float(np.mean([s.caption_correct for s in scores])),
        "colour_accuracy": float(np.mean([s.colour_correct for s in scores])),
        "shape_accuracy": float(np.mean([s.shape_correct for s in scores])),
        "images": images,
    }


def save_samples(images: np.ndarray, scenes: list, path: Path, columns: int = 8) -> None:
    """Write generated images (N, H, W, 3) uint8 as a grid, each followed by its ground-truth scene."""
    from PIL import Image

    tiles = [np.concatenate([image, scene.image], axis=1) for image, scene in zip(images, scenes)]
    rows = [np.concatenate(tiles[start : start + columns], axis=1) for start in range(0, len(tiles), columns)]
    rows = [np.pad(row, ((0, 0), (0, rows[0].shape[1] - row.shape[1]), (0, 0)), constant_values=255) for row in rows]
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.concatenate(rows, axis=0)).save(path)


def train_denoiser(
    backbone: Backbone,
    means: torch.Tensor,
    stds: torch.Tensor,
    scenes: list,
    val_scenes: list,
    cfg: DictConfig,
    generator: torch.Generator,
    samples_dir: Path,
) -> tuple[Backbone, list[dict]]:
    """Stage 2: UNet + text encoder on cached latents; returns the EMA backbone and the validation history."""
    unet, text_encoder = backbone.unet, backbone.text_encoder
    unet.train().requires_grad_(True)
    text_encoder.train().requires_grad_(True)
    ema = copy.deepcopy(torch.nn.ModuleDict({"unet": unet, "text_encoder": text_encoder})).eval().requires_grad_(False)
    parameters = list(unet.parameters()) + list(text_encoder.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=cfg.learning_rate, weight_decay=0.01)
    warmup = cfg.warmup_steps
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))
    scheduler = backbone.noise_scheduler
    snr = scheduler.alphas_cumprod / (1 - scheduler.alphas_cumprod)
    captions = [scene.caption for scene in scenes]
    scaling = backbone.vae.config.scaling_factor
    history = []
    progress = tqdm(range(1, cfg.steps + 1), desc="stage 2: UNet + text encoder", dynamic_ncols=True)
    recent = []
    for step in progress:
        index = torch.randint(len(means), (cfg.batch_size,), generator=generator)
        latents = (means[index] + stds[index] * torch.randn(means[index].shape, generator=generator)) * scaling
        noise = torch.randn(latents.shape, generator=generator)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (cfg.batch_size,), generator=generator)
        noisy_latents = scheduler.add_noise(latents, noise, timesteps)
        drop = torch.rand(cfg.batch_size, generator=generator) < cfg.caption_dropout
        prompts = ["" if dropped else captions[i] for i, dropped in zip(index.tolist(), drop.tolist())]
        tokens = backbone.tokenizer(
            prompts,
            padding="max_length",
            max_length=backbone.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        prediction = unet(noisy_latents, timesteps, text_encoder(tokens)[0]).sample
        # Min-SNR-gamma weighting (Hang et al., 2023) for epsilon prediction: min(SNR, gamma) / SNR.
        weights = snr[timesteps].clamp(max=cfg.snr_gamma) / snr[timesteps]
        loss = (weights * ((prediction - noise) ** 2).mean(dim=(1, 2, 3))).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        schedule.step()
        update_ema(ema["unet"], unet, cfg.ema_decay if step > warmup else 0.0)
        update_ema(ema["text_encoder"], text_encoder, cfg.ema_decay if step > warmup else 0.0)
        recent = (recent + [loss.item()])[-50:]
        progress.set_postfix(loss=f"{np.mean(recent):.4f}")
        if step % cfg.eval_every == 0 or step == cfg.steps:
            evaluated = Backbone(backbone.vae, ema["text_encoder"], backbone.tokenizer, ema["unet"], scheduler)
            scores = caption_accuracy(evaluated, val_scenes, cfg.guidance_scale, cfg.eval_sampling_steps)
            history.append({"step": step, **{k: v for k, v in scores.items() if k != "images"}})
            save_samples(scores["images"], val_scenes, samples_dir / f"step_{step:06d}.png")
            tqdm.write(f"step {step}: {json.dumps(history[-1])}")
    return Backbone(backbone.vae, ema["text_encoder"], backbone.tokenizer, ema["unet"], scheduler), history


def pretrain_base(cfg: DictConfig) -> dict:
    """Run both stages and write the pipeline folder to ``cfg.output``; returns the report (also report.json)."""
    started = time.perf_counter()
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    torch.manual_seed(cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed)
    backbone = build_tiny_backbone(seed=cfg.seed, image_size=cfg.image_size)
    images, scenes = render_pool(cfg.pool_size, cfg.image_size, cfg.seed)
    _, val_scenes = render_pool(cfg.val_size, cfg.image_size, cfg.val_seed)

    if cfg.vae.pretrained:
        # Reuse stage 1 of an earlier run (its `stage1_vae` folder) to iterate on stage 2 alone.
        backbone.vae = AutoencoderKL.from_pretrained(cfg.vae.pretrained, local_files_only=True)
        backbone.vae.requires_grad_(False).eval()
        vae_l1 = None
    else:
        vae_l1 = train_vae(
            backbone, images, cfg.vae.steps, cfg.vae.batch_size, cfg.vae.learning_rate, cfg.vae.kl_weight, generator
        )
        backbone.vae.save_pretrained(Path(cfg.samples_dir).parent / "stage1_vae")
    means, stds = encode_pool(backbone, images)
    # As SD does: scale latents to unit variance (SD1's 0.18215 was measured the same way).
    backbone.vae.register_to_config(scaling_factor=float(1.0 / means.std()))
    backbone, history = train_denoiser(
        backbone, means, stds, scenes, val_scenes, cfg.denoiser, generator, Path(cfg.samples_dir)
    )
    backbone.requires_grad_(False).eval()

    output = Path(cfg.output)
    pipeline = backbone.to_pipeline()
    pipeline.scheduler = UniPCMultistepScheduler.from_config(backbone.noise_scheduler.config)
    pipeline.save_pretrained(output, safe_serialization=True)
    report = {
        "vae_l1": vae_l1,
        "history": history,
        "minutes": (time.perf_counter() - started) / 60,
        "settings": {k: v for k, v in cfg.items() if k != "output"},
    }
    (output / "report.json").write_text(json.dumps(report, indent=2, default=str))
    print(f"ctrlkit pretrain-base: wrote {output} in {report['minutes']:.1f} min; final {history[-1]}")
    return report
