"""Training checkpoints that survive a kill: atomic writes, safe reads, finding the newest good one, RNG states.

A run killed while writing a checkpoint must never leave a half-written file under a checkpoint's name, and a run
that resumes must never run code from a checkpoint file. So:

- ``AtomicCheckpointIO`` (a Lightning ``CheckpointIO`` plugin) writes ``<name>.tmp-<pid>``, flushes it to disk,
  then renames it over ``<name>`` (``os.replace`` is atomic on POSIX); reads use ``torch.load(weights_only=True)``.
- ``find_resume_checkpoint`` walks a run's ``checkpoints/`` newest first and returns the first file that loads,
  reporting each unreadable (truncated, corrupt) one it passes over.
- ``capture_rng_states`` / ``restore_rng_states``: torch, CUDA, numpy and Python RNG states as plain values, so a
  checkpoint holding them still loads with ``weights_only=True``.
"""

from __future__ import annotations

import logging
import os
import pickle
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO

from conditions.weights import UnsafeWeightsError, unsafe_pickle_message
from lightning_modules.errors import CtrlkitError

log = logging.getLogger(__name__)
RESUME_AUTO = ("auto", "last")


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint to a temporary file, then renames it into place; loads with ``weights_only=True``."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        """Write atomically; when the folder cannot be written (permissions, a full disk), the same state goes to
        ``rescue_path(path)`` and the run stops with one line saying where it is and how to continue."""
        target = Path(path)
        try:
            _save_atomically(checkpoint, target)
        except OSError as error:
            rescue = rescue_path(target)
            try:
                _save_atomically(checkpoint, rescue)
            except OSError as rescue_error:
                raise CtrlkitError(
                    f"cannot write checkpoint {target} ({error.strerror or error}) nor its rescue copy {rescue} "
                    f"({rescue_error.strerror or rescue_error}); the steps since the last checkpoint are lost"
                ) from error
            raise CtrlkitError(
                f"cannot write checkpoint {target} ({error.strerror or error}); the training state was saved to "
                f"{rescue} instead: make the folder writable and continue with ckpt_path={rescue}"
            ) from error

    def load_checkpoint(self, path, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        return read_training_checkpoint(path)


def _save_atomically(checkpoint: dict[str, Any], target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    try:
        with open(temporary, "wb") as file:
            torch.save(checkpoint, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, target)  # readers see the old file or the new one, never a partial one
    finally:
        try:
            temporary.unlink(missing_ok=True)
        except OSError:  # the folder itself is what failed
            pass


def rescue_path(target: Path) -> Path:
    """Where a checkpoint goes when its own folder cannot be written: the system's temporary folder, under a name
    unique to the run's checkpoint folder (``ctrlkit-rescue/<run>-<hash>/<file>``)."""
    import hashlib
    import tempfile

    folder = target.parent.absolute()
    digest = hashlib.sha1(str(folder).encode()).hexdigest()[:8]
    return Path(tempfile.gettempdir()) / "ctrlkit-rescue" / f"{folder.parent.name}-{digest}" / target.name


