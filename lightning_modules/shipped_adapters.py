"""Adapters ctrlkit ships for the shipped tiny base model, loaded by name: ``adapter: tiny/controlnet_canny``.

Each folder in ``lightning_modules/assets/tiny_adapters/`` is the ``adapter/`` folder a documented ``ctrlkit
train`` run exported (weights in the family's format, ``README.md`` model card, ``samples.png``), plus the run's
``config.yaml`` as ``train_config.yaml`` so that ``ctrlkit evaluate`` knows its condition. They are retrained with
``bash examples/train_shipped_adapters.sh``.
"""

from __future__ import annotations

from pathlib import Path

from lightning_modules.errors import CtrlkitError

SHIPPED_TINY_ADAPTERS = Path(__file__).resolve().parent / "assets" / "tiny_adapters"
PREFIX = "tiny/"
# the training run's config.yaml, copied into a shipped folder (a run dir has it beside adapter/ instead)
RUN_CONFIG_NAME = "train_config.yaml"


def shipped_adapter_names() -> list[str]:
    """Names of the shipped adapters (``tiny/<name>``), sorted."""
    if not SHIPPED_TINY_ADAPTERS.is_dir():
        return []
    return sorted(folder.name for folder in SHIPPED_TINY_ADAPTERS.iterdir() if folder.is_dir())


def resolve_adapter(path: str) -> str:
    """``path`` itself when it exists or does not start with ``tiny/``; else the shipped adapter of that name.

    Raises ``CtrlkitError`` naming the shipped adapters for a ``tiny/<name>`` that is neither."""
    given = str(path)
    if not given.startswith(PREFIX) or Path(given).expanduser().exists():
        return given
    folder = SHIPPED_TINY_ADAPTERS / given.removeprefix(PREFIX)
    if folder.is_dir():
        return str(folder)
    names = ", ".join(PREFIX + name for name in shipped_adapter_names()) or "none (the assets folder is missing)"
    raise CtrlkitError(f"adapter {given} is neither a path nor a shipped adapter; shipped for model=tiny: {names}")
