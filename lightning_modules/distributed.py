"""Running as one of several processes (DDP, FSDP, DeepSpeed): work done once and shared, and logs that say which
process speaks."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import TypeVar

import pytorch_lightning as pl
from pytorch_lightning.utilities.rank_zero import rank_zero_only

T = TypeVar("T")


def on_rank_zero(trainer: pl.Trainer, compute: Callable[[], T]) -> T:
    """``compute()`` on rank zero only, its result on every process (a picklable value); one process: ``compute()``.
    For work that must happen once (sampling images to score them) but whose result every process needs, e.g. to
    take part in a collective checkpoint save that depends on it."""
    if getattr(trainer, "world_size", 1) == 1:  # (a stand-in trainer of a test has none)
        return compute()
    value = compute() if trainer.is_global_zero else None
    return trainer.strategy.broadcast(value, src=0)


def rank_label() -> str:
    """ " [rank N]" when this process is one of several (Lightning's rank, else the launcher's RANK), else ""."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return ""
    rank = getattr(rank_zero_only, "rank", None)
    return f" [rank {rank if rank is not None else os.environ.get('RANK', '?')}]"


def install_rank_in_log_records() -> None:
    """Give every log record a ``rank`` attribute (``rank_label``), which the log format of conf/hydra prints."""
    factory = logging.getLogRecordFactory()
    if getattr(factory, "adds_rank", False):
        return

    def record_with_rank(*args, **kwargs) -> logging.LogRecord:
        record = factory(*args, **kwargs)
        record.rank = rank_label()
        return record

    record_with_rank.adds_rank = True
    logging.setLogRecordFactory(record_with_rank)


def all_ranks(trainer: pl.Trainer | None, flag: bool) -> bool:
    """Whether ``flag`` holds on every process (one process, or no trainer: ``flag``). A decision that makes a
    process skip its backward pass must be taken by all of them, or the others wait for its gradients forever."""
    if trainer is None or getattr(trainer, "world_size", 1) == 1:
        return flag
    return bool(trainer.strategy.reduce_boolean_decision(flag, all=True))
