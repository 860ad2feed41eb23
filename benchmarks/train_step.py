"""Our training step against diffusers' training loops, on the shipped tiny model, one thread, in one process.

Run by hand:  python benchmarks/train_step.py [--rounds 21] [--batch-size 16] [--families controlnet gligen ...]

For each adapter family, two steps on the same batch, from the same adapter weights (copied), with the same
optimizer settings and gradient clipping (1.0, as both Lightning's default here and diffusers' scripts do):

- ``ours``: the configured experiment's step as ``ctrlkit train`` runs it (``AdapterTrainingSystem.training_inputs``
  then ``prediction_loss``, backward, clip, the configured optimizer and schedule). Its VAE posteriors and prompt
  embeddings come from the system's caches (filled in the warm-up, as after the first epoch or ``ctrlkit cache``);
  ``ours, cold`` times the first-epoch step of a first run, whose items are encoded (one VAE call per item) and not
  yet cached (``system.cache_dir`` off here: with it, a later run's first epoch reads them from disk).
- ``diffusers``: the step body of diffusers' ``examples/controlnet/train_controlnet.py`` (ControlNet) and
  ``examples/t2i_adapter/train_t2i_adapter_sdxl.py`` (T2I-Adapter, cubic timesteps), written out: VAE encode and
  text encoder every step. diffusers has no GLIGEN training script: its GLIGEN row is the same loop around our
  GLIGEN adapter, with phrases embedded every step.

Rounds are interleaved (ours, cold, diffusers, ours, ...), so a load change on this shared machine hits every loop;
medians over rounds. Our step is split into adapter + UNet forward/backward, optimizer (clip, step, schedule,
zero_grad) and everything else (latents, noise, timesteps, text embeddings, condition, dropout).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

EXPERIMENTS = {
    "controlnet": "controlnet_canny_shapes",
    "t2i_adapter": "t2i_adapter_canny_shapes",
    "gligen": "gligen_boxes_shapes",
}


def build(family: str, batch_size: int):
    """The experiment's system (backbone + adapter) and one training batch, as ``ctrlkit train`` builds them."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from lightning_modules.commands.cli import CONF_DIR

    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
        cfg = compose(
            "train",
            overrides=[f"experiment={EXPERIMENTS[family]}", f"data.batch_size={batch_size}", "system.cache_dir=null"],
        )
    backbone = instantiate(cfg.model)
    adapter = instantiate(cfg.adapter.build)(backbone.unet, vae_scale_factor=backbone.vae_scale_factor)
    system = instantiate(cfg.system, backbone=backbone, adapter=adapter)
    datamodule = instantiate(cfg.data, extractor=instantiate(cfg.condition.extractor), _convert_="all")
    datamodule.setup("fit")
    batches = iter(datamodule.train_dataloader())
    return system, [next(batches) for _ in range(2)], cfg.trainer.gradient_clip_val


