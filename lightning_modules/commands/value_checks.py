"""Checks of the values in a composed config, before any model loads, each failing with a one-line message: keys and
types of every ``_target_`` node against its signature, ranges and consistency of training values, and the plain
settings (sampler, counts, seeds, flags) of each command."""

from __future__ import annotations

import inspect
import json
import math
import re
import types
import typing
from pathlib import Path

from omegaconf import DictConfig, ListConfig, OmegaConf

from lightning_modules.errors import CtrlkitError

# ------------------------------------------------------------------ keys and types against the targets' signatures

_SIMPLE_TYPES = {bool: "bool", int: "int", float: "float", str: "str", type(None): "null", list: "list", tuple: "list"}


def target_nodes(cfg: DictConfig) -> list[tuple[str, DictConfig]]:
    """(dotted path, node) of every config node that Hydra instantiates."""
    paths = ["model", "condition.extractor", "data", "system", "optimizer", "lr_scheduler.scheduler", "adapter.build"]
    paths += ["trainer"]
    paths += [f"{group}.{name}" for group in ("callbacks", "logger") for name in (cfg.get(group) or {})]
    found = []
    for path in paths:
        node = OmegaConf.select(cfg, path, throw_on_missing=False)
        if isinstance(node, DictConfig) and "_target_" in node:
            found.append((path, node))
    return found


def check_node_against_signature(path: str, node: DictConfig) -> None:
    """Unknown keys and wrongly typed values of one ``_target_`` node, judged by the target's signature.

    A ``_partial_: true`` node is called later by ctrlkit with its first argument (the optimizer's param groups,
    the scheduler's optimizer): setting that argument in the config is an error too."""
    from hydra.utils import get_object

    try:
        target = get_object(node._target_)
        function = target.__init__ if inspect.isclass(target) else target
        parameters = inspect.signature(function).parameters
        hints = typing.get_type_hints(function)
    except Exception:  # an unimportable target is reported by instantiate with its own message
        return
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    allowed = sorted(name for name in parameters if name not in ("self", "cls", "args", "kwargs"))
    if node.get("_partial_", False):
        given = next((name for name in parameters if name not in ("self", "cls")), None)
        if given is not None and given in node:
            raise CtrlkitError(f"{path}.{given} is given by ctrlkit when it calls {path}; remove it from the config")
        allowed = [name for name in allowed if name != given]
    for key in node.keys():
        key = str(key)
        if key.startswith("_"):
            continue
        if key not in parameters:
            if takes_any:
                continue
            raise CtrlkitError(f"unknown key '{path}.{key}'; {path} takes: {', '.join(allowed)}")
        if OmegaConf.is_missing(node, key) or key not in hints:
            continue
        try:
            value = node[key]
        except Exception:  # an interpolation that cannot resolve here (hydra runtime values) is not ours to judge
            continue
        _check_type(_set_by(node, key, f"{path}.{key}"), value, hints[key])


def _set_by(node: DictConfig, key: str, dotted: str) -> str:
    """How an error names ``node.key``: the key the user sets when the value is a plain interpolation of another
    (``system.learning_rate: ${adapter.learning_rate}`` -> "adapter.learning_rate (as system.learning_rate)")."""
    raw = OmegaConf.to_container(node, resolve=False).get(key)
    match = re.fullmatch(r"\$\{([\w.]+)\}", raw) if isinstance(raw, str) else None
    return f"{match.group(1)} (as {dotted})" if match else dotted


def _check_type(key: str, value, annotation) -> None:
    """Raise when ``value`` fits none of the simple types (or Literal values) ``annotation`` allows."""
    options = typing.get_args(annotation) if _is_union(annotation) else (annotation,)
    literals = [
        a for option in options if typing.get_origin(option) is typing.Literal for a in typing.get_args(option)
    ]
    types_allowed = []
    for option in options:
        origin = typing.get_origin(option) or option
        if typing.get_origin(option) is typing.Literal:
            continue
        if origin not in _SIMPLE_TYPES:
            return  # a class, dict, callable ...: coerced or checked by the target itself
        types_allowed.append(origin)
    plain = OmegaConf.to_container(value) if isinstance(value, DictConfig | ListConfig) else value
    if literals and plain in literals:
        return
    if any(_fits(plain, kind) for kind in types_allowed):
        return
    names = [_SIMPLE_TYPES[kind] for kind in types_allowed] + [repr(literal) for literal in literals]
    name, _, used_as = key.partition(" ")
    raise CtrlkitError(
        f"{name}={plain!r} has the wrong type{' ' + used_as if used_as else ''}; "
        f"allowed: {' or '.join(dict.fromkeys(names))}"
    )


