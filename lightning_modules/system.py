"""``AdapterTrainingSystem``: trains any conditioning adapter on a frozen backbone. It never branches on the adapter.

The step reads like diffusers' ``examples/controlnet/train_controlnet.py``: encode -> noise -> adapter -> UNet -> MSE.
"""

from __future__ import annotations

import warnings

import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from adapters.base import ConditioningAdapter
from adapters.sampling import make_scheduler, sample_latents
from lightning_modules.backbone import Backbone
from lightning_modules.errors import CtrlkitError

TIMESTEP_SAMPLINGS = ("uniform", "cubic")


class AdapterTrainingSystem(pl.LightningModule):
    """Trains ``adapter`` on the frozen ``backbone``.

    Args:
        backbone: frozen VAE, text encoder, UNet and noise scheduler.
        adapter: built from ``backbone.unet``; only its parameters reach the optimizer.
        learning_rate: AdamW learning rate of the adapter (``adapter.learning_rate`` in the config).
        weight_decay, adam_betas: AdamW settings.
        lr_warmup_steps: linear warm-up from 0, then constant.
        prompt_dropout: probability of replacing a caption by "" (ControlNet paper: 0.5), so classifier-free
            guidance works with the adapter.
        timestep_sampling: "uniform", or "cubic" (t = (1 - u^3) T, T2I-Adapter's bias towards early, noisy steps).
    """

    def __init__(
        self,
        backbone: Backbone,
        adapter: ConditioningAdapter,
        learning_rate: float = 1e-4,
        weight_decay: float = 1e-2,
        adam_betas: tuple[float, float] = (0.9, 0.999),
        lr_warmup_steps: int = 0,
        prompt_dropout: float = 0.5,
        timestep_sampling: str = "uniform",
    ) -> None:
        super().__init__()
        if timestep_sampling not in TIMESTEP_SAMPLINGS:
            raise CtrlkitError(
                f"system.timestep_sampling='{timestep_sampling}'; choose one of: {', '.join(TIMESTEP_SAMPLINGS)}"
            )
        if not 0.0 <= prompt_dropout <= 1.0:
            raise CtrlkitError(f"system.prompt_dropout={prompt_dropout} must be in [0, 1]")
        # The modules are not hyperparameters: keeping them out of hparams keeps them out of the checkpoint pickle.
        self.save_hyperparameters(ignore=["backbone", "adapter"])
        self.backbone = backbone
        self.adapter = adapter
        # Checkpoints hold the adapter only; on_load_checkpoint checks those keys itself.
        self.strict_loading = False

    def on_fit_start(self) -> None:
        # The frozen backbone is in eval mode on purpose; Lightning warns about any eval-mode module.
        warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode at the start of training.*")

    def train(self, mode: bool = True) -> AdapterTrainingSystem:
        """Lightning switches the whole module to train mode each epoch; the frozen backbone stays in eval mode."""
        super().train(mode)
        self.backbone.eval()
        return self

    # ------------------------------------------------------------------ the training step

    def sample_timesteps(self, batch_size: int, generator: torch.Generator | None = None) -> torch.Tensor:
        num_train_timesteps = self.backbone.noise_scheduler.config.num_train_timesteps
        if self.hparams.timestep_sampling == "cubic":
            u = torch.rand(batch_size, generator=generator)
            timesteps = ((1 - u**3) * num_train_timesteps).long().clamp_(0, num_train_timesteps - 1)
        else:
            timesteps = torch.randint(0, num_train_timesteps, (batch_size,), generator=generator)
        return timesteps.to(self.device)

    def compute_loss(self, batch: dict, prompt_dropout: float = 0.0, generator: torch.Generator | None = None):
        """MSE between the UNet's prediction (with the adapter's kwargs) and the scheduler's target."""
        latents = self.backbone.encode_images(batch["pixel_values"], generator=generator)
        noise = torch.randn(latents.shape, generator=generator, dtype=latents.dtype).to(latents.device)
        timesteps = self.sample_timesteps(latents.shape[0], generator)
        noisy_latents = self.backbone.noise_scheduler.add_noise(latents, noise, timesteps)
        prompts = list(batch["prompt"])
        if prompt_dropout > 0:
            dropped = torch.rand(len(prompts), generator=generator) < prompt_dropout
            prompts = ["" if drop else prompt for prompt, drop in zip(prompts, dropped.tolist())]
        encoder_hidden_states = self.backbone.encode_prompts(prompts)
        unet_kwargs = self.adapter(
            batch["condition"],
            noisy_latents=noisy_latents,
            timesteps=timesteps,
            encoder_hidden_states=encoder_hidden_states,
        )
        model_pred = self.backbone.unet(noisy_latents, timesteps, encoder_hidden_states, **unet_kwargs).sample
        prediction_type = self.backbone.noise_scheduler.config.prediction_type
        if prediction_type == "epsilon":
            target = noise
        elif prediction_type == "v_prediction":
            target = self.backbone.noise_scheduler.get_velocity(latents, noise, timesteps)
        else:
            raise CtrlkitError(
                f"unsupported prediction_type '{prediction_type}'; ctrlkit trains epsilon or v_prediction"
            )
        return F.mse_loss(model_pred.float(), target.float())

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self.compute_loss(batch, prompt_dropout=self.hparams.prompt_dropout)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["prompt"]))
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        # Fixed noise and timesteps per batch, so val/loss is comparable across validations.
        generator = torch.Generator().manual_seed(batch_idx)
        loss = self.compute_loss(batch, generator=generator)
        self.log("val/loss", loss, prog_bar=True, batch_size=len(batch["prompt"]))

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(
            self.adapter.param_groups(self.hparams.learning_rate),
            weight_decay=self.hparams.weight_decay,
            betas=tuple(self.hparams.adam_betas),
        )
        warmup = max(int(self.hparams.lr_warmup_steps), 0)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / (warmup + 1)))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ------------------------------------------------------------------ checkpoints hold the adapter only

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["state_dict"] = {
            name: tensor for name, tensor in checkpoint["state_dict"].items() if not name.startswith("backbone.")
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        expected = {name for name in self.state_dict() if name.startswith("adapter.")}
        found = set(checkpoint.get("state_dict", {}))
        if found != expected:
            missing, unexpected = sorted(expected - found), sorted(found - expected)
            raise CtrlkitError(
                f"checkpoint does not match this adapter: {len(missing)} missing keys (e.g. {missing[:2]}), "
                f"{len(unexpected)} unexpected keys (e.g. {unexpected[:2]})"
            )

    # ------------------------------------------------------------------ sampling

    @torch.no_grad()
    def generate(
        self,
        condition: torch.Tensor,
        prompts: list[str],
        *,
        num_inference_steps: int = 20,
        guidance_scale: float = 5.0,
        scheduler: str = "unipc",
        seed: int = 0,
        negative_prompt: str = "",
        use_adapter: bool = True,
    ) -> torch.Tensor:
        """Sample images (B, 3, H, W) in [0, 1] for ``prompts`` under ``condition`` (B, C, H, W)."""
        condition = condition.to(self.device)
        height, width = condition.shape[-2:]
        factor = self.backbone.vae_scale_factor
        latent_channels = self.backbone.unet.config.in_channels
        shape = (len(prompts), latent_channels, height // factor, width // factor)
        latents = sample_latents(
            self.backbone.unet,
            make_scheduler(scheduler, self.backbone.noise_scheduler.config),
            self.backbone.encode_prompts(prompts),
            shape,
            adapter=self.adapter if use_adapter else None,
            condition=condition,
            uncond_hidden_states=self.backbone.encode_prompts([negative_prompt] * len(prompts)),
            guidance_scale=guidance_scale,
            num_inference_steps=num_inference_steps,
            generator=torch.Generator().manual_seed(seed),
        )
        return self.backbone.decode_latents(latents)