def ours(system, batch, clip: float):
    """Our step; returns a function timing (everything else, forward/backward, optimizer) of one step."""
    configured = system.configure_optimizers()
    optimizer, scheduler = configured["optimizer"], configured["lr_scheduler"]["scheduler"]
    parameters = [p for group in optimizer.param_groups for p in group["params"]]
    generator = torch.Generator().manual_seed(0)
    system.train()

    def step() -> tuple[float, float, float]:
        start = time.perf_counter()
        inputs = system.training_inputs(batch, system.condition_dropout, generator, use_latent_cache=True)
        prepared = time.perf_counter()
        system.prediction_loss(inputs).backward()
        backward = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(parameters, clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        return prepared - start, backward - prepared, time.perf_counter() - backward

    return step


def diffusers_loop(family: str, system, batch, clip: float):
    """diffusers' step body for ``family`` on a copy of the system's adapter (same weights, its own optimizer)."""
    from diffusers.optimization import get_scheduler

    backbone, adapter = system.backbone, copy.deepcopy(system.adapter)
    vae, text_encoder, unet, scheduler = backbone.vae, backbone.text_encoder, backbone.unet, backbone.noise_scheduler
    optimizer = torch.optim.AdamW(adapter.trainable_parameters(), lr=1e-5, weight_decay=1e-2)
    lr_scheduler = get_scheduler("constant", optimizer=optimizer)
    input_ids = backbone.tokenizer(
        list(batch["prompt"]), padding="max_length", truncation=True, return_tensors="pt"
    ).input_ids  # the scripts tokenize in the dataset, once
    pixel_values, condition = batch["pixel_values"], batch["condition"]
    size = len(pixel_values)
    adapter.train()

    def step() -> float:
        start = time.perf_counter()
        latents = vae.encode(pixel_values).latent_dist.sample() * vae.config.scaling_factor
        noise = torch.randn_like(latents)
        if family == "t2i_adapter":  # train_t2i_adapter_sdxl.py: cubic sampling
            cubic = 1 - torch.rand(size) ** 3
            timesteps = (cubic * scheduler.config.num_train_timesteps).long().clamp(0, 999)
        else:
            timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (size,)).long()
        noisy_latents = scheduler.add_noise(latents, noise, timesteps)
        encoder_hidden_states = text_encoder(input_ids, return_dict=False)[0]
        if family == "controlnet":
            down, mid = adapter.controlnet(
                noisy_latents, timesteps, encoder_hidden_states, controlnet_cond=condition, return_dict=False
            )
            kwargs = {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}
        elif family == "t2i_adapter":
            kwargs = {"down_intrablock_additional_residuals": [f for f in adapter.t2i_adapter(condition)]}
        else:  # GLIGEN: phrases through the text encoder every step, no cache
            grounding = backbone.embed_grounding(condition, None)
            kwargs = adapter(
                grounding,
                noisy_latents=noisy_latents,
                timesteps=timesteps,
                encoder_hidden_states=encoder_hidden_states,
            )
        model_pred = unet(noisy_latents, timesteps, encoder_hidden_states, **kwargs, return_dict=False)[0]
        loss = F.mse_loss(model_pred.float(), noise.float(), reduction="mean")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(adapter.trainable_parameters(), clip)
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    return step


def measure(family: str, rounds: int, batch_size: int) -> dict:
    system, (batch, fresh_batch), clip = build(family, batch_size)
    ours_step = ours(system, batch, clip)
    reference_step = diffusers_loop(family, system, batch, clip)
    cold_system, _, _ = build(family, batch_size)
    cold_system.adapter.load_state_dict(system.adapter.state_dict())
    cold_step = ours(cold_system, fresh_batch, clip)
    for _ in range(2):  # warm-up; fills our caches for `batch`
        ours_step(), reference_step()
    times = {"ours": [], "cold": [], "diffusers": [], "parts": []}
    for _ in range(rounds):
        parts = ours_step()
        times["parts"].append(parts)
        times["ours"].append(sum(parts))
        cold_system._latent_cache.clear()  # the first epoch: every item encoded
        times["cold"].append(sum(cold_step()))
        times["diffusers"].append(reference_step())
    medians = {name: statistics.median(values) for name, values in times.items() if name != "parts"}
    for index, name in enumerate(("else", "forward_backward", "optimizer")):
        medians[name] = statistics.median(parts[index] for parts in times["parts"])
    return medians


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=21)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--families", nargs="+", default=list(EXPERIMENTS), choices=list(EXPERIMENTS))
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"tiny model, batch {args.batch_size}, 1 thread, medians of {args.rounds} interleaved rounds (ms)")
    header = f"{'family':12} {'diffusers':>9} {'ours':>7} {'ratio':>6} {'cold':>7} {'ratio':>6}"
    print(header + f" | {'fwd+bwd':>8} {'optim':>7} {'else':>6} {'else %':>6}")
    for family in args.families:
        m = measure(family, args.rounds, args.batch_size)
        print(
            f"{family:12} {m['diffusers'] * 1e3:9.1f} {m['ours'] * 1e3:7.1f} {m['ours'] / m['diffusers']:5.2f}x "
            f"{m['cold'] * 1e3:7.1f} {m['cold'] / m['diffusers']:5.2f}x | {m['forward_backward'] * 1e3:8.1f} "
            f"{m['optimizer'] * 1e3:7.1f} {m['else'] * 1e3:6.1f} {100 * m['else'] / m['ours']:5.1f}%",
            flush=True,
        )


if __name__ == "__main__":
    main()
