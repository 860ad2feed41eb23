"""``ctrlkit evaluate``: the adapter beside the base model without it, on a fixed evaluation set.

For the first ``num_samples`` items of the data's validation split and ``num_seeds`` seeds each, both models
sample with the same noise; every image is scored by re-extraction (the condition picks the score,
``conditions.controllability``) and the sets by FID / KID / CLIP score (``lightning_modules.image_quality``).
Writes ``metrics.json`` (means), ``per_sample.csv``, ``grid.png`` (best and worst adapter samples:
condition | base | adapter | reference) and, with ``logger=wandb``, a W&B table (condition | prompt | sample | scores).
"""

from __future__ import annotations

import csv
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf, open_dict
from torch.utils.data import default_collate
from torchvision.utils import make_grid, save_image

from adapters.sampling import make_scheduler, sample_latents
from conditions.controllability import METRICS, mean_scores, primary_metric, score_samples
from lightning_modules.config_checks import check_train_config
from lightning_modules.controllability import evaluation_samples
from lightning_modules.errors import CtrlkitError
from lightning_modules.image_quality import image_quality

log = logging.getLogger(__name__)

MODELS = ("base", "adapter")


def locate_adapter(path: str) -> tuple[Path, Path | None]:
    """(adapter folder, run config.yaml or None) from a run directory or an exported adapter folder."""
    given = Path(path).expanduser()
    if (given / "adapter").is_dir():
        folder = given / "adapter"
    elif given.is_dir():
        folder = given
    else:
        raise CtrlkitError(f"adapter_path {given} is not a folder; give a `ctrlkit train` run dir or its adapter/")
    if not any(folder.iterdir()):
        raise CtrlkitError(f"adapter folder {folder} is empty")
    config = folder.parent / "config.yaml"
    return folder, config if config.is_file() else None


