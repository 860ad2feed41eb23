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
from omegaconf import DictConfig, OmegaConf, open_dict
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.utilities.rank_zero import rank_zero_only

from adapters.base import AdapterFormatError
from adapters.registry import adapter_class_for, initialize_from_saved
from conditions.io import check_writable_dir, write_atomically
from lightning_modules.checkpoints import (
    RESUME_AUTO,
    AtomicCheckpointIO,
    checkpoint_files,
    find_resume_checkpoint,
    newest_run_with_checkpoints,
    read_training_checkpoint,
)
from lightning_modules.commands.config_checks import check_train_config
from lightning_modules.errors import CtrlkitError
from lightning_modules.shipped_adapters import resolve_adapter

log = logging.getLogger(__name__)


# Lines for the person who started the run, printed once: under DDP every process runs this module, and Lightning
# sets the rank from the launcher's environment before the Trainer exists.
say = rank_zero_only(print)


def check_checkpoint(path: str | None) -> str | None:
    """Return ``path`` if it is a readable ctrlkit training checkpoint; raise a one-line error otherwise."""
    if path is None:
        return None
    read_training_checkpoint(path)
    return str(path)


def resolve_resume(cfg: DictConfig) -> str | None:
    """The checkpoint this run starts from, or None for a fresh run.

    - ``ckpt_path=<file>``: that checkpoint; the run writes into its own new directory.
    - ``resume=auto`` (or ``ckpt_path=last``): the newest good checkpoint of this run directory (when it has one,
      e.g. ``hydra.run.dir=<old run>``), else of the newest run under the same ``runs/`` folder; a fresh run when
      there is none. ``resume=<run dir>`` names the run. Either way training continues in that run's directory
      (``paths.output_dir`` is switched to it), so its checkpoints stay together.
    A truncated or unreadable newest checkpoint is reported and the one before it is used.
    """
    resume, ckpt_path = cfg.get("resume"), cfg.get("ckpt_path")
    if ckpt_path is not None and str(ckpt_path) in RESUME_AUTO:
        resume, ckpt_path = "auto", None
    if ckpt_path is not None:
        if resume is not None:
            raise CtrlkitError("give resume=<auto|run dir> or ckpt_path=<file>, not both")
        return check_checkpoint(str(ckpt_path))
    if resume is None:
        return None
    output_dir = Path(cfg.paths.output_dir)
    if str(resume) == "auto":
        has_checkpoints = bool(checkpoint_files(output_dir / "checkpoints"))
        run_dir = output_dir if has_checkpoints else newest_run_with_checkpoints(output_dir.parent, output_dir)
        if run_dir is None:
            say(f"resume=auto: no checkpoint under {output_dir.parent}; starting a new run")
            return None
    else:
        run_dir = Path(str(resume)).expanduser()
        if run_dir.is_file():
            return check_checkpoint(str(run_dir))
        if run_dir.name == "checkpoints":
            run_dir = run_dir.parent
        if not run_dir.is_dir():
            raise CtrlkitError(f"resume={resume}: no such run directory; give auto, a run directory or a .ckpt file")
    checkpoint = find_resume_checkpoint(run_dir)
    if checkpoint is None:
        raise CtrlkitError(f"resume={resume}: {run_dir / 'checkpoints'} holds no checkpoint")
    if run_dir.resolve() != output_dir.resolve():
        with open_dict(cfg):
            cfg.paths.output_dir = str(run_dir)
    say(f"resuming from {checkpoint}; the run continues in {run_dir}")
    return str(checkpoint)


def _instantiate_group(group: DictConfig | None) -> list:
    """Instantiate every entry of a group such as ``callbacks`` or ``logger`` (a dict of ``_target_`` configs)."""
    if not group:
        return []
    return [
        instantiate(entry, _convert_="all")
        for entry in group.values()
        if isinstance(entry, DictConfig) and "_target_" in entry
    ]


def build_system(cfg: DictConfig) -> tuple:
    """(backbone, datamodule, adapter, system) as a training run builds them (``ctrlkit cache`` builds the same)."""
    log.info("building backbone <%s>", cfg.model._target_)
    backbone = instantiate(cfg.model, _convert_="all")
    backbone.check_image_size(cfg.data.image_size)
    extractor = instantiate(cfg.condition.extractor, _convert_="all")
    datamodule = instantiate(cfg.data, extractor=extractor, _convert_="all")
    # Config gives the adapter's knobs, the loaded model gives its shapes.
    try:
        adapter = instantiate(cfg.adapter.build, _convert_="all")(
            backbone.unet, vae_scale_factor=backbone.vae_scale_factor
        )
    except ValueError as error:  # the adapter refusing its settings for this base or condition: one line
        raise CtrlkitError(f"adapter={cfg.adapter.name}: {error}") from error
    # _convert_="all": plain lists in hparams, so checkpoints load with weights_only=True.
    system = instantiate(cfg.system, backbone=backbone, adapter=adapter, _convert_="all")
    return backbone, datamodule, adapter, system


