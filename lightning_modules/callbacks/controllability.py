"""Controllability during training: does the adapter follow its condition, and at which step did it start to?

ControlNet's "sudden convergence" is invisible in the loss. Every ``every_n_steps`` steps this callback samples the
first validation items under their conditions and scores the images by re-extraction: the condition decides
the metric (``conditions.controllability``: Canny F1 for canny, SSIM for HED, ...), and on ``shapes`` the
exact scene adds ``mask_iou``, ``box_iou`` and ``caption_accuracy``. Each score is logged as ``val/<score>``; the
base model without the adapter is scored once on the same seeds (``val/<score>_base``). The first step whose
``jump_metric`` covers ``jump_threshold`` of the gap between the base and a perfect score is the control step,
logged as ``val/control_step`` (-1 at the end when control never appeared).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytorch_lightning as pl
import torch

from conditions.controllability import (
    METRICS,
    mean_scores,
    primary_metric,
    scene_scores,
    score_samples,
)
from conditions.io import write_atomically
from lightning_modules.callbacks.base_model import adapter_is_inert, base_model_key
from lightning_modules.callbacks.samples import generate_in_eval_mode
from lightning_modules.condition_views import evaluation_samples
from lightning_modules.data.common import collate
from lightning_modules.distributed import on_rank_zero

log = logging.getLogger(__name__)


class ControllabilityCallback(pl.Callback):
    """Scores the adapter on the first ``num_samples`` validation items every ``every_n_steps`` steps.

    Args:
        output_file: JSON written at the end: base and final scores, the curve, the control step (and a PNG beside).
        jump_metric: the score whose jump marks control; None: the condition's own (e.g. ``canny_f1``), or
            ``mask_iou`` for a condition without a re-extraction metric on ``shapes``.
        base_cache_dir: a folder where the base model's scores are kept for later runs (``base_scores``); None: off.
        jump_threshold: fraction of the gap between the base score and a perfect score that counts as
            "control appeared" (0.2: an IoU of 0.1 without the adapter must reach 0.28).
        num_inference_steps, guidance_scale, scheduler, seed: the sampler, fixed across evaluations.
    """

    def __init__(
        self,
        output_file: str,
        every_n_steps: int = 100,
        num_samples: int = 32,
        num_inference_steps: int = 20,
        guidance_scale: float = 5.0,
        scheduler: str = "unipc",
        seed: int = 0,
        jump_metric: str | None = None,
        jump_threshold: float = 0.2,
        base_cache_dir: str | None = None,
    ) -> None:
        if jump_metric is not None and jump_metric not in METRICS:
            raise ValueError(f"unknown jump_metric '{jump_metric}'; choose one of: {', '.join(METRICS)}")
        self.output_file = Path(output_file)
        self.every_n_steps = every_n_steps
        self.num_samples = num_samples
        self.sampling = {
            "num_inference_steps": num_inference_steps,
            "guidance_scale": guidance_scale,
            "scheduler": scheduler,
            "seed": seed,
        }
        self.jump_metric = jump_metric
        self.jump_threshold = jump_threshold
        self.base_cache_dir = Path(base_cache_dir) if base_cache_dir else None
        self.enabled = True
        self.base: dict | None = None
        self.truth: dict | None = None
        self.num_items = num_samples
        self.curve: list[dict] = []
        self.control_step: int | None = None

    def validation_batch(self, dataset) -> dict:
        """The first ``num_samples`` validation items, the same at every evaluation."""
        self.num_items = min(self.num_samples, len(dataset))
        return collate([dataset[index] for index in range(self.num_items)])

    @torch.no_grad()
    def evaluate(self, pl_module: pl.LightningModule, dataset, use_adapter: bool = True) -> dict:
        """Mean scores of images generated for the first ``num_samples`` validation items."""
        batch = self.validation_batch(dataset)
        images = generate_in_eval_mode(pl_module, batch, self.sampling, use_adapter=use_adapter)
        return mean_scores(score_samples(dataset.extractor, evaluation_samples(dataset, batch, images)))

    def base_scores(self, trainer: pl.Trainer, pl_module: pl.LightningModule, dataset) -> dict:
        """The base model's scores on the validation items, from ``base_cache_dir`` when an earlier run scored the
        same thing: they depend only on the frozen model's weights, the items, the sampler and the precision (the
        key hashes all of them), so a short run does not spend its first minute scoring the base again."""
        if self.base_cache_dir is None:
            return self.evaluate(pl_module, dataset, use_adapter=False)
        batch = self.validation_batch(dataset)
        extractor = getattr(dataset, "extractor", None)
        settings = extractor.settings() if hasattr(extractor, "settings") else None
        key = base_model_key(trainer, pl_module, batch, self.sampling, settings)
        path = self.base_cache_dir / f"{key}.json"
        try:
            scores = json.loads(path.read_text())
            log.info("base model scores from the cache %s", path)
            return scores
        except (OSError, ValueError):
            scores = self.evaluate(pl_module, dataset, use_adapter=False)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(path, json.dumps(scores))
        return scores

    def resolve_jump_metric(self, dataset) -> str | None:
        """The configured ``jump_metric``, else the condition's primary score, else ``mask_iou`` on shapes."""
        if self.jump_metric is not None:
            return self.jump_metric
        extractor = getattr(dataset, "extractor", None)
        primary = primary_metric(extractor) if extractor is not None else None
        return primary or ("mask_iou" if hasattr(dataset, "scene") else None)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._prepare(trainer, pl_module):
            self._record(trainer, pl_module)

    def _prepare(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> bool:
        """Resolve the jump metric and score the base model and the scenes (unless restored); False when
        controllability is off for this condition."""
        dataset = trainer.datamodule.val_dataset
        self.jump_metric = self.resolve_jump_metric(dataset)
        self.enabled = self.jump_metric is not None
        if not self.enabled:
            name = getattr(getattr(dataset, "extractor", None), "name", type(dataset).__name__)
            log.warning("controllability is off: condition '%s' has no re-extraction metric and no scene", name)
            return False
        if self.base is None:
            self.base = on_rank_zero(trainer, lambda: self.base_scores(trainer, pl_module, dataset))
            if trainer.is_global_zero:
                log.info("base model without adapter: %s", self.base)
        if self.jump_metric not in self.base:  # e.g. box_iou comes from shapes scenes, which these items lack
            log.warning("controllability is off: the validation items give no %s score", self.jump_metric)
            self.enabled = False
            return False
        if self.truth is None and callable(getattr(dataset, "scene", None)):
            # the scenes' own images: the ceiling of each score (occlusion and shared colours keep box IoU below 1)
            scenes = [dataset.scene(index) for index in range(min(self.num_samples, len(dataset)))]
            self.truth = mean_scores([scene_scores(scene.image, scene) for scene in scenes])
            # (not their VAE round trips, as `ctrlkit evaluate` scores: a run whose items are all in the feature cache
            # never runs the VAE encoder)
            if trainer.is_global_zero:
                log.info("the scenes' own images score: %s", self.truth)
        return True

    def end_of_run_done(self, trainer: pl.Trainer) -> bool:
        """Whether the summary of this step is written (``ResumableEndOfRun``); True when scoring is off."""
        if not self.enabled:
            return True
        try:
            return json.loads(self.output_file.read_text())["final"]["step"] == trainer.global_step
        except (OSError, ValueError, KeyError, TypeError):
            return False

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx
    ) -> None:
        if self.enabled and self.every_n_steps > 0 and trainer.global_step % self.every_n_steps == 0:
            self._record(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.enabled:
            return
        if not self._prepare(trainer, pl_module):  # cheap once prepared; a resumed run whose loop was skipped is not
            return
        if not self.curve or self.curve[-1]["step"] != trainer.global_step:
            self._record(trainer, pl_module)
        if not trainer.is_global_zero:  # every process recorded the final scores; one writes them
            return
        if self.control_step is None:  # say so in every logger, not only by a missing key
            for logger in trainer.loggers:
                logger.log_metrics({"val/control_step": -1}, step=trainer.global_step)
        self.output_file.parent.mkdir(parents=True, exist_ok=True)
        summary = {
            "base_without_adapter": self.base,
            "dataset_images": self.truth,
            "final": self.curve[-1],
            "jump_metric": self.jump_metric,
            "control_step": self.control_step,
            "jump_threshold": self.jump_threshold,
            "num_samples": self.num_samples,
            "num_items": self.num_items,  # the items scored: num_samples, or fewer where data.val_size is less
            "curve": self.curve,
        }
        curve_png = self.output_file.with_suffix(".png")
        draw_curve(self.curve, self.base, self.control_step, curve_png, self.jump_metric)
        # last, and whole: the summary marks the end of the run as done (end_of_run_done)
        write_atomically(self.output_file, json.dumps(summary, indent=2))
        for logger in trainer.loggers:
            if hasattr(logger, "log_image"):  # W&B: the curve as a picture beside the logged series
                from PIL import Image

                caption = f"{self.jump_metric}; control at step {self.control_step}"
                logger.log_image(
                    key="val/controllability_curve",
                    images=[Image.open(curve_png)],
                    step=trainer.global_step,
                    caption=[caption],
                )
        print(
            f"controllability: base without adapter {self.base}, final {self.curve[-1]}, "
            f"control ({self.jump_metric}) appeared at step {self.control_step}; written to {self.output_file}"
        )

    def step_is_the_base_model(self, trainer: pl.Trainer, pl_module: pl.LightningModule, dataset) -> bool:
        """Whether this step's samples are the base model's: step 0 of an adapter that leaves the UNet unchanged."""
        return trainer.global_step == 0 and adapter_is_inert(pl_module, self.validation_batch(dataset))

    def _record(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Score the current weights (rank zero samples; every process gets the scores: the best-checkpoint save
        that may follow is collective) and log them."""
        if self.curve and self.curve[-1]["step"] == trainer.global_step:
            return
        dataset = trainer.datamodule.val_dataset

        def score() -> dict:
            if self.step_is_the_base_model(trainer, pl_module, dataset):
                # a zero-initialized adapter's samples are the base model's, bit for bit: its scores too
                log.info("step 0: the adapter leaves the UNet unchanged (zero-initialized): scores = the base model's")
                return dict(self.base)
            return self.evaluate(pl_module, dataset)

        scores = on_rank_zero(trainer, score)
        self.curve.append({"step": trainer.global_step, **scores})
        metrics = {f"val/{key}": value for key, value in scores.items()}
        metrics.update({f"val/{key}_base": value for key, value in self.base.items()})
        metrics.update({f"val/{key}_truth": value for key, value in (self.truth or {}).items()})
        metric = self.jump_metric
        gain = METRICS[metric].gain(scores[metric], self.base[metric])
        if self.control_step is None and gain >= self.jump_threshold:
            self.control_step = trainer.global_step
            metrics["val/control_step"] = self.control_step
            log.info("control appeared at step %d: %s", self.control_step, scores)
        for logger in trainer.loggers if trainer.is_global_zero else ():
            logger.log_metrics(metrics, step=trainer.global_step)
        # Other callbacks read scores from callback_metrics; checkpoint callbacks that keep a best checkpoint get
        # the fresh score now, while the module still holds the weights that earned it.
        for key, value in scores.items():
            if isinstance(getattr(trainer, "callback_metrics", None), dict):
                trainer.callback_metrics[f"val/{key}"] = torch.tensor(value)
            for callback in getattr(trainer, "checkpoint_callbacks", []):
                if hasattr(callback, "consider_best"):  # it keeps best.ckpt by its own best_metric, if present
                    callback.consider_best(
                        trainer,
                        f"val/{key}",
                        value,
                        primary=key == self.jump_metric,
                        higher_is_better=METRICS[key].higher_is_better if key in METRICS else True,
                    )

    def state_dict(self) -> dict:
        """Base scores, curve and control step, so a resumed run continues the same curve."""
        return {"base": self.base, "truth": self.truth, "curve": self.curve, "control_step": self.control_step}

    def load_state_dict(self, state_dict: dict) -> None:
        self.base = state_dict.get("base")
        self.truth = state_dict.get("truth")
        self.curve = list(state_dict.get("curve", []))
        self.control_step = state_dict.get("control_step")


def draw_curve(
    curve: list[dict],
    base: dict,
    control_step: int | None,
    path: Path,
    jump_metric: str = "mask_iou",
    size=(480, 300),
) -> None:
    """A PNG (``size`` pixels) of the scores against step, drawn with matplotlib: ``jump_metric``, and
    ``mask_iou`` / ``caption_accuracy`` when they are not it, the base model's ``jump_metric`` as a dashed line and
    the control step as a vertical line. Scores with another range (depth RMSE, 0..255) are divided by it."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display, whatever backend the user has configured
    from matplotlib.figure import Figure

    dpi = 100
    figure = Figure(figsize=(size[0] / dpi, size[1] / dpi), dpi=dpi, layout="constrained")
    axes = figure.add_subplot()
    for key, colour in {jump_metric: "tab:blue", "mask_iou": "tab:green", "caption_accuracy": "tab:orange"}.items():
        points = [(point["step"], point[key] / METRICS[key].scale) for point in curve if key in point]
        if points:
            steps, values = zip(*points)
            axes.plot(steps, values, color=colour, marker=".", label=key)
    if jump_metric in base:
        axes.axhline(base[jump_metric] / METRICS[jump_metric].scale, color="grey", linestyle="--", label="base")
    if control_step is not None:
        axes.axvline(control_step, color="tab:red", label=f"control at {control_step}")
    axes.set(xlabel="step", ylabel="score (fraction of its range)", ylim=(0, 1.02))
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small", loc="lower right")
    figure.savefig(path)
