"""Which adapter a saved folder holds, asked of the adapters themselves instead of guessed from file names.

Every ``ConditioningAdapter`` subclass that sets ``family`` registers itself (``adapters.base.ADAPTER_FAMILIES``),
and its ``save_pretrained`` writes ``ctrlkit_adapter.json`` naming the family and the class. ``load_adapter`` reads
that marker; a folder without one (a diffusers folder, an original single file, a folder saved before the marker)
is offered to each family's ``recognizes``. A family defined outside this package (a research variant in its own
module) is found through the marker's ``class`` (``module:Class``), imported on first use: adding an adapter needs
no edit to the CLI.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

from diffusers import UNet2DConditionModel

# the built-in families register themselves when their modules are imported
import adapters.control_lora
import adapters.controlnet
import adapters.controlnet_xs
import adapters.gligen
import adapters.gligen_masked
import adapters.layout_controlnet
import adapters.multi_condition
import adapters.t2i_adapter  # noqa: F401
from adapters.base import ADAPTER_FAMILIES, MARKER_NAME, AdapterFormatError, ConditioningAdapter


def adapter_families() -> dict[str, type[ConditioningAdapter]]:
    """Family name -> adapter class, for every family registered so far."""
    return dict(ADAPTER_FAMILIES)


def read_marker(folder: Path) -> dict | None:
    """The folder's ``ctrlkit_adapter.json`` ({"family", "class"}), or None when it has none."""
    marker = folder / MARKER_NAME
    if not marker.is_file():
        return None
    try:
        content = json.loads(marker.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise AdapterFormatError(f"{marker} is not readable JSON: {error}") from error
    if not isinstance(content, dict) or not isinstance(content.get("family"), str):
        raise AdapterFormatError(f'{marker} names no adapter family (expected {{"family": ..., "class": ...}})')
    return content


def _import_class(class_path: str, marker: Path) -> type[ConditioningAdapter]:
    """``module:QualName`` -> the class, which registers its family as its module is imported."""
    module_name, _, qualname = class_path.partition(":")
    try:
        found = importlib.import_module(module_name)
        for part in qualname.split("."):
            found = getattr(found, part)
    except (ImportError, AttributeError) as error:
        raise AdapterFormatError(f"{marker} names class {class_path}, which cannot be imported: {error}") from error
    if not (isinstance(found, type) and issubclass(found, ConditioningAdapter)):
        raise AdapterFormatError(f"{marker} names {class_path}, which is not a ConditioningAdapter")
    return found


def adapter_class_for(path: str | Path) -> type[ConditioningAdapter]:
    """The adapter class that reads ``path`` (a saved folder or a single weights file)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise AdapterFormatError(f"adapter {path} not found")
    marker = read_marker(path) if path.is_dir() else None
    if marker is not None:
        family = marker["family"]
        if family in ADAPTER_FAMILIES:
            return ADAPTER_FAMILIES[family]
        if marker.get("class"):
            return _import_class(marker["class"], path / MARKER_NAME)
        raise AdapterFormatError(
            f"{path / MARKER_NAME} names family '{family}', which is not registered; known: "
            f"{', '.join(ADAPTER_FAMILIES)}"
        )
    for adapter_class in ADAPTER_FAMILIES.values():
        if adapter_class.recognizes(path):
            return adapter_class
    raise AdapterFormatError(
        f"{path} holds no adapter ctrlkit can read: no {MARKER_NAME}, and no family recognizes it (a diffusers "
        f"ControlNetModel, ControlNetXSAdapter or T2IAdapter folder, a GLIGEN folder, a ControlNet weights file); "
        f"known families: {', '.join(ADAPTER_FAMILIES)}"
    )


def load_adapter(path: str | Path, unet: UNet2DConditionModel) -> tuple[ConditioningAdapter, str]:
    """The adapter saved at ``path``, for the base model's ``unet`` -> (adapter, "<title>, <format found>").

    An adapter with ``changes_unet`` changes ``unet`` in place; ``load_adapters`` orders several loads so that
    does not depend on the order they are given in."""
    adapter_class = adapter_class_for(path)
    adapter = adapter_class.from_pretrained(Path(path).expanduser(), unet)
    _check_base(adapter, path, unet)
    return adapter, f"{adapter_class.title}, {adapter.source_format}"


def _check_base(adapter: ConditioningAdapter, path: str | Path, unet: UNet2DConditionModel) -> None:
    """One line naming the adapter and both bases when it was made for another UNet (an SD1.5 ControlNet on
    SDXL), instead of a shape error from inside the UNet at the first step."""
    try:
        adapter.check_base(unet)
    except AdapterFormatError as error:
        raise AdapterFormatError(f"adapter {path}: {error}") from None


def load_adapters(paths: list[str | Path], unet: UNet2DConditionModel) -> list[tuple[ConditioningAdapter, str]]:
    """``load_adapter`` for each path, in the order given: adapters that change the shared UNet (GLIGEN's gated
    layers) are loaded after those that copy or read it (a ControlNet copies the encoder it is built from)."""
    classes = [adapter_class_for(path) for path in paths]
    order = sorted(range(len(paths)), key=lambda index: classes[index].changes_unet)
    loaded = {}
    for index in order:
        adapter = classes[index].from_pretrained(Path(paths[index]).expanduser(), unet)
        _check_base(adapter, paths[index], unet)
        loaded[index] = (adapter, f"{classes[index].title}, {adapter.source_format}")
    return [loaded[index] for index in range(len(paths))]


def initialize_from_saved(adapter: ConditioningAdapter, path: str | Path, unet: UNet2DConditionModel) -> str:
    """Copy the trainable weights saved at ``path`` into ``adapter``, built from config for ``unet``, to fine-tune
    them (a released ControlNet, a shipped adapter, an earlier run's export) -> "<title>, <format found>".

    The saved adapter must be of the built one's family; the family's ``load_saved_weights`` checks the tensors."""
    adapter_class = adapter_class_for(path)
    if adapter_class is not type(adapter):
        raise AdapterFormatError(
            f"{path} holds a {adapter_class.title} ({adapter_class.family}); this run builds a {adapter.title} "
            f"({adapter.family}): start from weights of the same family"
        )
    return f"{adapter.title}, {adapter.load_saved_weights(Path(path).expanduser(), unet)}"
