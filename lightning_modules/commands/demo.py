"""``ctrlkit demo``: a browser page to compose conditioning units and generate (Gradio, the ``demo`` extra).

This module holds what the page does, free of Gradio so that it is tested without it: which adapters there are
(the shipped ones and every ``adapter/`` folder ``ctrlkit train`` exported under the outputs folder), the condition
an adapter was trained on, the maps each extractor draws from a source image, GLIGEN boxes from a sketch, and one
generation (``ctrlkit generate``'s own code, with the base model loaded once). ``demo_app.py`` lays out the page.
"""

from __future__ import annotations

import itertools
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from adapters.multi_condition import MultiConditionControlNetAdapter
from conditions import read_image
from lightning_modules.commands.config_checks import group_options, load_condition_config
from lightning_modules.commands.evaluate import locate_adapter
from lightning_modules.commands.generate import build_extractor, run_generate
from lightning_modules.errors import CtrlkitError
from lightning_modules.shipped_adapters import PREFIX, SHIPPED_TINY_ADAPTERS, shipped_adapter_names

log = logging.getLogger(__name__)

# the condition choice of a unit whose adapter reads grounding (GLIGEN): the boxes drawn on the page
DRAWN_BOXES = "boxes (drawn)"
# the condition choice of a unit whose map is the source image itself (a mask or depth map made elsewhere)
SOURCE_IS_MAP = "source image is the map"
# a drawn stroke smaller than this fraction of the canvas is a slip of the pen, not a box
MIN_BOX_AREA = 0.002


def find_adapters(outputs_dir: str | Path | None) -> list[str]:
    """Adapters the page offers: the shipped ``tiny/<name>`` ones, then every exported ``adapter/`` folder under
    ``outputs_dir`` (newest first), as paths ``ctrlkit generate`` accepts."""
    # a multi-condition ControlNet takes several maps per unit (generate's parts=), which the page's one condition
    # per unit cannot give: not offered here
    multi = MultiConditionControlNetAdapter.recognizes
    found = [PREFIX + name for name in shipped_adapter_names() if not multi(SHIPPED_TINY_ADAPTERS / name)]
    root = Path(outputs_dir).expanduser() if outputs_dir else None
    if root is not None and root.is_dir():
        folders = [f for f in root.rglob("adapter") if f.is_dir() and any(f.glob("*.safetensors")) and not multi(f)]
        found += [str(f) for f in sorted(folders, key=lambda f: f.stat().st_mtime, reverse=True)]
    return found


def trained_condition(adapter: str) -> str | None:
    """The condition an adapter was trained on, as a unit's condition choice: an extractor's name, ``DRAWN_BOXES``
    (grounding) or ``SOURCE_IS_MAP`` (a map no extractor draws from a photo, e.g. shapes_mask), from its run's
    config; None when the folder carries no run config (a diffusers download)."""
    try:
        _, config = locate_adapter(adapter)
    except CtrlkitError:
        return None
    if config is None:
        return None
    condition = OmegaConf.load(config).get("condition") or {}
    if condition.get("kind") == "grounding":
        return DRAWN_BOXES
    return condition.get("name") if condition.get("name") in map_conditions() else SOURCE_IS_MAP


def map_conditions() -> list[str]:
    """Conditions whose extractor draws a map from a photo (conf/condition): not the grounding ones, nor the shapes
    scenes' ground truth (read from the scene records, not from pixels)."""
    names = []
    for name in group_options("condition"):
        condition = load_condition_config(name)
        if condition.kind != "grounding" and "shapes_truth" not in str(condition.extractor.get("_target_", "")):
            names.append(name)
    return names


def extractor_previews(source: str | Path, names: list[str], size: tuple[int, int]) -> list[tuple[np.ndarray, str]]:
    """Each extractor's map of ``source`` at the generation size: (HxWx3 uint8, caption). An extractor that cannot
    run here (an annotator whose weights are not on this machine) gives a blank tile whose caption says why."""
    image = read_image(str(source))
    previews = []
    for name in names:
        try:
            drawn = build_extractor(name, size).process(image)
            drawn = np.repeat(drawn, 3, axis=2) if drawn.ndim == 3 and drawn.shape[2] == 1 else drawn
            previews.append((np.ascontiguousarray(drawn[..., :3]), name))
        except Exception as error:  # noqa: BLE001 - shown on the page, one tile per extractor
            reason = str(error).splitlines()[0][:100]  # e.g. its annotator weights_dir is not set
            log.info("extractor %s: %s", name, error)
            previews.append((np.zeros((*size, 3), np.uint8), f"{name}: not available here ({reason})"))
    return previews


def boxes_from_sketch(layers: list[np.ndarray]) -> list[list[float]]:
    """GLIGEN boxes from the strokes of a sketch: each separate stroke (a connected drawn region in any layer) is
    one object, its box the stroke's bounding box, normalised x0, y0, x1, y1 in [0, 1], in drawing-layer order
    and, within a layer, left to right. ``layers``: HxW (alpha or grey) or HxWxC arrays, drawn where > 0."""
    boxes = []
    for layer in layers:
        layer = np.asarray(layer)
        drawn = (layer[..., -1] if layer.ndim == 3 else layer) > 0
        height, width = drawn.shape
        count, _, stats, _ = cv2.connectedComponentsWithStats(drawn.astype(np.uint8), connectivity=8)
        strokes = [stats[i] for i in range(1, count) if stats[i][4] >= MIN_BOX_AREA * height * width]
        for x, y, w, h, _ in sorted(strokes, key=lambda s: (s[0], s[1])):
            corners = (x / width, y / height, (x + w) / width, (y + h) / height)
            boxes.append([round(float(value), 4) for value in corners])
    return boxes


