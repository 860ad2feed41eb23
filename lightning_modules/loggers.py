"""Logger factories. W&B runs online when an API key is configured and offline otherwise: it never prompts."""

from __future__ import annotations

import netrc
import os
import secrets
import string
from pathlib import Path
from urllib.parse import urlparse

from pytorch_lightning.loggers import WandbLogger
from pytorch_lightning.utilities.rank_zero import rank_zero_only

from conditions.io import write_atomically
from lightning_modules.errors import CtrlkitError

WANDB_MODES = ("auto", "online", "offline", "disabled")


def wandb_api_key_configured() -> bool:
    """True when W&B has a key without asking: ``WANDB_API_KEY`` or a netrc entry for the W&B host."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    try:
        return netrc.netrc().authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def build_wandb_logger(
    project: str, save_dir: str, mode: str = "auto", log_adapter: bool = False, group: str | None = None, **kwargs
) -> WandbLogger:
    """A ``WandbLogger``; ``mode="auto"`` picks online when :func:`wandb_api_key_configured`, else offline.

    ``group="auto"``: the jobs of a Hydra sweep share one W&B group named after the sweep
    (:func:`lightning_modules.sweeps.sweep_group`); a single run gets none.

    ``log_adapter``: the exported adapter folder (with its model card) is logged as a ``model`` artifact at the end
    of training (``ModelCardCallback``). Lightning's ``log_model`` logs the training checkpoints instead, and refuses
    offline runs; it stays as Lightning defines it."""
    if mode not in WANDB_MODES:
        raise CtrlkitError(f"logger.wandb.mode='{mode}'; choose one of: {', '.join(WANDB_MODES)}")
    if mode == "auto":
        mode = "online" if wandb_api_key_configured() else "offline"
    if group == "auto":
        from lightning_modules.sweeps import sweep_group

        group = sweep_group()
    if group is not None:
        kwargs["group"] = str(group)
    os.makedirs(save_dir, exist_ok=True)
    if kwargs.get("id") is None:
        kwargs["id"] = run_id(save_dir)
        kwargs.setdefault("resume", "allow")
    logger = WandbLogger(project=project, save_dir=save_dir, offline=mode == "offline", mode=mode, **kwargs)
    logger.log_adapter = bool(log_adapter)  # read by ModelCardCallback
    return logger


def run_id(save_dir: str) -> str:
    """The W&B run id of the training run in ``save_dir`` (its run folder): made once and kept in
    ``<save_dir>/wandb_run_id``, so a resumed run (killed mid-training or in its end-of-run work) continues the same
    W&B run instead of starting a second one."""
    path = Path(save_dir) / "wandb_run_id"
    if path.is_file() and path.read_text().strip():
        return path.read_text().strip()
    new_id = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))  # W&B's id form
    # With several processes only rank zero logs (the others' W&B loggers are inert): only it names the run
    if getattr(rank_zero_only, "rank", 0) == 0:
        write_atomically(path, new_id + "\n")
    return new_id
