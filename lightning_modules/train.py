"""``ctrlkit train``: compose the config, build backbone -> extractor -> data -> adapter -> system, fit, report.

``train(cfg)`` is the whole recipe and returns ``(metrics, objects)`` so tests can call it on a composed config.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import ModelCheckpoint

from lightning_modules.config_checks import check_train_config
from lightning_modules.errors import CtrlkitError

log = logging.getLogger(__name__)


def check_checkpoint(path: str | None) -> str | None:
    """Return ``path`` if it is a readable ctrlkit training checkpoint; raise a one-line error otherwise."""
    if path is None:
        return None
    checkpoint_file = Path(path)
    if not checkpoint_file.is_file():
        raise CtrlkitError(f"ckpt_path {checkpoint_file} does not exist")
    try:
        checkpoint = torch.load(checkpoint_file, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for foreign or corrupt files
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CtrlkitError(
            f"ckpt_path {checkpoint_file} is not a ctrlkit training checkpoint (a Lightning .ckpt written by "
            f"ctrlkit train): {reason}"
        ) from error
    if (
        not isinstance(checkpoint, dict)
        or "state_dict" not in checkpoint
        or "pytorch-lightning_version" not in checkpoint
    ):
        raise CtrlkitError(
            f"ckpt_path {checkpoint_file} is not a ctrlkit training checkpoint: expected a Lightning checkpoint with "
            f"'state_dict' and 'pytorch-lightning_version'"
        )
    return str(checkpoint_file)


def _instantiate_group(group: DictConfig | None) -> list:
    """Instantiate every entry of a group such as ``callbacks`` or ``logger`` (a dict of ``_target_`` configs)."""
    if not group:
        return []
    return [
        instantiate(entry, _convert_="all")
        for entry in group.values()
        if isinstance(entry, DictConfig) and "_target_" in entry
    ]


def train(cfg: DictConfig) -> tuple[dict, dict]:
    """Train the configured adapter; returns (final metrics, built objects)."""
    started = time.perf_counter()
    check_train_config(cfg)
    ckpt_path = check_checkpoint(cfg.get("ckpt_path"))
    pl.seed_everything(cfg.seed, workers=True)

    log.info("building backbone <%s>", cfg.model._target_)
    backbone = instantiate(cfg.model, _convert_="all")
    backbone.check_image_size(cfg.data.image_size)
    extractor = instantiate(cfg.condition.extractor, _convert_="all")
    datamodule = instantiate(cfg.data, extractor=extractor, _convert_="all")
    # Config gives the adapter's knobs, the loaded model gives its shapes.
    adapter = instantiate(cfg.adapter.build, _convert_="all")(
        backbone.unet, vae_scale_factor=backbone.vae_scale_factor
    )
    # _convert_="all": plain lists in hparams, so checkpoints load with weights_only=True.
    system = instantiate(cfg.system, backbone=backbone, adapter=adapter, _convert_="all")
    callbacks = _instantiate_group(cfg.get("callbacks"))
    loggers = _instantiate_group(cfg.get("logger"))
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)

    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    resolved.pop("hydra", None)
    OmegaConf.save(OmegaConf.create(resolved), output_dir / "config.yaml")
    for logger in loggers:
        logger.log_hyperparams(resolved)

    try:
        trainer.fit(system, datamodule=datamodule, ckpt_path=ckpt_path)
    finally:
        _finish_wandb(loggers)

    metrics = {name: float(value) for name, value in trainer.callback_metrics.items()}
    objects = {
        "cfg": cfg,
        "backbone": backbone,
        "adapter": adapter,
        "system": system,
        "datamodule": datamodule,
        "trainer": trainer,
        "callbacks": callbacks,
        "loggers": loggers,
    }
    if trainer.is_global_zero:
        print(_summary(objects, output_dir, time.perf_counter() - started))
    return metrics, objects


def _finish_wandb(loggers: list) -> None:
    """Close W&B runs so the next job of a sweep (same process) starts a new run instead of reusing this one."""
    for logger in loggers:
        if type(logger).__name__ == "WandbLogger" and logger._experiment is not None:
            logger.experiment.finish()


def _summary(objects: dict, output_dir: Path, seconds: float) -> str:
    trainer = objects["trainer"]
    lines = [f"ctrlkit train: {trainer.global_step} steps in {seconds:.0f} s; outputs in {output_dir}"]
    lines.append(f"  config:       {output_dir / 'config.yaml'}")
    for callback in objects["callbacks"]:
        name = type(callback).__name__
        if isinstance(callback, ModelCheckpoint) and callback.dirpath:
            lines.append(f"  checkpoints:  {callback.dirpath}")
        elif name == "ExportAdapterCallback":
            lines.append(f"  adapter:      {callback.output_dir}  (diffusers format)")
        elif name == "SampleGridCallback" and callback.last_path is not None:
            lines.append(f"  sample grid:  {callback.last_path}")
    for logger in objects["loggers"]:
        if type(logger).__name__ == "WandbLogger":
            run_dir = Path(logger.save_dir) / "wandb"
            lines.append(f"  W&B run:      {run_dir}  (offline runs upload with `wandb sync <run dir>`)")
        elif getattr(logger, "log_dir", None):
            lines.append(f"  {type(logger).__name__}: {logger.log_dir}")
    metrics = {name: round(float(value), 5) for name, value in trainer.callback_metrics.items()}
    lines.append(f"  metrics:      {metrics}")
    return "\n".join(lines)
