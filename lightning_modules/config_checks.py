"""Checks on the composed config that run before any model loads, each failing with a one-line message."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from lightning_modules.errors import CtrlkitError

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
# Hydra functions that build sweep values; their arguments are not option names.
_SWEEP_FUNCTIONS = ("glob(", "range(", "choice(", "interval(", "tag(", "sort(", "shuffle(")


def group_options(group: str, conf_dir: Path = CONF_DIR) -> list[str]:
    """Option names of a config group (its yaml files), e.g. group_options("adapter") -> ["controlnet"]."""
    return sorted(path.stem for path in (conf_dir / group).glob("*.yaml"))


def check_group_overrides(overrides: list[str], conf_dir: Path = CONF_DIR) -> None:
    """Reject ``group=name`` overrides that name no yaml in ``conf/<group>/``, before Hydra composes anything."""
    for override in overrides:
        key, sep, value = override.lstrip("+~").partition("=")
        if not sep or "." in key or not (conf_dir / key).is_dir():
            continue
        if value.startswith(_SWEEP_FUNCTIONS) or value in ("null", "", "[]"):
            continue
        options = group_options(key, conf_dir)
        for name in value.split(","):
            if name.strip() not in options:
                raise CtrlkitError(f"unknown {key} '{name.strip()}'; choose one of: {', '.join(options)}")


def check_train_config(cfg: DictConfig) -> None:
    """Adapter x condition compatibility and required values, named by config key."""
    accepts, kind = cfg.adapter.accepts, cfg.condition.kind
    if accepts != kind:
        raise CtrlkitError(
            f"adapter '{cfg.adapter.name}' takes {accepts} conditions but condition '{cfg.condition.name}' gives "
            f"{kind} conditions; pick a condition of kind '{accepts}'"
        )
    for key in ("model.path", "paths.output_dir"):
        if _is_missing(cfg, key):
            raise CtrlkitError(f"{key} is required with model={cfg.model.get('name', '?')}: add {key}=<path>")
    for key in ("condition.extractor.weights_dir", "condition.extractor.model", "data.root"):
        if _is_missing(cfg, key):
            raise CtrlkitError(f"{key} is required: add {key}=<path>")


def _is_missing(cfg: DictConfig, dotted_key: str) -> bool:
    """True when ``dotted_key`` exists and is the mandatory-value marker ``???``."""
    parent_key, _, leaf = dotted_key.rpartition(".")
    parent = OmegaConf.select(cfg, parent_key, throw_on_missing=False) if parent_key else cfg
    # `leaf in parent` is False for a ??? value, so look at the keys themselves.
    return isinstance(parent, DictConfig) and leaf in parent.keys() and OmegaConf.is_missing(parent, leaf)
