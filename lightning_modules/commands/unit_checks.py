"""Composition units as ``ctrlkit generate`` and ``ctrlkit evaluate`` read them, checked before any model loads,
and built into ``ControlUnit``s once their adapters are loaded.

A unit is a mapping (from ``composition=<yaml>``'s ``units:`` list, or ``units=[...]`` on the command line) with
an adapter and how it is applied. Every field is checked here, and each error is one line naming the file (or the
command line), the unit and the key: a composition that would fail or, worse, silently draw black (``scale: nan``)
stops before minutes of model loading.
"""

from __future__ import annotations

import math
from pathlib import Path

import cv2
import torch
import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf

from adapters.composition import MODES, ControlUnit
from conditions import read_image
from conditions.resize import fit_map
from lightning_modules.commands.config_checks import group_options, unit_condition
from lightning_modules.errors import CtrlkitError
from lightning_modules.shipped_adapters import PREFIX, resolve_adapter, shipped_adapter_names

# every field a unit may have (generate reads all; evaluate replaces the condition fields by its items')
UNIT_FIELDS = (
    "adapter",
    "condition_image",
    "source_image",
    "extractor",
    "parts",
    "boxes",
    "phrases",
    "scale",
    "start",
    "end",
    "mode",
    "mask",
)
# top-level keys of a composition file (``ctrlkit generate`` writes the last three beside ``units``)
FILE_KEYS = ("units", "prompts", "negative_prompt", "seed")


def unit_specs(cfg: DictConfig, fields: tuple[str, ...] = UNIT_FIELDS, ignored: tuple[str, ...] = ()) -> list[dict]:
    """Units of the composition file (``composition=<yaml>``) followed by ``units=[...]``, each checked by
    ``check_unit``; any problem is a one-line ``CtrlkitError`` naming the file or ``units``, the unit and the key.
    ``ignored``: fields allowed but not read (evaluate replaces a unit's condition by its items')."""
    specs: list[tuple[str, dict]] = []
    if cfg.get("composition"):
        path = Path(str(cfg.composition))
        specs += [(f"{path}: unit {index}", unit) for index, unit in enumerate(read_composition_file(path))]
    if cfg.get("units"):
        given = cfg.units
        if isinstance(given, DictConfig | ListConfig):
            given = OmegaConf.to_container(given, resolve=True)
        if not isinstance(given, list):
            raise CtrlkitError(f"units={given!r} must be a list of units, e.g. units=[{{adapter: <folder>}}]")
        specs += [(f"unit {index}", unit) for index, unit in enumerate(given)]
    for where, spec in specs:
        check_unit(
            {k: v for k, v in spec.items() if k not in ignored} if isinstance(spec, dict) else spec, where, fields
        )
    return [spec for _, spec in specs]


# unit fields that name files (``parts`` maps each part to one)
FILE_FIELDS = ("adapter", "condition_image", "source_image", "mask")


def read_composition_file(path: Path) -> list:
    """The ``units`` list of a composition YAML file (not yet checked unit by unit). A relative file path in a unit
    is read from the working directory, else from the file's own folder (made absolute): a composition file and
    its images move together, and examples/compose_three.yaml runs from any directory."""
    folder = path.resolve().parent
    units = read_composition(path)["units"]
    return [_beside(unit, folder) if isinstance(unit, dict) else unit for unit in units]


def _beside(unit: dict, folder: Path) -> dict:
    def located(value):
        if not isinstance(value, str) or Path(value).expanduser().is_absolute() or Path(value).exists():
            return value
        return str(folder / value) if (folder / value).exists() else value

    unit = {key: located(value) if key in FILE_FIELDS else value for key, value in unit.items()}
    if isinstance(unit.get("parts"), dict):
        unit["parts"] = {part: located(value) for part, value in unit["parts"].items()}
    return unit


def read_composition_settings(path: Path) -> dict:
    """The file's settings beside its units (``prompts``, ``negative_prompt``, ``seed``: those it has)."""
    return {key: value for key, value in read_composition(path).items() if key != "units"}


def read_composition(path: Path) -> dict:
    """A composition YAML file: a mapping with a ``units`` list and optional ``FILE_KEYS`` settings."""
    if not path.is_file():
        raise CtrlkitError(f"composition file {path} not found")
    try:
        loaded = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise CtrlkitError(f"composition file {path} is not valid YAML: {problem}{where}") from error
    except (OSError, UnicodeDecodeError) as error:
        raise CtrlkitError(f"composition file {path} cannot be read: {error}") from error
    if not isinstance(loaded, dict):
        raise CtrlkitError(
            f"composition file {path} must be a mapping with 'units:' (a list of units), got "
            f"{type(loaded).__name__ if loaded is not None else 'an empty file'}"
        )
    unknown = sorted(str(key) for key in loaded if key not in FILE_KEYS)
    if unknown:
        raise CtrlkitError(f"composition file {path}: unknown key(s) {unknown}; allowed: {', '.join(FILE_KEYS)}")
    if not isinstance(loaded.get("units"), list):
        raise CtrlkitError(f"composition file {path} must hold a list under 'units:'")
    return loaded


