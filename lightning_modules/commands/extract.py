"""``ctrlkit extract``: the configured extractor over a folder (``conditions.folder.extract_folder``), reported."""

from __future__ import annotations

import sys
from pathlib import Path

from conditions.folder import ExtractReport, extract_folder, format_report
from lightning_modules.commands.config_checks import _is_missing
from lightning_modules.commands.value_checks import check_node_against_signature, check_settings
from lightning_modules.errors import CtrlkitError


def run_extract(cfg) -> ExtractReport:
    """``ctrlkit extract``: build the configured extractor, extract the folder, print the report."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    check_settings("extract", cfg)
    for key in ("input", "output"):
        if OmegaConf.is_missing(cfg, key):
            raise CtrlkitError(f"{key} is required: ctrlkit extract condition=<name> input=<dir> output=<dir>")
    needed = {
        "condition.extractor.weights_dir": "<path>",
        "condition.extractor.model": "<path>",
        "condition.extractor.phrases": "'[a cat,a dog]'",
    }
    for key, example in needed.items():
        if _is_missing(cfg, key):
            raise CtrlkitError(f"{key} is required with condition={cfg.condition.name}: add {key}={example}")
    check_node_against_signature("condition.extractor", cfg.condition.extractor)
    extractor = instantiate(cfg.condition.extractor, _convert_="all")
    if getattr(extractor, "reads_scene", False):  # the condition's name, not its extractor's (shapes_truth)
        raise CtrlkitError(
            f"condition={cfg.condition.name} reads the truth of generated shapes scenes, not image files; pick a "
            "condition that reads pixels, e.g. condition=canny"
        )
    report = extract_folder(
        extractor, cfg.input, cfg.output, cfg.num_workers, cfg.chunk_size, cfg.progress, cfg.max_image_pixels
    )
    written = "grounding records" if extractor.kind == "grounding" else "maps"
    print(format_report(report, Path(cfg.output).resolve(), written), file=sys.stderr if report.failed else sys.stdout)
    return report
