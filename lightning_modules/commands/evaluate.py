"""``ctrlkit evaluate``: an adapter, or a composition of units, beside the base model without it, on a fixed
evaluation set.

For the first ``num_samples`` items of the data's validation split and ``num_seeds`` seeds each, both models
sample with the same noise; every image is scored by re-extraction (each unit's condition picks its score,
``conditions.controllability``; in a composition of several units the scores are named ``unit<k>/<score>``),
optionally by a local open-vocabulary detector for grounding units (``box_detector``), and the sets by FID / KID /
CLIP score (``conditions.image_quality``). Each unit's condition comes from the evaluation item: the data
is read once per unit, with that unit's extractor, so every unit sees the same images and prompts.
Writes ``metrics.json`` (means), ``per_sample.csv``, ``grid.png`` (best and worst adapter samples:
condition | base | adapter | reference) and, with ``logger=wandb``, a W&B table (condition | prompt | sample | scores).
With ``score_references`` the items' own images and their VAE round trips are scored the same way (``truth`` and
``truth_vae``): what a perfect model would score, and what the base model's VAE leaves of it. On shapes scenes of
several object counts each score is also given by count (``by_num_objects``).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from adapters.composition import Composition
from adapters.registry import load_adapters
from conditions.controllability import (
    detect_named_objects,
    found_box_scores,
    mean_scores,
    metric_of,
    primary_metric,
    reextraction_scores,
    scene_scores,
)
from conditions.image_quality import image_quality, load_quality_models
from conditions.map_metrics import average_precision
from conditions.ranges import signed_to_unit, unit_to_uint8
from lightning_modules.backbone import prepare_condition
from lightning_modules.commands.base_image_cache import BaseImageCache, base_cache
from lightning_modules.commands.config_checks import (
    check_train_config,
    overlay_command_line,
    unit_condition,
)
from lightning_modules.commands.evaluation_report import MODELS, REFERENCES, log_wandb, report, write_csv, write_grid
from lightning_modules.commands.unit_checks import unit_from_spec, unit_specs
from lightning_modules.commands.value_checks import check_settings
from lightning_modules.condition_views import evaluation_samples
from lightning_modules.data.common import collate
from lightning_modules.errors import CtrlkitError
from lightning_modules.shipped_adapters import RUN_CONFIG_NAME, resolve_adapter

log = logging.getLogger(__name__)

# fields of a composition unit that evaluate reads; a condition given by image or boxes (as `ctrlkit generate`
# takes it) is replaced by the evaluation item's, extracted by the unit's extractor
UNIT_FIELDS = ("adapter", "extractor", "scale", "start", "end", "mode", "mask")
REPLACED_FIELDS = ("condition_image", "source_image", "boxes", "phrases")


def locate_adapter(path: str) -> tuple[Path, Path | None]:
    """(adapter folder, run config.yaml or None) from a run directory, an exported adapter folder or a shipped
    adapter's name (``tiny/controlnet_canny``, whose folder holds its run's config as train_config.yaml)."""
    given = Path(resolve_adapter(path)).expanduser()
    if (given / "adapter").is_dir():
        folder = given / "adapter"
    elif given.is_dir():
        folder = given
    else:
        raise CtrlkitError(f"adapter_path {given} is not a folder; give a `ctrlkit train` run dir or its adapter/")
    if not any(folder.iterdir()):
        raise CtrlkitError(f"adapter folder {folder} is empty")
    for config in (folder.parent / "config.yaml", folder / RUN_CONFIG_NAME):
        if config.is_file():
            return folder, config
    return folder, None


@dataclass
class EvalUnit:
    """One unit of the evaluated composition: adapter weights, its condition config and how it is applied."""

    folder: Path
    condition: DictConfig
    spec: dict
    extractor: object = None
    dataset: object = None
    adapter: object = None

    @property
    def name(self) -> str:
        return f"{self.condition.name}: {self.folder}"


def evaluation_units(cfg: DictConfig) -> tuple[list[EvalUnit], DictConfig | None]:
    """The units to evaluate (``adapter_path``, or ``composition`` + ``units``) and the first unit's run config.

    A unit's condition is its ``extractor`` (a conf/condition name), else the condition its run was trained with
    (``from_run``), else, for a single ``adapter_path``, the ``condition`` group of this config.
    """
    specs = unit_specs(cfg, UNIT_FIELDS, ignored=REPLACED_FIELDS)
    if cfg.get("adapter_path"):
        if specs:
            raise CtrlkitError("give adapter_path=<run> or composition=<file> / units=[...], not both")
        specs = [{"adapter": cfg.adapter_path}]
    if not specs:
        raise CtrlkitError("nothing to evaluate: give adapter_path=<run dir>, or composition=<file> / units=[...]")
    units, first_run = [], None
    for index, spec in enumerate(specs):
        replaced = sorted(set(spec) & set(REPLACED_FIELDS))
        if replaced:
            log.info("unit %d: %s replaced by each evaluation item's condition", index, ", ".join(replaced))
        folder, run_config = locate_adapter(spec["adapter"])
        trained = OmegaConf.load(run_config) if run_config is not None and cfg.from_run else None
        if trained is not None and first_run is None:  # the run whose model (and, alone, adapter) evaluation takes
            groups = ("model", "adapter", "condition") if cfg.get("adapter_path") else ("model",)
            trained = overlay_command_line(cfg, trained, groups)
        first_run = first_run if first_run is not None or trained is None else trained
        if spec.get("extractor"):
            condition = unit_condition(spec["extractor"])
        elif trained is not None:
            condition = trained.condition
        elif cfg.get("adapter_path"):
            condition = cfg.condition
        else:
            raise CtrlkitError(
                f"unit {index}: {folder} has no run config.yaml beside it; say its condition with extractor=<name>"
            )
        condition = with_subset(condition, cfg.get("condition_subset"))
        units.append(EvalUnit(folder=folder, condition=condition, spec=spec))
    return units, first_run


def with_subset(condition: DictConfig, subset) -> DictConfig:
    """The condition config giving only the ``subset`` of its parts (a multi condition, ``conditions.multi``)."""
    if subset is None:
        return condition
    if "use" not in condition.extractor:
        raise CtrlkitError(
            f"condition_subset={list(subset)}: the {condition.name} condition has no parts to choose from "
            "(a multi-condition run has: condition=multi)"
        )
    condition = condition.copy()
    with open_dict(condition):
        condition.extractor.use = list(subset)
        condition.metric = None  # the first given part's own score ranks (conditions.controllability.multi_scores)
    return condition


@torch.no_grad()
def generate(backbone, units: list[EvalUnit] | None, conditions: list, prompts: list[str], sampling, seed: int):
    """Images (B, 3, H, W) in [0, 1] under the units, given each unit's batch condition; ``units=None`` samples
    the base model. The base and the composition start from the same noise for the same seed."""
    size = sampling["image_size"]
    composition = None
    if units:
        device = backbone.unet.device
        prepared = [
            prepare_condition(condition, backbone, device, phrase_contexts=unit.adapter.reads_phrase_contexts)
            for unit, condition in zip(units, conditions)
        ]
        composition = Composition(
            [
                unit_from_spec(unit.spec, unit.adapter, condition, size, unit.name)
                for unit, condition in zip(units, prepared)
            ]
        )
    options = {key: value for key, value in sampling.items() if key != "image_size"}
    return backbone.generate(prompts, size, seed=seed, composition=composition, **options).cpu()


def run_evaluate(cfg: DictConfig) -> dict:
    """Evaluate the adapter (or composition) and the base model; returns the metrics.json content."""
    started = time.perf_counter()
    units = configure(cfg)
    # before any sampling: a missing or refused weights file is said now, and its metrics read "unavailable: ..."
    quality_models = load_quality_models(cfg.quality.inception_weights, cfg.quality.clip_model, cfg.device)
    torch.manual_seed(cfg.seed)
    backbone = instantiate(cfg.model, _convert_="all").to(cfg.device)
    batches, count = read_batches(cfg, units)
    sampling = {**OmegaConf.to_container(cfg.sampling), "image_size": tuple(batches[0][0]["pixel_values"].shape[-2:])}

    # Base first: loading an adapter may change the base UNet (an unlocked decoder, gated attention layers).
    images = {"base": _sample_all(backbone, None, batches, sampling, cfg, base_cache(cfg, backbone))}
    for unit, (adapter, found) in zip(units, load_adapters([unit.folder for unit in units], backbone.unet)):
        unit.adapter = adapter.to(cfg.device).eval()
        log.info("%s read as %s", unit.folder, found)
    images["adapter"] = _sample_all(backbone, units, batches, sampling, cfg)
    if cfg.score_references:
        images.update(_reference_images(backbone, batches, cfg.device))

    detector = _box_detector(cfg, units)
    rows, detections = _score(units, batches, images, cfg, detector)
    metric = _primary(units)
    real = torch.cat([signed_to_unit(batch[0]["pixel_values"]) for batch in batches])
    prompts = [row["prompt"] for row in rows if row["model"] == "adapter"]
    quality = image_quality(
        unit_to_uint8(real),
        {model: unit_to_uint8(torch.cat(images[model])) for model in MODELS},
        prompts,
        cfg.quality.inception_weights,
        cfg.quality.clip_model,
        kid_subset_size=cfg.quality.kid_subset_size,
        device=cfg.device,
        models=quality_models,
    )
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    summary = {
        "adapter_path": str(units[0].folder) if len(units) == 1 else [str(unit.folder) for unit in units],
        "condition": units[0].extractor.name if len(units) == 1 else [unit.extractor.name for unit in units],
        "units": [
            {"adapter": str(unit.folder), "condition": unit.extractor.name, **_unit_options(unit)} for unit in units
        ],
        "primary_metric": metric,
        **({"condition_subset": list(cfg.condition_subset)} if cfg.get("condition_subset") else {}),
        "num_items": count,
        "num_seeds": cfg.num_seeds,
        "sampling": OmegaConf.to_container(cfg.sampling),
        **{model: {**_mean_of(rows, model), **quality[model], **detections.get(model, {})} for model in MODELS},
        **{model: {**_mean_of(rows, model), **detections.get(model, {})} for model in REFERENCES if model in images},
    }
    by_count = _by_num_objects(rows)
    if by_count:
        summary["by_num_objects"] = by_count
    write_csv(rows, output_dir / "per_sample.csv")
    if metric is not None:
        summary["grid"] = write_grid(rows, images, batches, metric, cfg, output_dir / "grid.png")
    (output_dir / "metrics.json").write_text(json.dumps(summary, indent=2))
    log_wandb(cfg, rows, images, batches, summary)
    print(report(summary, output_dir, time.perf_counter() - started))
    return summary


def configure(cfg: DictConfig) -> list[EvalUnit]:
    """The checked settings and units; the model, adapter and condition of the trained run where there is one."""
    check_settings("evaluate", cfg)
    units, trained = evaluation_units(cfg)
    with open_dict(cfg):
        if trained is not None:
            cfg.model = trained.model
            log.info("model from the run config of %s", units[0].folder)
        if len(units) == 1 and cfg.get("adapter_path") and trained is not None:
            cfg.adapter, cfg.condition = trained.adapter, trained.condition
        scene_objects = [unit.condition.scene_objects for unit in units if "scene_objects" in unit.condition]
        # units=[...] (one or several): the scenes a grounding unit was trained on (GLIGEN: 1-3), not those of
        # this config's default condition (one object); adapter_path took the run's condition, which says the same
        from_units = not (len(units) == 1 and cfg.get("adapter_path"))
        if from_units and scene_objects and "num_objects" in cfg.data:
            cfg.data.num_objects = scene_objects[0]
    check_train_config(cfg)
    return units


def read_batches(cfg: DictConfig, units: list[EvalUnit]) -> tuple[list[list[dict]], int]:
    """Each unit's extractor and validation set, and the evaluation items as batches: ``batches[b][k]`` is batch
    ``b`` read with unit ``k``'s extractor (the same images and prompts, each unit's condition); and the count."""
    for unit in units:
        unit.extractor = instantiate(unit.condition.extractor, _convert_="all")
        slots = _grounding_slots(unit.folder)
        if slots and hasattr(unit.extractor, "max_boxes"):
            unit.extractor.max_boxes = slots  # pad grounding to the slots the GLIGEN adapter was built with
        unit.dataset = instantiate(cfg.data, extractor=unit.extractor, _convert_="all").val_dataset
    count = min(cfg.num_samples, len(units[0].dataset))
    batches = [
        [collate([unit.dataset[i] for i in range(first, min(first + cfg.batch_size, count))]) for unit in units]
        for first in range(0, count, cfg.batch_size)
    ]
    return batches, count


def _grounding_slots(folder: Path) -> int | None:
    """``max_objects`` of a GLIGEN adapter folder (its gligen_config.json), None for other adapters."""
    from adapters.gligen import CONFIG_NAME

    config = folder / CONFIG_NAME
    return json.loads(config.read_text()).get("max_objects") if config.is_file() else None


def _unit_options(unit: EvalUnit) -> dict:
    return {key: unit.spec[key] for key in ("scale", "start", "end", "mode", "mask") if key in unit.spec}


def _primary(units: list[EvalUnit]) -> str | None:
    """The score the grid ranks by: the single unit's condition score (its config's ``metric``, as training's
    controllability callback: box_iou for boxes; else its re-extraction score); for several units ``mask_iou`` on
    shapes, else the first unit's condition score."""
    scenes = hasattr(units[0].dataset, "scene")
    if len(units) == 1:
        own = units[0].condition.get("metric") if scenes else None  # shapes scores need the scenes
        return own or primary_metric(units[0].extractor) or ("mask_iou" if scenes else None)
    if scenes:
        return "mask_iou"
    first = primary_metric(units[0].extractor)
    return f"unit0/{first}" if first else None


