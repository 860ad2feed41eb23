"""The adapter zoo side by side: one row per training run of the same task with a different ``adapter=``.

Make the runs (same data, base model, schedule and evaluation; only the adapter changes), then the table:

    ctrlkit train -m adapter=controlnet,controlnet_xs,control_lora,t2i_adapter trainer.max_steps=500 logger=csv \
        hydra.sweep.dir=outputs/adapter_zoo
    python benchmarks/adapter_zoo.py outputs/adapter_zoo [more run dirs ...] --out benchmarks/results/adapter_zoo

(the README's table: 21 minutes for the sweep on a 2-core CPU, under a minute for the table).

Columns: trainable parameters, exported weights (MB), training step time (ms, the run's batch, one thread, median
of ``--rounds`` interleaved rounds), steps to control (``val/control_step``: the first validation whose primary
score rose ``jump_threshold`` over the base), the final primary score and caption accuracy (the run's
controllability curve, its fixed validation set and seeds), and the inference cost per denoising step (UNet +
adapter forward over UNet alone, batch 2 as under classifier-free guidance; T2I-Adapter's features are computed
once per sample, as its sampler does). Writes ``<out>.md`` (the table) and ``<out>.png`` (the primary score's
curves over steps).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def run_dirs(paths: list[str]) -> list[Path]:
    """Run directories (holding controllability.json) given directly or found under a multirun folder."""
    found = []
    for path in map(Path, paths):
        found += [path] if (path / "controllability.json").is_file() else sorted(path.glob("*/controllability.json"))
    runs = [p if p.is_dir() else p.parent for p in found]
    if not runs:
        raise SystemExit(f"no run directories with controllability.json under {', '.join(paths)}")
    return runs


def read_run(run: Path) -> dict:
    """What the run wrote: its config, controllability curve and exported weights."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(run / "config.yaml")
    scores = json.loads((run / "controllability.json").read_text())
    metric = scores["jump_metric"]
    # the adapter's own weights file(s), not extra exports in subfolders (Control-LoRA's merged controlnet/)
    weights = sum(f.stat().st_size for f in (run / "adapter").glob("*.safetensors"))
    return {
        "run": run,
        "cfg": cfg,
        "name": cfg.adapter.name,
        "metric": metric,
        "base": scores["base_without_adapter"][metric],
        "final": scores["final"][metric],
        "final_step": scores["final"]["step"],
        "caption_accuracy": scores["final"].get("caption_accuracy"),
        "control_step": scores["control_step"],
        "curve": [(point["step"], point[metric]) for point in scores["curve"]],
        "weights_mb": weights / 1e6,
    }


def build(cfg):
    """The run's system and one training batch, from its saved config (``ctrlkit train``'s construction)."""
    from hydra.utils import instantiate

    backbone = instantiate(cfg.model, _convert_="all")
    build_adapter = instantiate(cfg.adapter.build, _convert_="all")
    adapter = build_adapter(backbone.unet, vae_scale_factor=backbone.vae_scale_factor)
    system = instantiate(cfg.system, backbone=backbone, adapter=adapter, _convert_="all")
    datamodule = instantiate(cfg.data, extractor=instantiate(cfg.condition.extractor), _convert_="all")
    datamodule.setup("fit")
    return system, next(iter(datamodule.train_dataloader())), cfg.trainer.gradient_clip_val


def inference_steps(system, batch):
    """(UNet alone, UNet + adapter) forward functions for one denoising step at batch 2."""
    from adapters.base import run_unet

    backbone, adapter = system.backbone, system.adapter
    inputs = system.training_inputs({key: value[:2] for key, value in batch.items()})
    condition = adapter.prepare(inputs.condition)  # once per sample (T2I-Adapter's features)
    latents, timesteps, text = inputs.noisy_latents, inputs.timesteps, inputs.encoder_hidden_states

    @torch.no_grad()
    def base() -> None:
        backbone.unet(latents, timesteps, text)

    @torch.no_grad()
    def with_adapter() -> None:
        kwargs = adapter(condition, noisy_latents=latents, timesteps=timesteps, encoder_hidden_states=text)
        run_unet(backbone.unet, latents, timesteps, text, **kwargs)  # ControlNet-XS runs the UNet itself

    return base, with_adapter


def measure(row: dict, rounds: int) -> None:
    """Adds trainable parameters, step time and inference overhead to ``row`` (medians over interleaved rounds)."""
    from train_step import ours

    system, batch, clip = build(row["cfg"])
    system.adapter.eval()
    base, with_adapter = inference_steps(system, batch)
    step = ours(system, batch, clip)
    step()  # warm-up: fills the caches, as after the first epoch
    row["trainable_params"] = sum(p.numel() for p in system.adapter.trainable_parameters())
    step_times, base_times, adapter_times = [], [], []
    for _ in range(rounds):
        step_times.append(sum(step()))
        for function, times in ((base, base_times), (with_adapter, adapter_times)):
            start = time.perf_counter()
            function()
            times.append(time.perf_counter() - start)
    row["step_ms"] = 1000 * statistics.median(step_times)
    row["inference_overhead"] = statistics.median(adapter_times) / statistics.median(base_times)


def table(rows: list[dict]) -> str:
    lines = [
        "| adapter | trainable params | weights (MB) | train step (ms) | steps trained | steps to control | "
        "final score (base) | caption accuracy | inference per step vs base |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        control = row["control_step"] if row["control_step"] is not None else f"not in {row['final_step']}"
        caption = f"{row['caption_accuracy']:.2f}" if row["caption_accuracy"] is not None else "-"
        lines.append(
            f"| {row['name']} | {row['trainable_params'] / 1e6:.2f}M | {row['weights_mb']:.2f} | "
            f"{row['step_ms']:.0f} | {row['final_step']} | {control} | "
            f"{row['metric']} {row['final']:.3f} ({row['base']:.3f}) | "
            f"{caption} | {row['inference_overhead']:.2f}x |"
        )
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4))
    for row in rows:
        steps, scores = zip(*row["curve"])
        axis.plot(steps, scores, marker="o", markersize=3, label=row["name"])
    axis.set_xlabel("training step")
    axis.set_ylabel(f"val/{rows[0]['metric']}")
    axis.set_title("the adapter zoo on the same task")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="run directories, or a multirun folder holding them")
    parser.add_argument("--rounds", type=int, default=11)
    parser.add_argument("--out", default="benchmarks/results/adapter_zoo")
    args = parser.parse_args()
    torch.set_num_threads(1)  # a shared, noisy CPU: one thread, medians
    rows = [read_run(run) for run in run_dirs(args.runs)]
    metrics = {row["metric"] for row in rows}
    if len(metrics) > 1:
        raise SystemExit(f"the runs score different conditions ({', '.join(sorted(metrics))}): not one task")
    for row in rows:
        measure(row, args.rounds)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    text = table(rows)
    out.with_suffix(".md").write_text(text + "\n")
    plot(rows, out.with_suffix(".png"))
    print(text)
    print(f"wrote {out.with_suffix('.md')} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
