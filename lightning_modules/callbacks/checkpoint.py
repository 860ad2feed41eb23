"""Checkpoints for runs that get killed: the newest periodic ones, last.ckpt and best.ckpt."""

from __future__ import annotations

import logging
from pathlib import Path

import pytorch_lightning as pl
from pytorch_lightning.callbacks import ModelCheckpoint

from lightning_modules.errors import CtrlkitError

log = logging.getLogger(__name__)


class AdapterCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` for runs that get killed: the newest ``keep_last`` periodic checkpoints, ``last.ckpt``
    (always the state at the end of training) and ``best.ckpt`` (the best ``best_metric`` so far).

    Only Lightning's public API: the periodic checkpoints are ``ModelCheckpoint``'s top ``keep_last`` by
    ``step`` (the newest), ``last.ckpt`` is brought up to date in ``on_train_end`` with ``trainer.save_checkpoint``.
    Files are written atomically by the trainer's ``AtomicCheckpointIO`` and overwritten in place when a resumed run
    reaches a step again (no ``-v1`` copies). ``best_metric`` (by default the condition's score, from the
    controllability callback) arrives through ``consider_best`` when it is measured, so ``best.ckpt`` holds the
    weights that scored it.

    Args (besides ``ModelCheckpoint``'s):
        keep_last: periodic checkpoints kept (newest first); -1 keeps all.
        best_metric: the score that picks ``best.ckpt``: ``auto`` (the controllability callback's jump metric, the
            condition's own score: canny_f1 for canny, box_iou for boxes, ...; its direction decides), a logged key
            such as ``val/mask_iou``, or None (no best checkpoint).
        best_mode: ``max`` or ``min`` for a named ``best_metric``.
    """

    BEST_NAME = "best"

    def __init__(
        self,
        *args,
        keep_last: int = 3,
        best_metric: str | None = "auto",
        best_mode: str = "max",
        **kwargs,
    ) -> None:
        for taken in ("monitor", "mode", "save_top_k"):
            if taken in kwargs:
                raise CtrlkitError(
                    f"callbacks.model_checkpoint.{taken} is set by ctrlkit (the periodic checkpoints are the newest "
                    "by step); use keep_last for how many are kept and best_metric/best_mode for best.ckpt"
                )
        if best_mode not in ("max", "min"):
            raise CtrlkitError(f"callbacks.model_checkpoint.best_mode must be 'max' or 'min', got '{best_mode}'")
        kwargs.setdefault("enable_version_counter", False)
        # Lightning defers a save due on an epoch's last batch to the end of a validation it expects right after the
        # epoch; validation here runs every val_check_interval steps, across epochs, so that save would be lost.
        # The monitored "step" is never stale: save on the training step (every_n_epochs stays 0: no epoch saves).
        kwargs.setdefault("save_on_train_epoch_end", True)
        # the periodic checkpoints are Lightning's top-k by step: the newest ``keep_last`` (-1: all)
        super().__init__(*args, monitor="step", mode="max", save_top_k=keep_last, **kwargs)
        self.keep_last = keep_last
        self.best_metric = best_metric
        self.best_mode = best_mode
        self.best_score: float | None = None
        self.best_step: int | None = None
        self.best_key: str | None = None  # the score best.ckpt was picked by (``auto`` resolved)
        # the step of the newest periodic/last checkpoint this process wrote (best.ckpt writes are not counted)
        self.written_step: int | None = None
        self.writing_best = False

    def end_of_run_done(self, trainer: pl.Trainer) -> bool:
        return not self.save_last or self.dirpath is None or self.last_path().is_file()

    def last_path(self) -> Path:
        return Path(self.dirpath) / f"{self.CHECKPOINT_NAME_LAST}{self.FILE_EXTENSION}"

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        # Lightning writes last.ckpt together with every periodic checkpoint: the step of the newest write is the
        # step last.ckpt holds
        if not self.writing_best:
            self.written_step = int(checkpoint["global_step"])

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Lightning writes ``last`` at the end only when no ``last`` was saved before, so a run stopped by
        # ``max_steps`` after a periodic save would keep a stale ``last.ckpt``: write it unless it is current.
        if not self.save_last or self.dirpath is None or self.written_step == trainer.global_step:
            return
        self.last_model_path = str(self.last_path())
        trainer.save_checkpoint(self.last_model_path, weights_only=self.save_weights_only)

    def consider_best(
        self, trainer: pl.Trainer, metric: str, score: float, *, primary: bool = False, higher_is_better: bool = True
    ) -> None:
        """A fresh ``metric`` value for the current weights: write ``best.ckpt`` if it beats the best so far.
        ``primary``: it is the controllability callback's jump metric (what ``best_metric: auto`` follows)."""
        wanted = primary if self.best_metric == "auto" else metric == self.best_metric
        if not wanted or self.dirpath is None or trainer.sanity_checking:
            return
        mode = ("max" if higher_is_better else "min") if self.best_metric == "auto" else self.best_mode
        better = self.best_score is None or (score > self.best_score if mode == "max" else score < self.best_score)
        if not better:
            return
        self.best_score, self.best_step, self.best_key = float(score), trainer.global_step, metric
        self.writing_best = True
        try:
            path = Path(self.dirpath) / f"{self.BEST_NAME}{self.FILE_EXTENSION}"
            trainer.save_checkpoint(str(path), weights_only=False)
        finally:
            self.writing_best = False
        if trainer.is_global_zero:
            log.info("best %s=%.4f at step %d -> %s", metric, score, trainer.global_step, self.dirpath)

    def state_dict(self) -> dict:
        return {
            **super().state_dict(),
            "best_score": self.best_score,
            "best_step": self.best_step,
            "best_key": self.best_key,
        }

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self.best_score = state_dict.get("best_score")
        self.best_step = state_dict.get("best_step")
        self.best_key = state_dict.get("best_key")
