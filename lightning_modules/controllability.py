"""Controllability during training: does the adapter put the shape where the condition says?

ControlNet's "sudden convergence" is invisible in the loss; this callback samples the fixed validation scenes of
``shapes`` under their conditions, segments each image by the colours its caption names and logs
``val/mask_iou`` (against the exact ground-truth mask) and ``val/caption_accuracy``. The base model without the
adapter is scored once on the same seeds (``val/mask_iou_base``), and the first step whose IoU gains
``jump_threshold`` over the base is logged as ``val/control_step``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import default_collate

from conditions.metrics import colour_mask, mask_iou, score_shapes_image
from lightning_modules.callbacks import generate_in_eval_mode

log = logging.getLogger(__name__)


class ShapesControllabilityCallback(pl.Callback):
    """Scores the adapter on the first ``num_samples`` validation scenes every ``every_n_steps`` steps.

    Args:
        output_file: JSON written at the end: base and final scores, the curve, the control step.
        jump_threshold: IoU gain over the base model that counts as "control appeared".
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
        jump_threshold: float = 0.25,
    ) -> None:
        self.output_file = Path(output_file)
        self.every_n_steps = every_n_steps
        self.num_samples = num_samples
        self.sampling = {
            "num_inference_steps": num_inference_steps,
            "guidance_scale": guidance_scale,
            "scheduler": scheduler,
            "seed": seed,
        }
        self.jump_threshold = jump_threshold
        self.enabled = True
        self.base: dict | None = None
        self.curve: list[dict] = []
        self.control_step: int | None = None

    @torch.no_grad()
    def evaluate(self, pl_module: pl.LightningModule, dataset, use_adapter: bool = True) -> dict:
        """Mean mask IoU and caption accuracy of generated images over the first ``num_samples`` scenes."""
        count = min(self.num_samples, len(dataset))
        batch = default_collate([dataset[index] for index in range(count)])
        images = generate_in_eval_mode(pl_module, batch, self.sampling, use_adapter=use_adapter)
        images = (images * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()
        ious, captions = [], []
        for index, image in enumerate(images):
            scene = dataset.scene(index)
            named = np.zeros(image.shape[:2], dtype=bool)
            correct = True
            for obj in scene.objects:
                named |= colour_mask(image, obj.colour)
                correct &= score_shapes_image(image, obj.colour, obj.shape, scene.background).caption_correct
            ious.append(mask_iou(named, scene.foreground_mask))
            captions.append(correct)
        return {"mask_iou": float(np.mean(ious)), "caption_accuracy": float(np.mean(captions))}

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        dataset = trainer.datamodule.val_dataset
        if not hasattr(dataset, "scene"):
            self.enabled = False
            log.warning(
                "controllability on shapes needs data=shapes (scenes with ground truth); it is off for %s",
                type(dataset).__name__,
            )
            return
        if self.base is None:
            self.base = self.evaluate(pl_module, dataset, use_adapter=False)
            log.info("base model without adapter: %s", self.base)
        self._record(trainer, pl_module)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx
    ) -> None:
        if self.enabled and self.every_n_steps > 0 and trainer.global_step % self.every_n_steps == 0:
            self._record(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.enabled or not trainer.is_global_zero:
            return
        if not self.curve or self.curve[-1]["step"] != trainer.global_step:
            self._record(trainer, pl_module)
        self.output_file.parent.mkdir(parents=True, exist_ok=True)
        summary = {
            "base_without_adapter": self.base,
            "final": self.curve[-1],
            "control_step": self.control_step,
            "jump_threshold": self.jump_threshold,
            "num_samples": self.num_samples,
            "curve": self.curve,
        }
        self.output_file.write_text(json.dumps(summary, indent=2))
        draw_curve(self.curve, self.base, self.control_step, self.output_file.with_suffix(".png"))
        print(
            f"controllability: base without adapter {self.base}, final {self.curve[-1]}, "
            f"control appeared at step {self.control_step}; written to {self.output_file}"
        )

    def _record(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero or (self.curve and self.curve[-1]["step"] == trainer.global_step):
            return
        scores = self.evaluate(pl_module, trainer.datamodule.val_dataset)
        self.curve.append({"step": trainer.global_step, **scores})
        metrics = {
            "val/mask_iou": scores["mask_iou"],
            "val/caption_accuracy": scores["caption_accuracy"],
            "val/mask_iou_base": self.base["mask_iou"],
            "val/caption_accuracy_base": self.base["caption_accuracy"],
        }
        if self.control_step is None and scores["mask_iou"] >= self.base["mask_iou"] + self.jump_threshold:
            self.control_step = trainer.global_step
            metrics["val/control_step"] = self.control_step
            log.info("control appeared at step %d: %s", self.control_step, scores)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        # Other callbacks read scores from callback_metrics; checkpoint callbacks that keep a best checkpoint get
        # the fresh score now, while the module still holds the weights that earned it.
        if isinstance(getattr(trainer, "callback_metrics", None), dict):
            trainer.callback_metrics["val/mask_iou"] = torch.tensor(scores["mask_iou"])
        for callback in getattr(trainer, "checkpoint_callbacks", []):
            if hasattr(callback, "consider_best"):
                callback.consider_best(trainer, "val/mask_iou", scores["mask_iou"])

    def state_dict(self) -> dict:
        """Base scores, curve and control step, so a resumed run continues the same curve."""
        return {"base": self.base, "curve": self.curve, "control_step": self.control_step}

    def load_state_dict(self, state_dict: dict) -> None:
        self.base = state_dict.get("base")
        self.curve = list(state_dict.get("curve", []))
        self.control_step = state_dict.get("control_step")


def draw_curve(curve: list[dict], base: dict, control_step: int | None, path: Path, size=(480, 300)) -> None:
    """A PNG of mask IoU (blue) and caption accuracy (green) against step, the base model's IoU as a grey dashed
    line and the control step as a red line. Drawn with PIL so no plotting library is needed."""
    from PIL import Image, ImageDraw

    width, height = size
    left, right, top, bottom = 44, 12, 24, 30
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    last_step = max(point["step"] for point in curve) or 1

    def xy(step: float, value: float) -> tuple[float, float]:
        return (left + (width - left - right) * step / last_step, top + (height - top - bottom) * (1 - value))

    draw.rectangle([xy(0, 1), xy(last_step, 0)], outline="black")
    for value in (0.0, 0.25, 0.5, 0.75, 1.0):
        draw.text((4, xy(0, value)[1] - 6), f"{value:.2f}", fill="black")
    draw.text((left, height - bottom + 8), "step 0", fill="black")
    draw.text((width - right - 60, height - bottom + 8), f"step {last_step}", fill="black")
    for x in range(left, width - right, 12):  # dashed base line
        y = xy(0, base["mask_iou"])[1]
        draw.line([(x, y), (min(x + 6, width - right), y)], fill="grey")
    if control_step is not None:
        draw.line([xy(control_step, 0), xy(control_step, 1)], fill="red")
    for key, colour in (("mask_iou", "blue"), ("caption_accuracy", "green")):
        draw.line([xy(point["step"], point[key]) for point in curve], fill=colour, width=2)
    draw.text((left + 4, 4), "mask IoU (blue), caption accuracy (green), base IoU (grey), control (red)", fill="black")
    image.save(path)
