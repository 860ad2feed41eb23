"""Fixed-seed sample grids during training, and the adapter exported in its exchange format at the end."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import pytorch_lightning as pl
import torch
from torchvision.utils import make_grid, save_image

from adapters.grounding import GroundingCondition
from conditions.ranges import signed_to_unit
from lightning_modules.callbacks.base_model import (
    adapter_is_inert,
    base_model_key,
    read_base_images,
    write_base_images,
)
from lightning_modules.condition_views import grid_columns

log = logging.getLogger(__name__)


@torch.no_grad()
def generate_in_eval_mode(pl_module: pl.LightningModule, batch: dict, sampling: dict, use_adapter: bool = True):
    """Sample images (B, 3, H, W) in [0, 1] for a batch's conditions and prompts, with the module in eval mode."""
    was_training = pl_module.training
    pl_module.eval()
    try:
        return pl_module.generate(
            batch["condition"],
            list(batch["prompt"]),
            image_size=tuple(batch["pixel_values"].shape[-2:]),
            use_adapter=use_adapter,
            **sampling,
        )
    finally:
        pl_module.train(was_training)


class SampleGridCallback(pl.Callback):
    """Samples the first validation items with a fixed seed and saves a grid: condition | sample | target per row
    (grounding conditions: boxes | sample with boxes | target with boxes).

    Runs before the first step (the "before" picture), every ``every_n_steps`` optimizer steps, and at the end of
    training. Each grid is written to ``output_dir/step_XXXXXX.png`` and sent to loggers that show images (W&B).

    Args:
        output_dir: where the PNG grids go.
        every_n_steps: sampling period in optimizer steps (0: only before and after training).
        num_samples: rows of the grid (validation items).
        num_inference_steps, guidance_scale, scheduler: the sampler (scheduler: ddim | euler | dpmpp | unipc).
        seed: the noise seed, the same at every step so grids are comparable.
        base_cache_dir: where the base model's step-0 samples are kept for later runs (used while the adapter
            leaves the UNet unchanged, see ``callbacks.base_model``); None: always generated.
    """

    def __init__(
        self,
        output_dir: str,
        every_n_steps: int = 250,
        num_samples: int = 8,
        num_inference_steps: int = 20,
        guidance_scale: float = 5.0,
        scheduler: str = "unipc",
        seed: int = 0,
        base_cache_dir: str | None = None,
    ) -> None:
        self.output_dir = Path(output_dir)
        self.base_cache_dir = Path(base_cache_dir) if base_cache_dir else None
        self.every_n_steps = every_n_steps
        self.num_samples = num_samples
        self.sampling = {
            "num_inference_steps": num_inference_steps,
            "guidance_scale": guidance_scale,
            "scheduler": scheduler,
            "seed": seed,
        }
        self.last_step: int | None = None
        self.last_path: Path | None = None

    def grid_path(self, step: int) -> Path:
        return self.output_dir / f"step_{step:06d}.png"

    def end_of_run_done(self, trainer: pl.Trainer) -> bool:
        """Whether the grid of the final step exists (``ResumableEndOfRun``)."""
        return self.grid_path(trainer.global_step).is_file()

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._sample(trainer, pl_module)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx
    ) -> None:
        if self.every_n_steps > 0 and trainer.global_step % self.every_n_steps == 0:
            self._sample(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._sample(trainer, pl_module)

    def base_samples(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: dict) -> torch.Tensor | None:
        """The step-0 samples from ``base_cache_dir`` when the adapter leaves the UNet unchanged (zero-initialized:
        its samples are the base model's), generated without the adapter and kept there on a miss; else None."""
        if self.base_cache_dir is None or not adapter_is_inert(pl_module, batch):
            return None
        key = base_model_key(trainer, pl_module, batch, self.sampling, "sample_grid")
        samples = read_base_images(self.base_cache_dir, key)
        if samples is None:
            samples = generate_in_eval_mode(pl_module, batch, self.sampling, use_adapter=False).cpu()
            write_base_images(self.base_cache_dir, key, samples)
        else:
            log.info("step 0: the adapter leaves the UNet unchanged; the base model's samples from the cache")
        return samples

    @torch.no_grad()
    def _sample(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        step = trainer.global_step
        if step == self.last_step or trainer.sanity_checking or not trainer.is_global_zero:
            return
        batch = trainer.datamodule.fixed_batch(self.num_samples)
        samples = self.base_samples(trainer, pl_module, batch) if step == 0 else None
        if samples is None:
            samples = generate_in_eval_mode(pl_module, batch, self.sampling).cpu()
        target = signed_to_unit(batch["pixel_values"])
        columns = grid_columns(batch["condition"], samples, target)
        rows = torch.stack(columns, dim=1).flatten(0, 1)  # row-major: cond, sample, target
        grid = make_grid(rows, nrow=3, padding=2, pad_value=1.0)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        path = self.grid_path(step)
        temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}.png")
        save_image(grid, temporary)
        os.replace(temporary, path)  # a grid is complete or absent (end_of_run_done trusts the name)
        self.last_step, self.last_path = step, path
        caption = f"step {step}: condition | sample | target"
        if isinstance(batch["condition"], GroundingCondition):
            caption += " (boxes drawn in magenta)"
        for logger in trainer.loggers:
            if hasattr(logger, "log_image"):  # WandbLogger
                logger.log_image(key="val/samples", images=[grid], step=step, caption=[caption])
            elif hasattr(getattr(logger, "experiment", None), "add_image"):  # TensorBoardLogger
                logger.experiment.add_image("val/samples", grid, global_step=step)


class ExportAdapterCallback(pl.Callback):
    """At the end of training, saves the adapter in its exchange format (a diffusers folder for ControlNet).

    The folder is written under a temporary name and renamed into place, so ``output_dir`` is a complete export or
    absent, never half written by a killed run (``ResumableEndOfRun`` redoes an absent one)."""

    def __init__(self, output_dir: str) -> None:
        self.output_dir = Path(output_dir)

    def end_of_run_done(self, trainer: pl.Trainer) -> bool:
        return self.output_dir.is_dir()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        temporary = self.output_dir.with_name(f".{self.output_dir.name}.tmp-{os.getpid()}")
        shutil.rmtree(temporary, ignore_errors=True)
        pl_module.adapter.save_pretrained(temporary)
        readable_as_umask_allows(temporary)
        previous = self.output_dir.with_name(f".{self.output_dir.name}.old-{os.getpid()}")
        if self.output_dir.exists():  # a rerun replaces the export whole
            os.replace(self.output_dir, previous)
        os.replace(temporary, self.output_dir)
        shutil.rmtree(previous, ignore_errors=True)
        log.info("adapter exported to %s", self.output_dir)


def readable_as_umask_allows(folder: Path) -> None:
    """Give every file under ``folder`` the mode a new file gets under the process's umask (0644 under the usual
    022), as config.json beside them has: safetensors writes its files 0600, so an export shared with a group or a
    web server was unreadable to them."""
    umask = os.umask(0)
    os.umask(umask)
    for path in folder.rglob("*"):
        if path.is_file():
            path.chmod(0o666 & ~umask)
