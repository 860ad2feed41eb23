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
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from adapters.sampling import sample_latents
from conditions.metrics import score_shapes_image
from conditions.ranges import images_to_numpy
from conditions.shapes import render_scene
from lightning_modules.backbone import Backbone, build_tiny_backbone
from lightning_modules.commands.value_checks import check_settings

log = logging.getLogger(__name__)


def render_pool(count: int, size: int, seed: int, num_objects: int | tuple[int, int] = 1) -> tuple[torch.Tensor, list]:
    """``count`` scenes as a (N, 3, S, S) uint8 tensor plus the scene records (captions, objects)."""
    scenes = [render_scene(np.random.default_rng([seed, index]), size, num_objects) for index in range(count)]
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
    """Stage 1: reconstruction (L1 + MSE) + a small KL term; returns the final mean L1 error on [-1, 1].

    ``images`` live on the VAE's device and all randomness comes from a generator there: no host-device copy
    (each one a synchronisation) inside the loop."""
    vae = backbone.vae
    device = vae.device
    device_generator = torch.Generator(device).manual_seed(int(generator.initial_seed()))
    vae.train().requires_grad_(True)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=learning_rate, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, learning_rate, total_steps=steps, pct_start=0.05)
    progress = tqdm(range(steps), desc="stage 1: VAE", dynamic_ncols=True)
    recent = []
    for step in progress:
        index = torch.randint(len(images), (batch_size,), generator=device_generator, device=device)
        batch = to_model_range(images[index])
        posterior = vae.encode(batch).latent_dist
        reconstruction = vae.decode(posterior.sample(device_generator)).sample
        l1 = (reconstruction - batch).abs().mean()
        loss = l1 + F.mse_loss(reconstruction, batch) + kl_weight * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % 25 == 0 or step == steps - 1:
            recent = (recent + [l1.item()])[-4:]
            progress.set_postfix(l1=f"{np.mean(recent):.4f}")
    vae.eval().requires_grad_(False)
    return float(np.mean(recent))


