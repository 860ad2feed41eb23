"""A callback that makes training steps slow from a given step on, so a test can kill the run mid-training."""

from __future__ import annotations

import time
from pathlib import Path

import pytorch_lightning as pl


class SleepFromStep(pl.Callback):
    """Sleeps ``seconds`` after every training batch once ``global_step >= step``, first writing the step into
    ``marker`` (the test's signal that the run got there)."""

    def __init__(self, step: int, seconds: float, marker: str) -> None:
        self.step = step
        self.seconds = seconds
        self.marker = Path(marker)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx):
        if trainer.global_step >= self.step:
            self.marker.write_text(str(trainer.global_step))
            time.sleep(self.seconds)
