"""The end of training as resumable work."""

from __future__ import annotations

import logging

import pytorch_lightning as pl

log = logging.getLogger(__name__)


class ResumableEndOfRun(pl.Callback):
    """The end of training as resumable work.

    Lightning skips the whole training loop, ``on_train_end`` included, when a resumed run's checkpoint is already
    at ``max_steps``: a run killed after its last checkpoint but before its adapter export, final sample grid or
    controllability summary would never get them. When the loop was skipped, this callback asks every callback
    with an ``end_of_run_done(trainer)`` method whether its output is there, and runs ``on_train_end`` of exactly
    those whose output is missing, with the restored weights, at the same step: no training step is added.
    """

    def __init__(self) -> None:
        self.trained = False

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.trained = True  # the loop ran: on_train_end runs (or ran) as usual

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.trained:
            return
        pending = [
            callback
            for callback in trainer.callbacks
            if hasattr(callback, "end_of_run_done") and not callback.end_of_run_done(trainer)
        ]
        if not pending:
            return
        names = ", ".join(type(callback).__name__ for callback in pending)
        log.info(
            "the run is at step %d of %d; redoing its missing end of training: %s",
            trainer.global_step,
            trainer.max_steps,
            names,
        )
        device = trainer.strategy.root_device  # Lightning's teardown moved the module to the CPU
        pl_module.to(device)
        try:
            for callback in pending:
                callback.on_train_end(trainer, pl_module)
        finally:
            pl_module.cpu()