@torch.no_grad()
def encode_pool(backbone: Backbone, images: torch.Tensor, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std of every pool image (unscaled), so stage 2 never runs the encoder."""
    means, stds = [], []
    for start in tqdm(range(0, len(images), batch_size), desc="caching latents", dynamic_ncols=True):
        batch = images[start : start + batch_size].to(backbone.vae.device)
        posterior = backbone.vae.encode(to_model_range(batch)).latent_dist
        means.append(posterior.mean)
        stds.append(posterior.std)
    return torch.cat(means), torch.cat(stds)


@torch.no_grad()
def update_ema(ema_model: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    torch._foreach_lerp_(list(ema_model.parameters()), list(model.parameters()), 1.0 - decay)


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
    images = images_to_numpy(backbone.decode_latents(latents))
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
    """Stage 2: UNet + text encoder on cached latents; returns the EMA backbone and the validation history.

    Long on purpose: the whole loop (batch, noise, loss, step, EMA, validation, samples) in one function, as DiT's
    train.py reads in one sitting; split, its order of random draws (which the shipped model depends on) would
    hide across helpers."""
    unet, text_encoder = backbone.unet, backbone.text_encoder
    unet.train().requires_grad_(True)
    text_encoder.train().requires_grad_(True)
    ema = copy.deepcopy(torch.nn.ModuleDict({"unet": unet, "text_encoder": text_encoder})).eval().requires_grad_(False)
    parameters = list(unet.parameters()) + list(text_encoder.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=cfg.learning_rate, weight_decay=0.01, fused=means.is_cuda)
    warmup = cfg.warmup_steps
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))
    scheduler = backbone.noise_scheduler
    device = means.device
    snr = (scheduler.alphas_cumprod / (1 - scheduler.alphas_cumprod)).to(device)
    v_prediction = scheduler.config.prediction_type == "v_prediction"
    # Tokenize every caption once; a dropped caption becomes the empty prompt's tokens.
    tokenize = lambda texts: backbone.tokenizer(  # noqa: E731
        texts,
        padding="max_length",
        max_length=backbone.tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids.to(device)
    caption_tokens = tokenize([scene.caption for scene in scenes])
    empty_tokens = tokenize([""])
    noise_generator = torch.Generator(device).manual_seed(int(generator.initial_seed()))
    scaling = backbone.vae.config.scaling_factor
    history = []
    progress = tqdm(range(1, cfg.steps + 1), desc="stage 2: UNet + text encoder", dynamic_ncols=True)
    recent = []
    # An optional wall-clock budget: training stops early (and says at which step) once it is spent.
    deadline = time.perf_counter() + 60 * cfg.max_minutes if cfg.get("max_minutes") else float("inf")
    for step in progress:
        index = torch.randint(len(means), (cfg.batch_size,), generator=noise_generator, device=device)
        posterior_noise = torch.randn(means[index].shape, generator=noise_generator, device=device)
        latents = (means[index] + stds[index] * posterior_noise) * scaling
        noise = torch.randn(latents.shape, generator=noise_generator, device=device)
        timesteps = torch.randint(
            0, scheduler.config.num_train_timesteps, (cfg.batch_size,), generator=noise_generator, device=device
        )
        noisy_latents = scheduler.add_noise(latents, noise, timesteps)
        drop = torch.rand(cfg.batch_size, generator=noise_generator, device=device) < cfg.caption_dropout
        tokens = torch.where(drop[:, None], empty_tokens, caption_tokens[index])
        prediction = unet(noisy_latents, timesteps, text_encoder(tokens)[0]).sample
        # Min-SNR-gamma weighting (Hang et al., 2023): min(SNR, gamma) / SNR for epsilon, / (SNR + 1) for v.
        if v_prediction:
            target = scheduler.get_velocity(latents, noise, timesteps)
            weights = snr[timesteps].clamp(max=cfg.snr_gamma) / (snr[timesteps] + 1)
        else:
            target = noise
            weights = snr[timesteps].clamp(max=cfg.snr_gamma) / snr[timesteps]
        loss = (weights * ((prediction - target) ** 2).mean(dim=(1, 2, 3))).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        schedule.step()
        update_ema(ema["unet"], unet, cfg.ema_decay if step > warmup else 0.0)
        update_ema(ema["text_encoder"], text_encoder, cfg.ema_decay if step > warmup else 0.0)
        if step % 25 == 0:  # .item() syncs with the GPU: not every step
            recent = (recent + [loss.item()])[-20:]
            progress.set_postfix(loss=f"{np.mean(recent):.4f}")
        out_of_time = time.perf_counter() > deadline
        if step % cfg.eval_every == 0 or step == cfg.steps or out_of_time:
            evaluated = Backbone(backbone.vae, ema["text_encoder"], backbone.tokenizer, ema["unet"], scheduler)
            scores = caption_accuracy(evaluated, val_scenes, cfg.guidance_scale, cfg.eval_sampling_steps)
            history.append({"step": step, **{k: v for k, v in scores.items() if k != "images"}})
            save_samples(scores["images"], val_scenes, samples_dir / f"step_{step:06d}.png")
            tqdm.write(f"step {step}: {json.dumps(history[-1])}")
        if out_of_time:
            tqdm.write(f"denoiser.max_minutes={cfg.max_minutes} spent: stopped at step {step} of {cfg.steps}")
            break
    return Backbone(backbone.vae, ema["text_encoder"], backbone.tokenizer, ema["unet"], scheduler), history


def pretrain_base(cfg: DictConfig) -> dict:
    """Run both stages and write the pipeline folder to ``cfg.output``; returns the report (also report.json)."""
    started = time.perf_counter()
    check_settings("pretrain_base", cfg)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    device = torch.device(
        "cuda" if cfg.device == "auto" and torch.cuda.is_available() else cfg.device.replace("auto", "cpu")
    )
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed)
    noise_schedule = OmegaConf.to_container(cfg.noise_schedule) if cfg.get("noise_schedule") else None
    backbone = build_tiny_backbone(cfg.seed, cfg.image_size, noise_schedule).to(device)
    num_objects = cfg.num_objects if isinstance(cfg.num_objects, int) else tuple(cfg.num_objects)
    images, scenes = render_pool(cfg.pool_size, cfg.image_size, cfg.seed, num_objects)
    images = images.to(device)
    # Validation captions name one object: caption accuracy judges colour and shape of that object.
    _, val_scenes = render_pool(cfg.val_size, cfg.image_size, cfg.val_seed)
    log.info("pretrain-base on %s: %d scenes with %s objects", device, len(scenes), num_objects)

    if cfg.vae.pretrained:
        # Reuse stage 1 of an earlier run (its `stage1_vae` folder) to iterate on stage 2 alone.
        backbone.vae = AutoencoderKL.from_pretrained(cfg.vae.pretrained, local_files_only=True).to(device)
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
    backbone.requires_grad_(False).eval().to("cpu")

    output = Path(cfg.output)
    pipeline = backbone.to_pipeline()
    pipeline.scheduler = UniPCMultistepScheduler.from_config(backbone.noise_scheduler.config)
    pipeline.save_pretrained(output, safe_serialization=True)
    report = {
        "vae_l1": vae_l1,
        "history": history,
        "minutes": (time.perf_counter() - started) / 60,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "settings": {k: v for k, v in cfg.items() if k != "output"},
    }
    (output / "report.json").write_text(json.dumps(report, indent=2, default=str))
    print(f"ctrlkit pretrain-base: wrote {output} in {report['minutes']:.1f} min; final {history[-1]}")
    return report
