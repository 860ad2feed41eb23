"""Hydra sweeps of ``ctrlkit train -m``: the value a job returns to the sweeper, the W&B group of a sweep's jobs, and
the report of an Optuna search's best trial (``hparams_search=optuna``)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from lightning_modules.errors import CtrlkitError

# what a job of an Optuna search leaves in its run folder: the value it returned to the sweeper
TRIAL_SCORE_FILE = "trial_score.yaml"


def optimized_value(cfg: DictConfig, metrics: dict[str, float]) -> float | None:
    """The value a training job returns to a Hydra sweeper: ``metrics[cfg.optimized_metric]`` (hparams_search=optuna
    sets it to the condition's own score, e.g. ``val/canny_f1``); ``val/loss`` when no metric is named. A named metric
    the run did not log, or did not log as a finite number, is a one-line error naming it and what was logged."""
    name = cfg.get("optimized_metric")
    if name is None:
        return metrics.get("val/loss")
    name = str(name)
    logged = ", ".join(sorted(metrics)) or "nothing"
    if name not in metrics:
        raise CtrlkitError(
            f"optimized_metric={name} was not logged by this run, so the sweeper gets no score; it logged: {logged}"
        )
    value = float(metrics[name])
    if not math.isfinite(value):
        raise CtrlkitError(f"optimized_metric={name} is {value}: the sweeper needs a finite score")
    return value


def sweep_group() -> str | None:
    """The W&B group of this job: in a sweep (``-m``), ``<job name>-<sweep folder name>``, shared by every job of the
    sweep (``train-2026-01-31_12-00-00``); None in a single run or outside a Hydra app."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    try:
        hydra_cfg = HydraConfig.get()
    except ValueError:  # not inside a Hydra app (a test building a logger)
        return None
    if hydra_cfg.mode != RunMode.MULTIRUN:
        return None
    return f"{hydra_cfg.job.name}-{Path(str(hydra_cfg.sweep.dir)).name}"


class ReportBestTrial(Callback):
    """A Hydra callback for Optuna searches (``conf/hparams_search/optuna.yaml``): each job writes the value it
    returned into its run folder (``trial_score.yaml``), and when the sweep ends one line per trial and then
    ``ctrlkit train: best trial N of M: <metric>=<score> ...`` with its settings and run folder are printed. The
    sweeper's own ``optimization_results.yaml`` in the sweep folder says which trial is best."""

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        from hydra.core.utils import JobStatus

        if job_return.status != JobStatus.COMPLETED or not isinstance(job_return.return_value, int | float):
            return
        output_dir = Path(str(config.hydra.runtime.output_dir))
        score = {"metric": _metric_name(config), "value": float(job_return.return_value)}
        if output_dir.is_dir():
            (output_dir / TRIAL_SCORE_FILE).write_text(OmegaConf.to_yaml(OmegaConf.create(score)))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweeper = config.hydra.sweeper
        searched = [str(key) for key in (sweeper.get("params") or {})]
        report = best_trial_report(
            Path(str(config.hydra.sweep.dir)), _metric_name(config), str(sweeper.get("direction", "?")), searched
        )
        print(report, flush=True)


def _metric_name(config: DictConfig) -> str:
    return str(config.get("optimized_metric") or "val/loss")


def best_trial_report(sweep_dir: Path, metric: str, direction: str, searched: list[str]) -> str:
    """One line per trial (its score and the values of the ``searched`` settings), then the best trial (from the
    sweeper's ``optimization_results.yaml``) with its score, settings and run folder."""
    trials = sorted(
        (int(job.name), job) for job in sweep_dir.iterdir() if job.name.isdigit() and (job / ".hydra").is_dir()
    )
    lines = []
    for number, job in trials:
        score_file = job / TRIAL_SCORE_FILE
        score = OmegaConf.load(score_file).value if score_file.is_file() else None
        shown = f"{score:.4f}" if score is not None else "failed or no score"
        values = [item for item in _job_overrides(job) if item.split("=", 1)[0] in searched]
        lines.append(f"  trial {number}: {metric}={shown}  {' '.join(values)}")
    results_file = sweep_dir / "optimization_results.yaml"
    if not results_file.is_file():
        lines.append(f"ctrlkit train: no best trial: {results_file} was not written")
        return "\n".join(lines)
    results = OmegaConf.load(results_file)
    if "best_params" not in results:  # several objectives: the sweeper's Pareto front
        lines.append(f"ctrlkit train: Pareto-optimal trials in {results_file}")
        return "\n".join(lines)
    params = OmegaConf.to_container(results.best_params)
    best = next((item for item in trials if _has_params(item[1], params)), None)
    settings = ", ".join(f"{key}={_short(value)}" for key, value in params.items())
    where = f"trial {best[0]} of {len(trials)}" if best else f"an earlier trial of the study ({len(trials)} here)"
    run = f"; its run: {best[1]}" if best else ""
    lines.append(
        f"ctrlkit train: best trial: {where}: {metric}={float(results.best_value):.4f} ({direction}) with {settings}"
        f"{run}; results: {results_file}"
    )
    return "\n".join(lines)


def _short(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _job_overrides(job: Path) -> list[str]:
    try:
        return [str(item) for item in OmegaConf.load(job / ".hydra" / "overrides.yaml")]
    except OSError:
        return []


def _has_params(job: Path, params: dict) -> bool:
    given = dict(item.split("=", 1) for item in _job_overrides(job) if "=" in item)
    return all(key in given and _same(given[key], value) for key, value in params.items())


def _same(text: str, value) -> bool:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return text == str(value)
    try:
        return math.isclose(float(text), float(value), rel_tol=1e-12)
    except ValueError:
        return False