def _is_union(annotation) -> bool:
    return typing.get_origin(annotation) in (typing.Union, types.UnionType)


def _fits(value, kind) -> bool:
    if kind is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind in (list, tuple):
        return isinstance(value, list | tuple)
    return isinstance(value, kind)


# ------------------------------------------------------------------ values

PROBABILITY_KEYS = tuple(f"system.condition_dropout.{name}" for name in ("text", "condition", "both"))
ON_ERROR = ("skip", "raise")


def check_values(cfg: DictConfig) -> None:
    """Ranges and consistency of the values that training would otherwise only trip over after loading models."""
    for key in PROBABILITY_KEYS:
        value = OmegaConf.select(cfg, key, default=None)
        if isinstance(value, int | float) and not 0.0 <= value <= 1.0:
            parent_key, _, leaf = key.rpartition(".")
            parent, _, name = parent_key.rpartition(".")
            named = _set_by(OmegaConf.select(cfg, parent), name, parent_key)  # the adapter's recipe, usually
            raise CtrlkitError(f"{named.split(' ')[0]}.{leaf}={value} is a probability; allowed: a number in [0, 1]")
    if OmegaConf.select(cfg, "optimizer.lr", default=None) is not None:
        raise CtrlkitError(
            "optimizer.lr is not used: each param group's learning rate is the adapter's; set adapter.learning_rate"
        )
    for key in ("adapter.learning_rate", "optimizer.weight_decay"):
        value = OmegaConf.select(cfg, key, default=None)
        positive = key.endswith("learning_rate")
        if isinstance(value, int | float) and not isinstance(value, bool):
            if not math.isfinite(value) or (value <= 0 if positive else value < 0):
                allowed = "a finite number > 0" if positive else "a finite number >= 0"
                raise CtrlkitError(f"{key}={value} is out of range; allowed: {allowed}")
    batch_size = OmegaConf.select(cfg, "data.batch_size", default=None)
    if isinstance(batch_size, int) and batch_size < 1:
        raise CtrlkitError(f"data.batch_size={batch_size} must be >= 1; allowed: an integer >= 1")
    _check_object_counts(cfg)
    accumulate = OmegaConf.select(cfg, "trainer.accumulate_grad_batches", default=None)
    if isinstance(accumulate, int) and accumulate < 1:
        raise CtrlkitError(f"trainer.accumulate_grad_batches={accumulate}; allowed: an integer >= 1")
    interval = OmegaConf.select(cfg, "trainer.val_check_interval", default=None)
    if isinstance(interval, int | float) and not isinstance(interval, bool) and interval <= 0:
        raise CtrlkitError(
            f"trainer.val_check_interval={interval}; allowed: a step count >= 1, or a fraction of an epoch in (0, 1]"
        )
    on_error = OmegaConf.select(cfg, "data.on_error", default=None)
    if on_error is not None and on_error not in ON_ERROR:
        raise CtrlkitError(f"data.on_error='{on_error}'; choose one of: {', '.join(ON_ERROR)}")
    from lightning_modules.data.files import CONDITION_SOURCES  # here: the data module imports torch

    conditions = OmegaConf.select(cfg, "data.conditions", default=None)  # file data's source of condition maps
    if conditions is not None and conditions not in CONDITION_SOURCES:
        raise CtrlkitError(f"unknown data.conditions '{conditions}'; choose one of: {', '.join(CONDITION_SOURCES)}")
    warmup = OmegaConf.select(cfg, "lr_scheduler.scheduler.num_warmup_steps", default=None)
    if isinstance(warmup, int) and warmup < 0:
        raise CtrlkitError(f"lr_scheduler.scheduler.num_warmup_steps={warmup} must be >= 0; allowed: an integer >= 0")
    max_nonfinite = OmegaConf.select(cfg, "system.max_nonfinite_steps", default=None)
    if isinstance(max_nonfinite, int) and max_nonfinite < 1:
        raise CtrlkitError(f"system.max_nonfinite_steps={max_nonfinite} must be >= 1; allowed: an integer >= 1")
    _check_channels(cfg)
    _check_image_size(cfg)