def init_adapter_path(cfg: DictConfig, resuming: bool) -> str | None:
    """The saved adapter ``init_adapter=<folder or file | tiny/<name>>`` names, checked to exist and to be an
    adapter before any model loads; None without one, or for a resumed run (its checkpoint holds the weights).
    ``ckpt_path`` beside it is refused."""
    path = cfg.get("init_adapter")
    if path is None:
        return None
    if cfg.get("ckpt_path") is not None and str(cfg.ckpt_path) not in RESUME_AUTO:
        raise CtrlkitError(
            "give init_adapter=<adapter> (weights only) or ckpt_path=<file> (a training state), not both"
        )
    if resuming:
        log.info("init_adapter=%s not applied: the resumed checkpoint holds the weights", path)
        return None
    try:
        resolved = resolve_adapter(str(path))
        adapter_class_for(resolved)
    except (AdapterFormatError, CtrlkitError) as error:
        raise CtrlkitError(f"init_adapter={path}: {error}") from error
    return resolved


def initialize_adapter(cfg: DictConfig, adapter, backbone, resuming: bool) -> None:
    """``init_adapter=``: start the built adapter from saved weights (step 0, a fresh optimizer)."""
    path = init_adapter_path(cfg, resuming)
    if path is None:
        return
    try:
        found = initialize_from_saved(adapter, path, backbone.unet)
    except AdapterFormatError as error:
        raise CtrlkitError(f"init_adapter={cfg.init_adapter}: {error}") from error
    say(f"init_adapter: the adapter starts from {cfg.init_adapter} ({found})")


def train(cfg: DictConfig) -> tuple[dict, dict]:
    """Train the configured adapter; returns (final metrics, built objects)."""
    started = time.perf_counter()
    check_train_config(cfg)
    ckpt_path = resolve_resume(cfg)
    check_writable_dir(cfg.paths.output_dir, "the run folder (paths.output_dir)")
    init_adapter_path(cfg, resuming=ckpt_path is not None)  # a wrong path fails before the models load
    pl.seed_everything(cfg.seed, workers=True)

    backbone, datamodule, adapter, system = build_system(cfg)
    initialize_adapter(cfg, adapter, backbone, resuming=ckpt_path is not None)
    callbacks = _instantiate_group(cfg.get("callbacks"))
    loggers = _instantiate_group(cfg.get("logger"))
    # AtomicCheckpointIO: a checkpoint file is complete or absent, never half-written by a killed job
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False, plugins=[AtomicCheckpointIO()])

    if ckpt_path is not None:
        # before anything is written to the run: a failed resume leaves its config.yaml as it was
        system.check_checkpoint_fits(read_training_checkpoint(ckpt_path))
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    resolved.pop("hydra", None)
    write_atomically(output_dir / "config.yaml", OmegaConf.to_yaml(OmegaConf.create(resolved)))
    for logger in loggers:
        logger.log_hyperparams(resolved)

    try:
        trainer.fit(system, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    finally:
        _finish_wandb(loggers)
        if system.hparams.compile:  # a fit that raised never reached on_fit_end, which gives this back too
            torch.compiler.set_stance("default")

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
    """Close the W&B run so the next job of a sweep (same process) starts a new run instead of reusing this one.
    ``wandb.run`` is the process's active run (the one ``WandbLogger`` started), None when no run was started;
    ``logger.experiment`` would start one."""
    if not any(type(logger).__name__ == "WandbLogger" for logger in loggers):
        return
    import wandb

    if wandb.run is not None:
        wandb.run.finish()


def _summary(objects: dict, output_dir: Path, seconds: float) -> str:
    trainer = objects["trainer"]
    lines = [f"ctrlkit train: {trainer.global_step} steps in {seconds:.0f} s; outputs in {output_dir}"]
    lines.append(f"  config:       {output_dir / 'config.yaml'}")
    for callback in objects["callbacks"]:
        name = type(callback).__name__
        if isinstance(callback, ModelCheckpoint) and callback.dirpath and Path(callback.dirpath).is_dir():
            lines.append(f"  checkpoints:  {callback.dirpath}")
        elif name == "ExportAdapterCallback" and callback.output_dir.is_dir():
            lines.append(f"  adapter:      {callback.output_dir}  (diffusers format)")
        elif name == "SampleGridCallback" and callback.last_path is not None and callback.last_path.is_file():
            lines.append(f"  sample grid:  {callback.last_path}")
    for logger in objects["loggers"]:
        if type(logger).__name__ == "WandbLogger":
            run_dir = Path(logger.save_dir) / "wandb"
            lines.append(f"  W&B run:      {run_dir}  (offline runs upload with `wandb sync <run dir>`)")
        elif getattr(logger, "log_dir", None):
            lines.append(f"  {type(logger).__name__}: {logger.log_dir}")
    system, datamodule = objects["system"], objects["datamodule"]
    skipped_lines = getattr(datamodule, "skipped_lines", 0)
    if system.skipped_items or skipped_lines or system.nonfinite_steps:
        lines.append(
            f"  bad data:     {skipped_lines} index line(s) and {system.skipped_items} item(s) skipped; "
            f"{system.nonfinite_steps} step(s) skipped for a non-finite loss"
        )
    metrics = {name: round(float(value), 5) for name, value in trainer.callback_metrics.items()}
    lines.append(f"  metrics:      {metrics}")
    return "\n".join(lines)
