"""Checkpoints for runs that get killed: the newest periodic ones, last.ckpt and best.ckpt."""

from __future__ import annotations

import logging
from pathlib import Path

import pytorch_lightning as pl
from pytorch_lightning.callbacks import ModelCheckpoint

from lightning_modules.checkpoints import checkpoint_files

log = logging.getLogger(__name__)


class AdapterCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` for runs that get killed: the newest ``keep_last`` periodic checkpoints, ``last.ckpt``
    (always the state at the end of training) and ``best.ckpt`` (the best ``best_metric`` so far).

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
        kwargs.setdefault("enable_version_counter", False)
        super().__init__(*args, **kwargs)
        if best_mode not in ("max", "min"):
            raise ValueError(f"best_mode must be 'max' or 'min', got '{best_mode}'")
        self.keep_last = keep_last
        self.best_metric = best_metric
        self.best_mode = best_mode
        self.best_score: float | None = None
        self.best_step: int | None = None
        self.best_key: str | None = None  # the score best.ckpt was picked by (``auto`` resolved)

    def end_of_run_done(self, trainer: pl.Trainer) -> bool:
        return not self.save_last or self.dirpath is None or (Path(self.dirpath) / "last.ckpt").is_file()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Lightning writes ``last`` at the end only when no ``last`` was saved before, so a run stopped by
        # ``max_steps`` after a periodic save would keep a stale ``last.ckpt``.
        if self.save_last and self._last_global_step_saved != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def _save_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
        super()._save_checkpoint(trainer, filepath)
        self._remove_old_periodic(trainer)

    def _remove_old_periodic(self, trainer: pl.Trainer) -> None:
        if self.keep_last < 0 or not trainer.is_global_zero or self.dirpath is None:
            return
        special = {f"{self.CHECKPOINT_NAME_LAST}{self.FILE_EXTENSION}", f"{self.BEST_NAME}{self.FILE_EXTENSION}"}
        periodic = [path for path in checkpoint_files(Path(self.dirpath)) if path.name not in special]
        for path in periodic[self.keep_last :]:
            trainer.strategy.remove_checkpoint(path)

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
        trainer.save_checkpoint(str(Path(self.dirpath) / f"{self.BEST_NAME}{self.FILE_EXTENSION}"), weights_only=False)
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