def _check_object_counts(cfg: DictConfig) -> None:
    """``data.num_objects`` of shapes scenes: a count >= 1 or an inclusive [low, high] range, within the grounding
    condition's slots (``condition.extractor.max_boxes``)."""
    counts = OmegaConf.select(cfg, "data.num_objects", default=None)
    if counts is None:
        return
    counts = list(counts) if isinstance(counts, ListConfig) else [counts, counts]
    allowed = "a count >= 1, or an inclusive range [low, high] with 1 <= low <= high"
    is_count = [isinstance(value, int) and not isinstance(value, bool) for value in counts]
    if len(counts) != 2 or not all(is_count) or not 1 <= counts[0] <= counts[1]:
        shown = OmegaConf.select(cfg, "data.num_objects")
        shown = list(shown) if isinstance(shown, ListConfig) else shown
        raise CtrlkitError(f"data.num_objects={shown}; allowed: {allowed}")
    slots = OmegaConf.select(cfg, "condition.extractor.max_boxes", default=None)
    if isinstance(slots, int) and counts[1] > slots:
        raise CtrlkitError(
            f"data.num_objects={counts[1]} objects but condition.extractor.max_boxes={slots} grounding slots; "
            f"allowed: at most {slots} objects"
        )


def _check_channels(cfg: DictConfig) -> None:
    channels = OmegaConf.select(cfg, "condition.channels", default=None)
    if channels is None:
        return
    for key in ("adapter.build.conditioning_channels", "condition.extractor.channels"):
        value = OmegaConf.select(cfg, key, default=None)
        if value is not None and value != channels:
            raise CtrlkitError(
                f"{key}={value} does not match condition.channels={channels} of condition "
                f"'{cfg.condition.get('name', '?')}'; allowed: {channels} (leave it at ${{condition.channels}})"
            )


def _check_image_size(cfg: DictConfig) -> None:
    image_size = OmegaConf.select(cfg, "data.image_size", default=None)
    factors = model_size_factors(cfg.model)
    if not isinstance(image_size, int) or factors is None:
        return
    vae_factor, unet_factor = factors
    multiple = vae_factor * unet_factor
    if image_size < 1 or image_size % multiple:
        nearest = max(multiple, round(image_size / multiple) * multiple)
        raise CtrlkitError(
            f"data.image_size={image_size} must be a positive multiple of {multiple} for this model (VAE factor "
            f"{vae_factor} x UNet downsampling {unet_factor}); allowed: {multiple}, {2 * multiple}, ... e.g. {nearest}"
        )


def model_size_factors(model: DictConfig) -> tuple[int, int] | None:
    """(VAE factor, UNet downsampling) read from the model's config files, without loading weights; None if the
    model config does not say (then the loaded model is checked instead)."""
    target = str(model.get("_target_", ""))
    if target.endswith("build_tiny_backbone"):
        return 4, 4  # lightning_modules.backbone.build_tiny_backbone: VAE (16, 32, 64), UNet (32, 64, 64)
    if target.endswith("load_tiny_backbone"):
        folder = Path(__file__).resolve().parents[1] / "assets" / "tiny_shapes_sd"
    elif target.endswith("build_random_backbone"):
        folder = Path(__file__).resolve().parents[1] / "assets" / "architectures" / str(model.get("name", "sd15"))
    else:
        path = model.get("path") if "path" in model and not OmegaConf.is_missing(model, "path") else None
        config = model.get("config")
        folder = Path(str(path)) if path and Path(str(path)).is_dir() else Path(str(config)) if config else None
    try:
        vae = json.loads((folder / "vae" / "config.json").read_text())
        unet = json.loads((folder / "unet" / "config.json").read_text())
    except (OSError, TypeError, ValueError):
        return None
    return 2 ** (len(vae["block_out_channels"]) - 1), 2 ** (len(unet["block_out_channels"]) - 1)


# ------------------------------------------------------------------ plain settings of generate, evaluate, extract