def parse_phrases(text: str) -> list[str]:
    """``"a red circle; a blue square"`` -> one phrase per box, in the order of the boxes."""
    return [phrase.strip() for phrase in (text or "").split(";") if phrase.strip()]


@dataclass
class UnitChoice:
    """One unit as the page sets it: adapter, condition (a map extractor or ``DRAWN_BOXES``), scale and window."""

    adapter: str
    condition: str | None
    scale: float = 1.0
    start: float = 0.0
    end: float = 1.0

    def spec(self, source: str | None, boxes: list[list[float]], phrases: list[str]) -> dict:
        """The unit as ``ctrlkit generate`` reads it; a one-line ``CtrlkitError`` when its condition is missing."""
        spec = {
            "adapter": self.adapter,
            "scale": float(self.scale),
            "start": float(self.start),
            "end": float(self.end),
        }
        if self.condition == DRAWN_BOXES:
            if not boxes or len(boxes) != len(phrases):
                raise CtrlkitError(
                    f"unit {self.adapter}: draw one box per object and type one phrase each, separated by ';' "
                    f"({len(boxes)} boxes, {len(phrases)} phrases)"
                )
            return {**spec, "boxes": boxes, "phrases": phrases}
        if not self.condition:
            raise CtrlkitError(f"unit {self.adapter}: choose its condition (an extractor, or {DRAWN_BOXES!r})")
        if not source:
            raise CtrlkitError(f"unit {self.adapter}: load a source image for its {self.condition} map")
        if self.condition == SOURCE_IS_MAP:
            return {**spec, "condition_image": str(source)}
        return {**spec, "source_image": str(source), "extractor": self.condition}


@dataclass
class Demo:
    """The page's state: the demo config (``conf/demo.yaml``, which holds generate's settings) and the base model,
    loaded once. ``generate`` writes each result in its own numbered folder under ``cfg.output_dir``."""

    cfg: DictConfig
    backbone: object = None
    counter: itertools.count = field(default_factory=lambda: itertools.count(1))

    def load(self):
        if self.backbone is None:
            self.backbone = instantiate(self.cfg.model)
        return self.backbone

    @property
    def size(self) -> tuple[int, int]:
        return int(self.cfg.height), int(self.cfg.width)

    def adapters(self) -> list[str]:
        return find_adapters(self.cfg.adapters_dir)

    def generate(
        self,
        prompt: str,
        negative_prompt: str,
        seed: int,
        units: list[UnitChoice],
        source: str | None = None,
        boxes: list[list[float]] | None = None,
        phrases: list[str] | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
    ) -> dict[str, Path]:
        """Generate one image; returns the paths of ``image`` (PNG), ``grid`` (conditions | result) and
        ``composition`` (the YAML ``ctrlkit generate composition=<file>`` reruns, its source image copied beside)."""
        if source:
            read_image(source)  # an unreadable upload is named as the user gave it, before any folder is made
        output = Path(self.cfg.output_dir) / f"generation_{next(self.counter):03d}"
        output.mkdir(parents=True, exist_ok=True)
        if source:  # the upload lives in Gradio's temporary folder: keep a copy the composition can name
            kept = output / f"source{Path(source).suffix or '.png'}"
            shutil.copyfile(source, kept)
            source = str(kept.resolve())
        specs = [unit.spec(source, boxes or [], phrases or []) for unit in units]
        cfg = self.cfg.copy()
        with open_dict(cfg):
            cfg.prompts = [prompt]
            cfg.negative_prompt = negative_prompt or ""
            cfg.seed = int(seed)
            cfg.units = specs
            cfg.composition = None
            cfg.output_dir = str(output)
            if num_inference_steps is not None:
                cfg.num_inference_steps = int(num_inference_steps)
            if guidance_scale is not None:
                cfg.guidance_scale = float(guidance_scale)
        (image,) = run_generate(cfg, backbone=self.load())
        return {"image": image, "grid": output / "grid.png", "composition": output / "composition.yaml"}


def run_demo(cfg: DictConfig) -> None:
    """Serve the page until interrupted (``ctrlkit demo``); the ``demo`` extra provides Gradio."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # offline: Gradio would report usage otherwise
    try:
        from lightning_modules.commands.demo_app import build_app
    except ImportError as error:
        raise CtrlkitError(f'ctrlkit demo needs Gradio: pip install -e ".[demo]" ({error})') from error
    demo = Demo(cfg)
    demo.load()
    print(f"ctrlkit demo: adapters found: {', '.join(demo.adapters()) or 'none'}")
    app = build_app(demo)
    app.launch(server_name=cfg.server_name, server_port=cfg.server_port, share=False, show_error=True)
