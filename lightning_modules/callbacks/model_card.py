"""A model card (``README.md``, Hugging Face Hub front matter) beside the exported adapter, and the adapter as a
W&B artifact.

The card holds the run's own figures: base model, adapter, condition and extractor, data, optimizer steps and wall
time, the controllability table (base model without the adapter vs the adapter at the final step, and the step
control appeared), the final sample grid (copied into the folder as ``samples.png``) and the command that made it.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import shutil
import time
from pathlib import Path

import pytorch_lightning as pl
import yaml

from conditions.io import write_atomically
from lightning_modules.callbacks.card_usage import how_to_load
from lightning_modules.errors import CtrlkitError
from lightning_modules.shipped_adapters import resolve_adapter

log = logging.getLogger(__name__)

CARD_NAME = "README.md"
GRID_NAME = "samples.png"

# adapter family (``ConditioningAdapter.family``, or a conf/adapter/<name>.yaml name) prefix -> the family's Hub tag
# (checked in order: controlnet_xs before its prefix controlnet)
FAMILY_TAGS = {
    "controlnet_xs": "controlnet-xs",
    "controlnet": "controlnet",
    "t2i_adapter": "t2i-adapter",
    "gligen": "gligen",
}


def adapter_family(adapter_name: str) -> str:
    """The Hub tag of an adapter family or config name: controlnet, t2i-adapter or gligen (the name itself
    otherwise; gligen_masked is a gligen)."""
    for prefix, tag in FAMILY_TAGS.items():
        if adapter_name.startswith(prefix):
            return tag
    return adapter_name


def hydra_command() -> str | None:
    """``ctrlkit train <overrides>`` as Hydra received them for this job; None outside a Hydra run."""
    try:
        from hydra.core.hydra_config import HydraConfig

        overrides = list(HydraConfig.get().overrides.task)
    except (ImportError, ValueError, AttributeError):
        return None
    return " ".join(["ctrlkit train", *(shlex.quote(str(override)) for override in overrides)])


def _settings(node: dict | None, skip: tuple = ("_target_", "_partial_")) -> str:
    if not isinstance(node, dict):
        return "-"
    items = [f"`{key}={value}`" for key, value in node.items() if key not in skip and not isinstance(value, dict)]
    return ", ".join(items) or "-"


def read_card(folder: str | Path) -> tuple[dict, str]:
    """(front matter, body) of the model card in an adapter folder, or in a run folder's ``adapter/``. Raises
    OSError without a card, ValueError where its text does not open with YAML front matter (a mapping)."""
    path = Path(folder)
    card = (path / "adapter" if (path / "adapter").is_dir() else path) / CARD_NAME
    text = card.read_text()
    if not text.startswith("---\n") or "\n---\n" not in text:
        raise ValueError(f"{card}: no front matter between --- lines")
    front, body = text.removeprefix("---\n").split("\n---\n", 1)
    try:
        front = yaml.safe_load(front)
    except yaml.YAMLError as error:
        raise ValueError(f"{card}: its front matter is not YAML ({error})") from error
    if not isinstance(front, dict):
        raise ValueError(f"{card}: its front matter is not a mapping")
    return front, body


def steps_behind(folder: str | None) -> int | None:
    """The optimizer steps behind the weights in ``folder`` (``init_adapter=``): its card's ``total_steps``, or its
    ``step`` where it did not start from other weights; None without a readable ctrlkit card."""
    if not folder:
        return None
    try:
        facts = read_card(resolve_adapter(str(folder)))[0]["ctrlkit"]
        return int(facts.get("total_steps", facts["step"]))
    except (OSError, ValueError, CtrlkitError, KeyError, TypeError):
        return None  # no card, or not ctrlkit's: the steps before are unknown, and the card says so


def _number(value) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


class ModelCardCallback(pl.Callback):
    """Writes ``README.md`` (and ``samples.png``) into the exported adapter folder at the end of training, then
    logs that folder as a W&B ``model`` artifact when a ``WandbLogger`` built with ``log_adapter=true`` is present.

    It reads the outputs of the export, sample grid and controllability callbacks, so it must come after them in
    ``conf/callbacks`` (``on_train_end`` runs in that order; ``ResumableEndOfRun`` keeps it). Each file is written
    through a rename, and the card last: an adapter folder without its card (a run killed in between, or an export
    redone whole) is an end of run still to do.

    Args:
        config_file: the run's resolved config (``<run>/config.yaml``), the card's source for settings.
    """

    def __init__(self, config_file: str) -> None:
        self.config_file = Path(config_file)
        self.seconds_before = 0.0  # wall time of earlier sessions of a resumed run (from its checkpoint)
        self.started: float | None = None
        self.command: str | None = None
        # the saved weights the run started from (init_adapter=) and the steps behind them: set by the first session
        # and kept in the checkpoint, since a resumed run ignores an init_adapter= given to it
        self.started_from: str | None = None
        self.steps_before: int | None = None

    # -- state: the wall time and the starting weights go on across resumes
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.started = time.perf_counter()
        self.command = hydra_command()
        # a fresh run's; a resumed run's checkpoint then replaces them (load_state_dict runs after setup)
        started_from = self.run_config().get("init_adapter")
        self.started_from = str(started_from) if started_from else None
        self.steps_before = steps_behind(self.started_from)

    def wall_seconds(self) -> float:
        return self.seconds_before + (time.perf_counter() - self.started if self.started is not None else 0.0)

    def state_dict(self) -> dict:
        return {
            "wall_seconds": self.wall_seconds(),
            "init_adapter": self.started_from,
            "steps_before": self.steps_before,
        }

    def load_state_dict(self, state_dict: dict) -> None:
        self.seconds_before = float(state_dict.get("wall_seconds", 0.0))
        if "init_adapter" in state_dict:  # checkpoints older than this key keep the config's
            self.started_from, self.steps_before = state_dict["init_adapter"], state_dict.get("steps_before")

    def run_config(self) -> dict:
        """The run's resolved config (``config.yaml``); empty where it cannot be read."""
        try:
            return yaml.safe_load(self.config_file.read_text()) or {}
        except (OSError, yaml.YAMLError):
            return {}

    # -- the other callbacks' outputs
    @staticmethod
    def _find(trainer: pl.Trainer, name: str):
        return next((callback for callback in trainer.callbacks if type(callback).__name__ == name), None)

    def adapter_dir(self, trainer: pl.Trainer) -> Path | None:
        export = self._find(trainer, "ExportAdapterCallback")
        return export.output_dir if export is not None else None

    def end_of_run_done(self, trainer: pl.Trainer) -> bool:
        """Whether the exported adapter has its card (``ResumableEndOfRun``); True when nothing is exported."""
        folder = self.adapter_dir(trainer)
        return folder is None or (folder / CARD_NAME).is_file()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        folder = self.adapter_dir(trainer)
        if folder is None or not folder.is_dir():
            log.warning("no exported adapter folder: no model card written")
            return
        grid = self._copy_grid(trainer, folder)
        card, facts = self.card(trainer, pl_module, folder, grid)
        write_atomically(folder / CARD_NAME, card)
        log.info("model card written to %s", folder / CARD_NAME)
        self._log_artifact(trainer, folder, facts)

    def _copy_grid(self, trainer: pl.Trainer, folder: Path) -> Path | None:
        grids = self._find(trainer, "SampleGridCallback")
        source = grids.grid_path(trainer.global_step) if grids is not None else None
        if source is None or not source.is_file():
            return None
        target = folder / GRID_NAME
        temporary = target.with_name(f".{target.name}.tmp-{os.getpid()}")
        shutil.copyfile(source, temporary)
        os.replace(temporary, target)
        return target

    def _controllability(self, trainer: pl.Trainer) -> tuple[dict | None, str]:
        """(controllability.json of this step, or None; a sentence when it is absent)."""
        callback = self._find(trainer, "ControllabilityCallback")
        if callback is None:
            return None, "The controllability callback was not part of this run: no scores."
        if not callback.enabled:
            return None, (
                "Controllability was off for this run: the condition has no re-extraction metric and the data no "
                "scene to score against."
            )
        try:
            summary = json.loads(callback.output_file.read_text())
        except (OSError, ValueError):
            return None, f"No controllability summary was found at `{callback.output_file}`."
        if summary.get("final", {}).get("step") != trainer.global_step:
            return None, f"`{callback.output_file.name}` is not of the final step {trainer.global_step}: not shown."
        return summary, ""

    # -- the card
    def card(self, trainer: pl.Trainer, pl_module: pl.LightningModule, folder: Path, grid: Path | None):
        cfg = self.run_config()
        model, adapter_cfg = cfg.get("model") or {}, cfg.get("adapter") or {}
        condition, data = cfg.get("condition") or {}, cfg.get("data") or {}
        trainer_cfg = cfg.get("trainer") or {}
        # the adapter contract's family (a user's adapter registers its own), else the adapter config's name
        contract_family = getattr(getattr(pl_module, "adapter", None), "family", None)
        family = adapter_family(str(contract_family or adapter_cfg.get("name", "adapter")))
        title = getattr(getattr(pl_module, "adapter", None), "title", family)
        base_model = model.get("path") or model.get("_target_", "unknown")
        condition_name = str(condition.get("name", "unknown"))
        step = trainer.global_step
        seconds = self.wall_seconds()
        summary, missing = self._controllability(trainer)
        command = self.command or f"ctrlkit train (config: `{self.config_file}`; no Hydra overrides recorded)"

        # a run that started from saved weights (init_adapter=): what it started from and the steps in all
        started_from, before = self.started_from, self.steps_before
        facts = {
            "step": step,
            **({"init_adapter": str(started_from)} if started_from else {}),
            **({"total_steps": before + step} if before is not None else {}),
            "wall_seconds": round(seconds, 1),
            "adapter": adapter_cfg.get("name"),
            "condition": condition_name,
            "base_model": str(base_model),
        }
        if summary is not None:
            facts.update(
                {
                    "jump_metric": summary["jump_metric"],
                    "control_step": summary["control_step"],
                    "base_without_adapter": summary["base_without_adapter"],
                    "final": {key: value for key, value in summary["final"].items() if key != "step"},
                }
            )
        front = {
            "license": "other",  # placeholder: the base model's and the data's terms decide it
            "base_model": str(base_model),
            "library_name": "diffusers",
            "tags": ["ctrlkit", family, condition_name, "stable-diffusion", "diffusers"],
            "ctrlkit": facts,
        }
        lines = ["---", yaml.safe_dump(front, sort_keys=False).rstrip(), "---", ""]
        lines += [
            f"# {title} ({condition_name}) trained with ctrlkit",
            "",
            f"{title} weights for the base model `{base_model}`, conditioned on `{condition_name}`, "
            f"after {step} optimizer steps ({seconds:.0f} s of wall time)"
            + (f" from the weights of `{started_from}`" if started_from else "")
            + (f" ({before} steps before these: {before + step} in all)" if before is not None else "")
            + ". Written by `ctrlkit train`; "
            "the license above is a placeholder: set the base model's and the data's terms before sharing.",
            "",
        ]
        if grid is not None:
            lines += [
                f"![final samples: condition | sample | target]({grid.name})",
                "",
                f"Fixed-seed samples at step {step}, one row per validation item: condition | sample | target"
                + (" (boxes drawn in magenta)." if condition.get("kind") == "grounding" else "."),
                "",
            ]
        else:
            lines += ["No sample grid of the final step was found.", ""]

        lines += ["## Controllability", ""]
        if summary is None:
            lines += [missing, ""]
        else:
            base, final = summary["base_without_adapter"] or {}, summary["final"]
            # shapes runs also score the scenes' own images: each score's ceiling
            truth = summary.get("dataset_images") or {}
            titles = ["the items' own images"] if truth else []
            lines += [
                f"Scores of images generated for the first {summary.get('num_items', summary.get('num_samples', '?'))}"
                " validation items under their conditions, re-extracted and compared with the condition"
                + (", beside the same scores of the items' own images." if truth else "."),
                "",
                "| " + " | ".join(["score", "base without adapter", f"adapter at step {step}", *titles]) + " |",
                "|---" * (3 + len(titles)) + "|",
            ]
            for key in [key for key in final if key != "step"]:
                values = [base.get(key, "-"), final[key], *([truth.get(key, "-")] if truth else [])]
                lines.append(f"| {key} | " + " | ".join(_number(value) for value in values) + " |")
            control = summary["control_step"]
            when = f"appeared at step {control}" if control is not None else "never appeared"
            threshold = summary.get("jump_threshold")
            lines += ["", f"Control ({summary['jump_metric']}, {threshold} of the gap to a perfect score) {when}.", ""]

        model_path = f" `{model['path']}`" if model.get("path") else ""
        lines += [
            "## Training",
            "",
            "| | |",
            "|---|---|",
            f"| base model | `{model.get('_target_', '-')}`{model_path} |",
            f"| adapter | {title} (`adapter={adapter_cfg.get('name', '-')}`): {_settings(adapter_cfg.get('build'))} |",
            f"| learning rate | {adapter_cfg.get('learning_rate', '-')} |",
            f"| condition | `{condition_name}` ({condition.get('kind', '-')}), extractor "
            f"`{(condition.get('extractor') or {}).get('_target_', '-')}`: {_settings(condition.get('extractor'))} |",
            f"| data | `{data.get('_target_', '-')}`: "
            f"{_settings({key: value for key, value in data.items() if 'size' in key})} |",
            f"| optimizer steps | {step} (max_steps {trainer_cfg.get('max_steps', '-')}, "
            f"accumulate_grad_batches {trainer_cfg.get('accumulate_grad_batches', 1)}) |",
            *(
                [f"| started from | `{started_from}` ({before if before is not None else 'unknown'} steps) |"]
                if started_from
                else []
            ),
            f"| precision | {trainer_cfg.get('precision', '-')} |",
            f"| wall time | {seconds:.0f} s |",
            "",
            "Made by:",
            "",
            "```bash",
            command,
            "```",
            "",
            "## Use",
            "",
            "```python",
            how_to_load(family, folder),
            "```",
            "",
        ]
        return "\n".join(lines), facts

    # -- W&B
    def _log_artifact(self, trainer: pl.Trainer, folder: Path, facts: dict) -> None:
        for logger in trainer.loggers:
            if type(logger).__name__ != "WandbLogger" or not getattr(logger, "log_adapter", False):
                continue
            import wandb

            run = logger.experiment
            artifact = wandb.Artifact(
                name=f"adapter-{run.id}",
                type="model",
                description=f"{facts.get('adapter')} adapter ({facts.get('condition')}), step {facts['step']}",
                metadata=facts,
            )
            artifact.add_dir(str(folder))
            run.log_artifact(artifact, aliases=["latest", f"step-{facts['step']}"])
            log.info("adapter logged to W&B as artifact %s", artifact.name)