def _box_detector(cfg: DictConfig, units: list[EvalUnit]):
    """The local open-vocabulary detector that re-finds grounding units' boxes (``box_detector``), or None."""
    if not cfg.get("box_detector") or not any(unit.condition.get("kind") == "grounding" for unit in units):
        return None
    from conditions.detected_boxes import DetectedBoxesExtractor

    # phrases are asked per sample (each sample's grounding); this one only satisfies the constructor
    return DetectedBoxesExtractor(cfg.box_detector, phrases=["object"], device=cfg.device)


def _score(units, batches, images, cfg: DictConfig, detector) -> tuple[list[dict], dict]:
    """Per-sample score rows for both models (scene scores once, each unit's re-extraction scores, named
    ``unit<k>/<score>`` when there are several units), and per model the detector's AP@0.5 over the set."""
    rows, ap_inputs = [], {model: ([], []) for model in images}
    for model, model_images in images.items():
        for seed_index in range(len(model_images) // len(batches)):  # the references have one "seed"
            for batch_number, unit_batches in enumerate(batches):
                generated = model_images[seed_index * len(batches) + batch_number]
                first = unit_batches[0]
                scores = [{} for _ in range(len(generated))]
                for k, (unit, batch) in enumerate(zip(units, unit_batches)):
                    samples = evaluation_samples(unit.dataset, first, generated, condition=batch["condition"])
                    prefix = f"unit{k}/" if len(units) > 1 else ""
                    for row, unit_row, sample in zip(
                        scores, _unit_scores(unit, samples, detector, ap_inputs[model]), samples
                    ):
                        if k == 0 and sample.scene is not None:
                            row["num_objects"] = len(sample.scene.objects)
                            row.update(scene_scores(sample.generated, sample.scene))
                        row.update({prefix + key: value for key, value in unit_row.items()})
                for offset, row in enumerate(scores):
                    item = batch_number * cfg.batch_size + offset
                    rows.append(
                        {"model": model, "item": item, "seed": seed_index, "prompt": first["prompt"][offset], **row}
                    )
    detections = {
        model: {"detected_box_ap50": average_precision(*ap_inputs[model])} for model in images if ap_inputs[model][0]
    }
    return rows, detections


def _unit_scores(unit: EvalUnit, samples, detector, ap_inputs: tuple[list, list]) -> list[dict]:
    """One unit's re-extraction scores of the samples, plus the detector's for grounding (its detections and the
    given boxes are appended to ``ap_inputs``)."""
    rows = reextraction_scores(unit.extractor, samples)
    if detector is None or samples[0].grounding is None:
        return rows
    found = detect_named_objects(detector, samples)
    for row, detected in zip(rows, found_box_scores(found, samples)):
        row.update(detected)
    ap_inputs[0].extend([list(zip(record.boxes, record.scores, record.phrases)) for record in found])
    ap_inputs[1].extend([list(zip(s.grounding.boxes, s.grounding.phrases)) for s in samples])
    return rows


def _sample_all(
    backbone, units, batches: list[list[dict]], sampling: dict, cfg: DictConfig, cache: BaseImageCache | None = None
) -> list[torch.Tensor]:
    """Samples per (seed, batch), seed-major; the noise seed depends only on (seed index, batch), so the base and
    the adapter start from the same noise. ``cache``: the base model's, read where an earlier evaluation kept them."""
    results = []
    for seed_index in range(cfg.num_seeds):
        for batch_number, unit_batches in enumerate(batches):
            seed = cfg.seed + 1000 * seed_index + batch_number
            conditions = [batch["condition"] for batch in unit_batches]
            prompts = list(unit_batches[0]["prompt"])
            images = cache.read(prompts, sampling, seed) if cache is not None else None
            if images is None:
                images = generate(backbone, units, conditions, prompts, sampling, seed)
                if cache is not None:
                    cache.write(prompts, sampling, seed, images)
            results.append(images)
    if cache is not None:
        cache.report(len(results))
    return results


def _reference_images(backbone, batches: list[list[dict]], device: str) -> dict[str, list[torch.Tensor]]:
    """The items' own images per batch (B, 3, H, W) in [0, 1] ("truth": the ceiling of each score, below 1 where
    the scorer cannot recover the condition, e.g. shapes of one colour that touch), and the same encoded and decoded
    by the base model's VAE ("truth_vae": about the best a sample this VAE decodes is expected to score)."""
    truth = [signed_to_unit(unit_batches[0]["pixel_values"]).float() for unit_batches in batches]
    return {"truth": truth, "truth_vae": [backbone.vae_round_trip(images.to(device)).cpu() for images in truth]}


def _mean_of(rows: list[dict], model: str) -> dict[str, float]:
    return mean_scores([{k: v for k, v in row.items() if metric_of(k)} for row in rows if row["model"] == model])


def _by_num_objects(rows: list[dict]) -> dict[str, dict]:
    """Mean scores by the scenes' object count, for a set of shapes scenes with several counts (``data.num_objects``
    a range): {count: {"num_items": n, model: {score: mean}}}; empty otherwise. Crowded scenes bound box IoU lower
    (occlusion, touching shapes of one colour), so a set's mean depends on its mix of counts."""
    counts = sorted({row["num_objects"] for row in rows if "num_objects" in row})
    if len(counts) < 2:
        return {}
    models = list(dict.fromkeys(row["model"] for row in rows))
    table = {}
    for count in counts:
        chosen = [row for row in rows if row.get("num_objects") == count]
        items = {row["item"] for row in chosen}
        table[str(count)] = {"num_items": len(items), **{model: _mean_of(chosen, model) for model in models}}
    return table