@torch.no_grad()
def generate(backbone, adapter, condition: torch.Tensor, prompts: list[str], sampling: dict, seed: int):
    """Images (B, 3, H, W) in [0, 1]; ``adapter=None`` samples the base model. Same steps as
    ``AdapterTrainingSystem.generate``, without a training system around the modules."""
    device = backbone.unet.device
    height, width = condition.shape[-2:]
    factor = backbone.vae_scale_factor
    shape = (len(prompts), backbone.unet.config.in_channels, height // factor, width // factor)
    latents = sample_latents(
        backbone.unet,
        make_scheduler(sampling["scheduler"], backbone.noise_scheduler.config),
        backbone.encode_prompts(prompts),
        shape,
        adapter=adapter,
        condition=condition.to(device),
        uncond_hidden_states=backbone.encode_prompts([""] * len(prompts)),
        guidance_scale=sampling["guidance_scale"],
        num_inference_steps=sampling["num_inference_steps"],
        generator=torch.Generator().manual_seed(seed),
    )
    return backbone.decode_latents(latents).cpu()


def run_evaluate(cfg: DictConfig) -> dict:
    """Evaluate the adapter at ``cfg.adapter_path`` and the base model; returns the metrics.json content."""
    started = time.perf_counter()
    folder, run_config = locate_adapter(cfg.adapter_path)
    if run_config is not None and cfg.from_run:
        trained = OmegaConf.load(run_config)
        with open_dict(cfg):
            for key in ("model", "adapter", "condition"):
                cfg[key] = trained[key]
        log.info("model, adapter and condition from %s", run_config)
    check_train_config(cfg)
    torch.manual_seed(cfg.seed)
    backbone = instantiate(cfg.model, _convert_="all").to(cfg.device)
    extractor = instantiate(cfg.condition.extractor, _convert_="all")
    dataset = instantiate(cfg.data, extractor=extractor, _convert_="all").val_dataset
    count = min(cfg.num_samples, len(dataset))
    items = [dataset[index] for index in range(count)]
    batches = [default_collate(items[start : start + cfg.batch_size]) for start in range(0, count, cfg.batch_size)]
    sampling = OmegaConf.to_container(cfg.sampling)

    # Base first: loading an adapter may change the base UNet (an unlocked decoder, gated attention layers).
    images: dict[str, list[torch.Tensor]] = {}
    images["base"] = _sample_all(backbone, None, batches, sampling, cfg)
    adapter_class = get_class(cfg.adapter.build._target_.rsplit(".", 1)[0])
    adapter = adapter_class.from_pretrained(folder, unet=backbone.unet).to(cfg.device).eval()
    images["adapter"] = _sample_all(backbone, adapter, batches, sampling, cfg)

    rows = []
    for model in MODELS:
        for seed_index in range(cfg.num_seeds):
            for batch_number, batch in enumerate(batches):
                generated = images[model][seed_index * len(batches) + batch_number]
                samples = evaluation_samples(dataset, batch, generated)
                for offset, scores in enumerate(score_samples(extractor, samples)):
                    item = batch_number * cfg.batch_size + offset
                    rows.append(
                        {"model": model, "item": item, "seed": seed_index, "prompt": batch["prompt"][offset], **scores}
                    )
    metric = primary_metric(extractor) or ("mask_iou" if hasattr(dataset, "scene") else None)

    real = torch.cat([(batch["pixel_values"] / 2 + 0.5).clamp(0, 1) for batch in batches])
    prompts = [row["prompt"] for row in rows if row["model"] == "adapter"]
    quality = image_quality(
        _to_uint8(real),
        {model: _to_uint8(torch.cat(images[model])) for model in MODELS},
        prompts,
        cfg.quality.inception_weights,
        cfg.quality.clip_model,
        kid_subset_size=cfg.quality.kid_subset_size,
        device=cfg.device,
    )
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    summary = {
        "adapter_path": str(folder),
        "condition": extractor.name,
        "primary_metric": metric,
        "num_items": count,
        "num_seeds": cfg.num_seeds,
        "sampling": sampling,
        **{model: {**_mean_of(rows, model), **quality[model]} for model in MODELS},
    }
    _write_csv(rows, output_dir / "per_sample.csv")
    if metric is not None:
        summary["grid"] = _write_grid(rows, images, batches, metric, cfg, output_dir / "grid.png")
    (output_dir / "metrics.json").write_text(json.dumps(summary, indent=2))
    _log_wandb(cfg, rows, images, batches, summary)
    print(_report(summary, output_dir, time.perf_counter() - started))
    return summary


def _sample_all(backbone, adapter, batches: list[dict], sampling: dict, cfg: DictConfig) -> list[torch.Tensor]:
    """Samples per (seed, batch), seed-major; the noise seed depends only on (seed index, batch), so the base and
    the adapter start from the same noise."""
    results = []
    for seed_index in range(cfg.num_seeds):
        for batch_number, batch in enumerate(batches):
            seed = cfg.seed + 1000 * seed_index + batch_number
            results.append(generate(backbone, adapter, batch["condition"], list(batch["prompt"]), sampling, seed))
    return results


def _mean_of(rows: list[dict], model: str) -> dict[str, float]:
    return mean_scores([{k: v for k, v in row.items() if k in METRICS} for row in rows if row["model"] == model])


def _to_uint8(images: torch.Tensor) -> torch.Tensor:
    return (images.clamp(0, 1) * 255).round().to(torch.uint8)


def _write_csv(rows: list[dict], path: Path) -> None:
    keys = list(dict.fromkeys(key for row in rows for key in row))
    with path.open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)


def _image(images: dict, batches: list[dict], model: str, seed: int, item: int, batch_size: int) -> torch.Tensor:
    batch_number, offset = divmod(item, batch_size)
    return images[model][seed * len(batches) + batch_number][offset]


