"""What ``ctrlkit evaluate`` writes: the per-sample CSV, the best/worst grid, the W&B table and the printed report.

``images[model]`` lists sample batches (B, 3, H, W) in [0, 1] seed-major; ``batches[b][k]`` is evaluation batch ``b``
read with unit ``k``'s extractor.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from torchvision.utils import make_grid, save_image

from conditions.controllability import metric_of
from conditions.ranges import signed_to_unit
from lightning_modules.condition_views import condition_picture

MODELS = ("base", "adapter")
# scored beside the models (``score_references``): the items' own images, and the same through the base's VAE
REFERENCES = ("truth", "truth_vae")


def write_csv(rows: list[dict], path: Path) -> None:
    keys = list(dict.fromkeys(key for row in rows for key in row))
    with path.open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)


def sample_image(images: dict, batches: list[dict], model: str, seed: int, item: int, batch_size: int) -> torch.Tensor:
    batch_number, offset = divmod(item, batch_size)
    return images[model][seed * len(batches) + batch_number][offset]


def condition_tiles(unit_batches: list[dict], offset: int, size: tuple[int, int]) -> list[torch.Tensor]:
    """Each unit's condition of one item as a (3, H, W) picture in [0, 1]; grounding as its boxes on black."""
    blank = torch.zeros(1, 3, *size)
    return [condition_picture(batch["condition"][offset : offset + 1], blank)[0] for batch in unit_batches]


def write_grid(rows, images, batches, metric: str, cfg: DictConfig, path: Path) -> dict:
    """Best and worst adapter samples by ``metric``: rows of each unit's condition | base | adapter | reference."""
    scored = [row for row in rows if row["model"] == "adapter" and not np.isnan(row.get(metric, np.nan))]
    sign = 1.0 if metric_of(metric).higher_is_better else -1.0
    ranked = sorted(scored, key=lambda row: -sign * row[metric])
    rows_shown = min(cfg.grid_rows, len(ranked) // 2) or len(ranked)
    chosen = {"best": ranked[:rows_shown], "worst": ranked[::-1][:rows_shown]}
    tiles = []
    for row in chosen["best"] + chosen["worst"]:
        batch_number, offset = divmod(row["item"], cfg.batch_size)
        unit_batches = batches[batch_number]
        reference = signed_to_unit(unit_batches[0]["pixel_values"][offset])
        base = sample_image(images, batches, "base", row["seed"], row["item"], cfg.batch_size)
        adapter = sample_image(images, batches, "adapter", row["seed"], row["item"], cfg.batch_size)
        tiles += [*condition_tiles(unit_batches, offset, tuple(reference.shape[-2:])), base, adapter, reference]
    columns = len(batches[0]) + 3
    save_image(make_grid(torch.stack(tiles), nrow=columns, padding=2, pad_value=1.0), path)
    return {
        "file": str(path),
        "columns": " | ".join(["condition"] * (columns - 3) + ["base", "adapter", "reference"]),
        "rows": [
            {"rank": rank, "item": row["item"], "seed": row["seed"], metric: row[metric]}
            for rank in ("best", "worst")
            for row in chosen[rank]
        ],
    }


def log_wandb(cfg: DictConfig, rows: list[dict], images: dict, batches: list[list[dict]], summary: dict) -> None:
    """A W&B table, one line per sample (model | condition | prompt | sample | scores), and the means."""
    loggers = [instantiate(entry) for entry in (cfg.get("logger") or {}).values() if "_target_" in entry]
    for logger in loggers:
        if type(logger).__name__ != "WandbLogger":
            continue
        import wandb

        score_keys = [key for key in dict.fromkeys(k for row in rows for k in row) if metric_of(key)]
        table = wandb.Table(columns=["model", "condition", "prompt", "sample", *score_keys])
        for row in rows:
            batch_number, offset = divmod(row["item"], cfg.batch_size)
            sample = sample_image(images, batches, row["model"], row["seed"], row["item"], cfg.batch_size)
            conditions = torch.cat(condition_tiles(batches[batch_number], offset, tuple(sample.shape[-2:])), dim=-1)
            table.add_data(
                row["model"],
                wandb.Image(conditions.permute(1, 2, 0).numpy()),
                row["prompt"],
                wandb.Image(sample.permute(1, 2, 0).numpy()),
                *[row.get(key) for key in score_keys],
            )
        means = {
            f"evaluate/{model}/{key}": value
            for model in (*MODELS, *REFERENCES)
            for key, value in summary.get(model, {}).items()
            if isinstance(value, float)
        }
        means |= {
            f"evaluate/{model}/{key}/{count}_objects": value
            for count, entry in summary.get("by_num_objects", {}).items()
            for model in (*MODELS, *REFERENCES)
            for key, value in entry.get(model, {}).items()
        }
        logger.experiment.log({"evaluate/samples": table, **means})
        logger.experiment.finish()


def report(summary: dict, output_dir: Path, seconds: float) -> str:
    units = summary["units"]
    what = f"{units[0]['adapter']}, condition {units[0]['condition']}" if len(units) == 1 else f"{len(units)} units"
    lines = [
        f"ctrlkit evaluate: {what} on {summary['num_items']} items x {summary['num_seeds']} seeds ({seconds:.0f} s)",
        *(f"  unit{k}: {unit['adapter']} ({unit['condition']})" for k, unit in enumerate(units) if len(units) > 1),
    ]
    references = [model for model in REFERENCES if model in summary]
    lines.append(f"  {'score':<24}" + "".join(f"{model:>12}" for model in (*MODELS, *references)))
    keys = [k for k in dict.fromkeys([*summary["base"], *summary["adapter"]])]
    for key in keys:
        base, adapter = summary["base"].get(key), summary["adapter"].get(key)
        if isinstance(base, float) and isinstance(adapter, float):
            values = [base, adapter, *(summary[model].get(key, float("nan")) for model in references)]
            marker = "  <- primary score" if key == summary["primary_metric"] else ""
            lines.append(f"  {key:<24}" + "".join(f"{value:>12.4f}" for value in values) + marker)
        else:
            lines.append(f"  {key:<24}{base}")
    metric = summary["primary_metric"]
    for count, scores in summary.get("by_num_objects", {}).items() if metric else ():
        label = f"{metric}, {count} object{'s' if count != '1' else ''}"
        values = [scores.get(model, {}).get(metric, float("nan")) for model in (*MODELS, *references)]
        items = f"  ({scores['num_items']} items)"
        lines.append(f"  {label:<24}" + "".join(f"{value:>12.4f}" for value in values) + items)
    if references:
        lines.append(
            "  (truth: the items' own images scored the same way; truth_vae: the same encoded and decoded by the "
            "base model's VAE, about the best its samples can be expected to reach)"
        )
    lines.append(f"  {'outputs:':<24}{output_dir} (metrics.json, per_sample.csv, grid.png)")
    return "\n".join(lines)