_INT, _NUMBER, _TEXT, _FLAG = "an integer", "a number", "a string", "true or false"


def _setting_rules() -> dict[str, dict[str, tuple[str, object]]]:
    """command -> dotted key -> (kind, bound): kind is one of the names above or a tuple of choices; bound is the
    least value allowed for numbers (None: any), or None. ``null`` is accepted where the config's default is."""
    from adapters.sampling import SCHEDULERS

    sampling = {
        "num_inference_steps": (_INT, 1),
        "guidance_scale": (_NUMBER, 0),
        "scheduler": (tuple(SCHEDULERS), None),
    }
    named = {"task_name": (_TEXT, None)}  # Hydra's job name (run folders, the log file) is made from it
    generate = {
        **named,
        "seed": (_INT, None),
        "height": (_INT, 1),
        "width": (_INT, 1),
        "negative_prompt": (_TEXT, None),
        "init_image": (_TEXT, None),
        "mask_image": (_TEXT, None),
        "strength": (_NUMBER, 0),
        "keep_unmasked_pixels": (_FLAG, None),
        **sampling,
    }
    return {
        "train": {"seed": (_INT, None), **named},
        "generate": generate,
        "demo": {
            **generate,
            "max_units": (_INT, 1),
            "server_port": (_INT, 1),
            "server_name": (_TEXT, None),
            "adapters_dir": (_TEXT, None),
        },
        "evaluate": {
            **named,
            "seed": (_INT, None),
            "num_samples": (_INT, 1),
            "num_seeds": (_INT, 1),
            "batch_size": (_INT, 1),
            "grid_rows": (_INT, 0),
            "from_run": (_FLAG, None),
            "score_references": (_FLAG, None),
            "base_cache_dir": (_TEXT, None),
            "device": (_TEXT, None),
            "quality.kid_subset_size": (_INT, 2),
            **{f"sampling.{key}": rule for key, rule in sampling.items()},
        },
        "cache": {
            "seed": (_INT, None),
            **named,
            "limit": (_INT, 1),
            "num_workers": (_INT, 0),
            "batch_size": (_INT, 1),
            "progress": (_FLAG, None),
        },
        "shards": {
            "maxcount": (_INT, 1),
            "count": (_INT, 1),
            "seed": (_INT, None),
            "image_size": (_INT, 8),
            "progress": (_FLAG, None),
            "max_image_pixels": (_INT, 1),
            "prefix": (_TEXT, None),
        },
        "pretrain_base": {
            **named,
            "seed": (_INT, None),
            "num_threads": (_INT, 0),
            "image_size": (_INT, 8),
            "pool_size": (_INT, 1),
            "val_size": (_INT, 1),
            **{f"{stage}.{key}": (_INT, 1) for stage in ("vae", "denoiser") for key in ("steps", "batch_size")},
            **{f"{stage}.learning_rate": (_NUMBER, 0) for stage in ("vae", "denoiser")},
            "denoiser.warmup_steps": (_INT, 0),
            "denoiser.eval_every": (_INT, 1),
            "denoiser.eval_sampling_steps": (_INT, 1),
            "denoiser.guidance_scale": (_NUMBER, 0),
        },
        "extract": {
            "num_workers": (_INT, 0),
            "chunk_size": (_INT, 1),
            "progress": (_FLAG, None),
            "max_image_pixels": (_INT, 1),
        },
    }


def check_settings(command: str, cfg: DictConfig) -> None:
    """The command's plain settings (sampler, counts, seeds, flags) have the right type and range; one line
    naming the key otherwise."""
    for key, (kind, least) in _setting_rules().get(command, {}).items():
        value = OmegaConf.select(cfg, key, default=None, throw_on_missing=False)
        if value is None:
            continue
        if isinstance(kind, tuple):
            if value not in kind:
                raise CtrlkitError(f"{key}={value!r}; choose one of: {', '.join(kind)}")
            continue
        fits = {
            _INT: isinstance(value, int) and not isinstance(value, bool),
            _NUMBER: isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value),
            _TEXT: isinstance(value, str),
            _FLAG: isinstance(value, bool),
        }[kind]
        if not fits or (least is not None and value < least):
            bound = f" >= {least}" if least is not None else ""
            raise CtrlkitError(f"{key}={value!r}; allowed: {kind}{bound}")