def read_training_checkpoint(path: str | Path) -> dict:
    """Load a ctrlkit/Lightning training checkpoint without running code from it.

    Raises:
        UnsafeWeightsError: the file is a pickle that needs arbitrary code.
        CtrlkitError: missing, unreadable (truncated, corrupt) or not a Lightning checkpoint; one line.
    """
    checkpoint_file = Path(path)
    if not checkpoint_file.is_file():
        raise CtrlkitError(f"checkpoint {checkpoint_file} does not exist")
    try:
        checkpoint = torch.load(checkpoint_file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if "GLOBAL" in str(error):
            raise UnsafeWeightsError(unsafe_pickle_message(checkpoint_file, error)) from error
        raise CtrlkitError(_not_a_checkpoint(checkpoint_file, error)) from error
    except Exception as error:  # torch raises many types for truncated or foreign files
        raise CtrlkitError(_not_a_checkpoint(checkpoint_file, error)) from error
    if (
        not isinstance(checkpoint, dict)
        or "state_dict" not in checkpoint
        or "pytorch-lightning_version" not in checkpoint
    ):
        raise CtrlkitError(
            f"{checkpoint_file} is not a ctrlkit training checkpoint: expected a Lightning checkpoint with "
            f"'state_dict' and 'pytorch-lightning_version'"
        )
    return checkpoint


def _not_a_checkpoint(path: Path, error: Exception) -> str:
    # torch's messages run to paragraphs: keep the line that says what failed (miniz's, or the first)
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    reason = next((line for line in lines if "failed" in line and "Weights only" not in line), None)
    reason = (reason or (lines[0] if lines else type(error).__name__)).split(". ")[0][:160]
    return (
        f"{path} is not a ctrlkit training checkpoint (a Lightning .ckpt written by ctrlkit train) "
        f"or is truncated: {reason}"
    )


def checkpoint_files(checkpoint_dir: Path) -> list[Path]:
    """``*.ckpt`` files of a checkpoint folder, newest first; ``best.ckpt`` comes last (resume continues the run
    where it stopped, the best checkpoint is only a last resort)."""
    files = [path for path in checkpoint_dir.glob("*.ckpt") if path.is_file()]
    return sorted(
        files,
        key=lambda path: (path.name != "best.ckpt", path.stat().st_mtime_ns, path.name == "last.ckpt"),
        reverse=True,
    )


def find_resume_checkpoint(run_dir: Path) -> Path | None:
    """The newest checkpoint in ``run_dir/checkpoints`` that loads; unreadable newer ones are reported and skipped.

    Returns None when the run has no checkpoint at all. Raises CtrlkitError when it has some but none loads.
    """
    candidates = checkpoint_files(Path(run_dir) / "checkpoints")
    for path in candidates:
        try:
            read_training_checkpoint(path)
        except (CtrlkitError, UnsafeWeightsError) as error:
            log.warning("resume: skipping unreadable checkpoint %s (%s); trying the previous one", path, error)
            continue
        return path
    if candidates:
        raise CtrlkitError(f"resume: no checkpoint in {Path(run_dir) / 'checkpoints'} can be read; start afresh")
    return None


def newest_run_with_checkpoints(runs_dir: Path, exclude: Path | None = None) -> Path | None:
    """The run folder under ``runs_dir`` whose newest checkpoint is the most recent (``resume=auto``)."""
    if not runs_dir.is_dir():
        return None
    best: tuple[int, Path] | None = None
    for run in runs_dir.iterdir():
        if exclude is not None and run.resolve() == exclude.resolve():
            continue
        files = checkpoint_files(run / "checkpoints") if run.is_dir() else []
        if files and (best is None or files[0].stat().st_mtime_ns > best[0]):
            best = (files[0].stat().st_mtime_ns, run)
    return None if best is None else best[1]


def capture_rng_states() -> dict:
    """Every global RNG state as plain values (tensors, ints, lists) that ``weights_only`` loading accepts."""
    numpy_state = np.random.get_state()
    states = {
        "torch": torch.get_rng_state(),
        "numpy": [numpy_state[0], torch.from_numpy(numpy_state[1].astype(np.int64)), *map(_plain, numpy_state[2:])],
        "python": _plain(random.getstate()),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict) -> None:
    """Set the global RNGs back to ``capture_rng_states``' values."""
    torch.set_rng_state(states["torch"])
    name, keys, position, has_gauss, cached_gaussian = states["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), position, has_gauss, cached_gaussian))
    version, internal, gauss_next = states["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def _plain(value):
    """numpy scalars -> Python numbers, tuples -> lists (recursively), for weights_only-loadable checkpoints."""
    if isinstance(value, tuple | list):
        return [_plain(item) for item in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def apply_configured_learning_rates(checkpoint: dict, configured: list[float]) -> bool:
    """Make a checkpoint's optimizer and LR schedule train at the ``configured`` learning rates (one per param
    group), keeping its moments and its place in the schedule: where a group's base rate differs, its base rate
    becomes the configured one and its current rate is rescaled by the same factor (diffusers' schedules multiply
    the base rate). Without this, ``ckpt_path=<run>`` with another ``adapter.learning_rate`` (a fine-tuning at a
    lower rate) silently trained at the checkpoint's rate. An exact resume (same config) changes nothing. Returns
    whether anything changed."""
    optimizers, schedulers = checkpoint.get("optimizer_states") or [], checkpoint.get("lr_schedulers") or []
    if len(optimizers) != 1:
        return False
    groups = optimizers[0]["param_groups"]
    if len(groups) != len(configured):
        log.warning(
            "the checkpoint has %d param groups, the adapter %d: its learning rates are kept",
            len(groups),
            len(configured),
        )
        return False
    base = [group.get("initial_lr", group["lr"]) for group in groups]
    if all(np.isclose(old, new, rtol=1e-9, atol=0.0) for old, new in zip(base, configured)):
        return False
    factors = [new / old if old else 0.0 for old, new in zip(base, configured)]
    for group, new, factor in zip(groups, configured, factors):
        group["lr"] = new if not group.get("initial_lr") else group["lr"] * factor
        if "initial_lr" in group:
            group["initial_lr"] = new
    for scheduler in schedulers:
        if "base_lrs" in scheduler:
            scheduler["base_lrs"] = list(configured)
        if "_last_lr" in scheduler:
            scheduler["_last_lr"] = [group["lr"] for group in groups]
    log.warning(
        "learning rates from the config %s, not the checkpoint's %s (its optimizer moments and schedule position "
        "are kept)",
        [f"{rate:g}" for rate in configured],
        [f"{rate:g}" for rate in base],
    )
    return True