def check_unit(spec, where: str, fields: tuple[str, ...] = UNIT_FIELDS) -> None:
    """Raise a one-line ``CtrlkitError`` naming ``where`` (file and unit) and the key for any bad field of a unit."""
    if not isinstance(spec, dict):
        raise CtrlkitError(f"{where}: a unit is a mapping such as {{adapter: <folder>, scale: 1.0}}, got {spec!r}")
    unknown = sorted(str(key) for key in spec if key not in fields)
    if unknown:
        raise CtrlkitError(f"{where}: unknown field(s) {unknown}; allowed: {', '.join(fields)}")
    adapter = spec.get("adapter")
    if not isinstance(adapter, str) or not adapter.strip():
        raise CtrlkitError(f"{where}: adapter=<folder or file of adapter weights> is required, got {adapter!r}")
    try:
        adapter = resolve_adapter(adapter)
    except CtrlkitError as error:
        raise CtrlkitError(f"{where}: {error}") from None
    if not Path(adapter).expanduser().exists():
        raise CtrlkitError(
            f"{where}: adapter {adapter} not found; give a folder or file of adapter weights, or a shipped adapter "
            f"({', '.join(PREFIX + name for name in shipped_adapter_names())})"
        )
    if "scale" in spec:
        _number(spec, "scale", where, low=0.0)
    for key in ("start", "end"):
        if key in spec:
            _number(spec, key, where, low=0.0, high=1.0)
    start, end = spec.get("start"), spec.get("end")
    if start is not None and end is not None and not start < end:
        raise CtrlkitError(f"{where}: start={start} must be below end={end}")
    mode = spec.get("mode")
    if mode is not None and mode not in MODES:
        raise CtrlkitError(f"{where}: mode={mode!r}; choose one of: {', '.join(MODES)} (or leave it out)")
    for key in ("mask", "condition_image", "source_image"):
        if spec.get(key) is not None:
            value = spec[key]
            if not isinstance(value, str) or not Path(value).expanduser().is_file():
                raise CtrlkitError(f"{where}: {key}={value!r} is not an image file")
    parts = spec.get("parts")
    if parts is not None:
        maps = parts.values() if isinstance(parts, dict) and parts else [None]
        if not all(isinstance(value, str) and Path(value).expanduser().is_file() for value in maps):
            raise CtrlkitError(f"{where}: parts={parts!r}; allowed: {{<part name>: <map image file>, ...}}")
    extractor = spec.get("extractor")
    if isinstance(extractor, str) and extractor not in group_options("condition"):
        choices = ", ".join(group_options("condition"))
        raise CtrlkitError(f"{where}: unknown extractor {extractor!r}; choose one of: {choices}")
    if extractor is not None:
        try:
            unit_condition(extractor)  # a mapping's settings, and weights the extractor cannot do without
        except CtrlkitError as error:
            raise CtrlkitError(f"{where}: {error}") from error
    if "boxes" in spec or "phrases" in spec:
        _check_grounding(spec, where)


def _number(spec: dict, key: str, where: str, low: float, high: float | None = None) -> float:
    value = spec[key]
    allowed = f"a finite number >= {low:g}" if high is None else f"a number in [{low:g}, {high:g}]"
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise CtrlkitError(f"{where}: {key}={value!r}; allowed: {allowed}")
    if value < low or (high is not None and value > high):
        raise CtrlkitError(f"{where}: {key}={value!r}; allowed: {allowed}")
    return float(value)


def _check_grounding(spec: dict, where: str) -> None:
    """``boxes``: a list of [x0, y0, x1, y1] in [0, 1] with x0 < x1, y0 < y1; ``phrases``: as many strings."""
    boxes, phrases = spec.get("boxes"), spec.get("phrases")
    if not isinstance(boxes, list) or not boxes:
        raise CtrlkitError(f"{where}: boxes={boxes!r}; allowed: a list of [x0, y0, x1, y1] in [0, 1]")
    for number, box in enumerate(boxes):
        numbers = isinstance(box, list) and len(box) == 4
        numbers = numbers and all(not isinstance(v, bool) and isinstance(v, int | float) for v in box)
        if (
            not numbers
            or not all(math.isfinite(v) and 0 <= v <= 1 for v in box)
            or not (box[0] < box[2] and box[1] < box[3])
        ):
            raise CtrlkitError(
                f"{where}: boxes[{number}]={box!r}; allowed: [x0, y0, x1, y1] in [0, 1] with x0 < x1 and y0 < y1"
            )
    if not isinstance(phrases, list) or len(phrases) != len(boxes):
        raise CtrlkitError(f"{where}: phrases={phrases!r}; allowed: a list of {len(boxes)} phrases, one per box")
    for number, phrase in enumerate(phrases):
        if not isinstance(phrase, str) or not phrase.strip():
            raise CtrlkitError(f"{where}: phrases[{number}]={phrase!r}; allowed: a non-empty string")


def read_mask(path: str, size: tuple[int, int]) -> torch.Tensor:
    """A region image -> (1, 1, H, W) in [0, 1] (white: the unit acts there)."""
    grey = fit_map(read_image(path), size, "crop_and_resize", cv2.INTER_AREA).mean(axis=-1)
    return torch.from_numpy(grey / 255.0).float()[None, None]


def unit_from_spec(spec: dict, adapter, condition, size: tuple[int, int], name: str) -> ControlUnit:
    """A ``ControlUnit`` with the spec's scale (1), start/end (the adapter's window: all steps, or GLIGEN's
    scheduled sampling), mode (the adapter's guidance_mode) and mask (an image path); a setting the unit cannot
    take is a one-line error naming the unit."""
    start, end = adapter.sampling_window
    try:
        return ControlUnit(
            adapter,
            condition,
            scale=float(spec.get("scale", 1.0)),
            start=float(spec.get("start", start)),
            end=float(spec.get("end", end)),
            mode=spec.get("mode"),
            mask=read_mask(spec["mask"], size) if spec.get("mask") else None,
            name=name,
        )
    except ValueError as error:
        raise CtrlkitError(str(error)) from error