def _write_grid(rows, images, batches, metric: str, cfg: DictConfig, path: Path) -> dict:
    """Best and worst adapter samples by ``metric``: rows of condition | base | adapter | reference."""
    scored = [row for row in rows if row["model"] == "adapter" and not np.isnan(row.get(metric, np.nan))]
    sign = 1.0 if METRICS[metric].higher_is_better else -1.0
    ranked = sorted(scored, key=lambda row: -sign * row[metric])
    rows_shown = min(cfg.grid_rows, len(ranked) // 2) or len(ranked)
    chosen = {"best": ranked[:rows_shown], "worst": ranked[::-1][:rows_shown]}
    tiles = []
    for row in chosen["best"] + chosen["worst"]:
        batch_number, offset = divmod(row["item"], cfg.batch_size)
        batch = batches[batch_number]
        condition = batch["condition"][offset][:3]
        if condition.shape[0] == 1:
            condition = condition.expand(3, -1, -1)
        reference = (batch["pixel_values"][offset] / 2 + 0.5).clamp(0, 1)
        base = _image(images, batches, "base", row["seed"], row["item"], cfg.batch_size)
        adapter = _image(images, batches, "adapter", row["seed"], row["item"], cfg.batch_size)
        tiles += [condition, base, adapter, reference]
    save_image(make_grid(torch.stack(tiles), nrow=4, padding=2, pad_value=1.0), path)
    return {
        "file": str(path),
        "columns": "condition | base | adapter | reference",
        "rows": [
            {"rank": rank, "item": row["item"], "seed": row["seed"], metric: row[metric]}
            for rank in ("best", "worst")
            for row in chosen[rank]
        ],
    }


def _log_wandb(cfg: DictConfig, rows: list[dict], images: dict, batches: list[dict], summary: dict) -> None:
    """A W&B table, one line per sample (model | condition | prompt | sample | scores), and the means."""
    loggers = [instantiate(entry) for entry in (cfg.get("logger") or {}).values() if "_target_" in entry]
    for logger in loggers:
        if type(logger).__name__ != "WandbLogger":
            continue
        import wandb

        score_keys = [key for key in dict.fromkeys(k for row in rows for k in row) if key in METRICS]
        table = wandb.Table(columns=["model", "condition", "prompt", "sample", *score_keys])
        for row in rows:
            batch_number, offset = divmod(row["item"], cfg.batch_size)
            condition = batches[batch_number]["condition"][offset][:3]
            sample = _image(images, batches, row["model"], row["seed"], row["item"], cfg.batch_size)
            table.add_data(
                row["model"],
                wandb.Image(condition.permute(1, 2, 0).numpy()),
                row["prompt"],
                wandb.Image(sample.permute(1, 2, 0).numpy()),
                *[row.get(key) for key in score_keys],
            )
        means = {
            f"evaluate/{model}/{key}": value
            for model in MODELS
            for key, value in summary[model].items()
            if isinstance(value, float)
        }
        logger.experiment.log({"evaluate/samples": table, **means})
        logger.experiment.finish()


def _report(summary: dict, output_dir: Path, seconds: float) -> str:
    lines = [
        f"ctrlkit evaluate: {summary['adapter_path']} on {summary['num_items']} items x {summary['num_seeds']} "
        f"seeds, condition {summary['condition']} ({seconds:.0f} s)",
        f"  {'score':<18}{'base':>12}{'adapter':>12}",
    ]
    keys = [k for k in dict.fromkeys([*summary["base"], *summary["adapter"]])]
    for key in keys:
        base, adapter = summary["base"].get(key), summary["adapter"].get(key)
        if isinstance(base, float) and isinstance(adapter, float):
            marker = "  <- condition's score" if key == summary["primary_metric"] else ""
            lines.append(f"  {key:<18}{base:>12.4f}{adapter:>12.4f}{marker}")
        else:
            lines.append(f"  {key:<18}{base}")
    lines.append(f"  outputs:          {output_dir} (metrics.json, per_sample.csv, grid.png)")
    return "\n".join(lines)
