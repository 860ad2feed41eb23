"""The controllability callback: base score beside the adapter's, the curve, and the step where control appears,
in the JSON summary, the W&B run and the CSV log."""

import csv
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
from omegaconf import OmegaConf, open_dict
from PIL import Image

from conditions import CannyExtractor, HEDExtractor
from conditions.shapes_truth import ShapesTruthExtractor
from lightning_modules.callbacks.controllability import ControllabilityCallback, draw_curve
from lightning_modules.commands.config_checks import CONF_DIR
from lightning_modules.commands.train import train
from tests.helpers.wandb_records import read_history


class RecordingLogger:
    def __init__(self):
        self.rows = []

    def log_metrics(self, metrics, step):
        self.rows.append((step, metrics))


def test_control_step_is_the_first_jump_over_the_base(tmp_path):
    callback = ControllabilityCallback(output_file=str(tmp_path / "c.json"), every_n_steps=10, jump_threshold=0.25)
    ious = iter([0.1, 0.15, 0.3, 0.5, 0.9])  # base, then steps 0, 10, 20, 30
    callback.step_is_the_base_model = lambda *args: False  # a fake module: step 0 is sampled, not taken from the base
    callback.evaluate = lambda module, dataset, use_adapter=True: {
        "mask_iou": next(ious),
        "box_iou": 0.2,
        "caption_accuracy": 0.5,
    }
    logger = RecordingLogger()
    trainer = SimpleNamespace(
        global_step=0,
        is_global_zero=True,
        loggers=[logger],
        datamodule=SimpleNamespace(val_dataset=SimpleNamespace(scene=None)),
    )
    callback.on_train_start(trainer, None)
    for step in (10, 20, 30):
        trainer.global_step = step
        callback.on_train_batch_end(trainer, None, None, None, None)
    callback.on_train_end(trainer, None)
    assert callback.base["mask_iou"] == 0.1
    assert callback.control_step == 20  # 0.5 >= 0.1 + 0.25; 0.3 at step 10 is not
    assert [row[1]["val/mask_iou"] for row in logger.rows] == [0.15, 0.3, 0.5, 0.9]
    assert logger.rows[2][1]["val/control_step"] == 20
    assert logger.rows[0][1]["val/box_iou"] == 0.2
    summary = json.loads((tmp_path / "c.json").read_text())
    assert summary["control_step"] == 20 and summary["final"]["mask_iou"] == 0.9
    assert summary["base_without_adapter"]["mask_iou"] == 0.1
    curve = np.asarray(Image.open(tmp_path / "c.png").convert("RGB")).astype(int)
    assert curve.shape == (300, 480, 3)  # draw_curve's default size
    assert (curve.std(axis=(0, 1)) > 10).all()  # drawn on, not a blank page


def test_turns_itself_off_without_ground_truth(tmp_path):
    callback = ControllabilityCallback(output_file=str(tmp_path / "c.json"))
    trainer = SimpleNamespace(
        global_step=0, is_global_zero=True, loggers=[], datamodule=SimpleNamespace(val_dataset=object())
    )
    callback.on_train_start(trainer, None)
    assert not callback.enabled


def test_no_jump_is_logged_as_minus_one(tmp_path):
    callback = ControllabilityCallback(output_file=str(tmp_path / "c.json"), every_n_steps=10, jump_metric="canny_f1")
    scores = iter([0.2, 0.2, 0.25])
    callback.step_is_the_base_model = lambda *args: False
    callback.evaluate = lambda module, dataset, use_adapter=True: {"canny_f1": next(scores)}
    logger = RecordingLogger()
    trainer = SimpleNamespace(
        global_step=0, is_global_zero=True, loggers=[logger], datamodule=SimpleNamespace(val_dataset=None)
    )
    callback.on_train_start(trainer, None)
    trainer.global_step = 10
    callback.on_train_end(trainer, None)
    assert callback.control_step is None
    assert logger.rows[-1] == (10, {"val/control_step": -1})
    assert json.loads((tmp_path / "c.json").read_text())["jump_metric"] == "canny_f1"


def test_the_condition_decides_the_jump_metric(hed_weights_dir):
    callback = ControllabilityCallback(output_file="unused.json")
    shapes = SimpleNamespace(extractor=CannyExtractor(), scene=None)
    assert callback.resolve_jump_metric(shapes) == "canny_f1"
    assert callback.resolve_jump_metric(SimpleNamespace(extractor=HEDExtractor(weights_dir=hed_weights_dir))) == (
        "hed_ssim"
    )
    assert callback.resolve_jump_metric(SimpleNamespace(extractor=ShapesTruthExtractor("depth"))) == "depth_rmse"
    assert ControllabilityCallback("x.json", jump_metric="box_iou").resolve_jump_metric(shapes) == "box_iou"


def test_curve_and_control_step_reach_wandb_and_csv(make_train_config, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = make_train_config(
        "logger=csv",
        "trainer.max_steps=2",
        "trainer.log_every_n_steps=1",
        "callbacks.controllability.every_n_steps=1",
        "callbacks.controllability.num_samples=3",  # more than data.val_size: the 2 items there are scored
        # any score counts as a jump, so the first evaluation (step 0) is the control step
        "callbacks.controllability.jump_threshold=-1",
    )
    with open_dict(cfg):
        cfg.logger.wandb = OmegaConf.load(CONF_DIR / "logger" / "wandb.yaml").wandb
        cfg.logger.wandb.mode = "offline"
    train(cfg)
    run = Path(cfg.paths.output_dir)
    summary = json.loads((run / "controllability.json").read_text())
    assert summary["jump_metric"] == "canny_f1" and summary["control_step"] == 0
    assert [point["step"] for point in summary["curve"]] == [0, 1, 2]
    # the ceiling beside the curve: the scenes' own images
    assert summary["dataset_images"]["mask_iou"] == 1.0
    assert summary["num_samples"] == 3 and summary["num_items"] == cfg.data.val_size == 2

    (run_dir,) = (run / "wandb").glob("offline-run-*")
    history = read_history(run_dir)
    assert len(history["val/canny_f1"]) == 3 and len(history["val/mask_iou"]) == 3
    assert history["val/control_step"] == [0]
    assert len(history["val/canny_f1_base"]) == 3
    assert history["val/mask_iou_truth"] == [1.0] * 3
    assert history["val/controllability_curve/captions"] == [["canny_f1; control at step 0"]]

    (metrics_file,) = (run / "csv").glob("version_*/metrics.csv")
    rows = list(csv.DictReader(metrics_file.open()))
    curve = {int(row["step"]): float(row["val/canny_f1"]) for row in rows if row.get("val/canny_f1")}
    assert curve == {point["step"]: point["canny_f1"] for point in summary["curve"]}
    assert [(int(row["step"]), float(row["val/control_step"])) for row in rows if row.get("val/control_step")] == [
        (0, 0.0)
    ]


def test_a_configured_jump_metric_decides_the_control_step(tmp_path):
    """condition=boxes sets jump_metric=box_iou (conf/condition/boxes.yaml: metric)."""
    callback = ControllabilityCallback(
        output_file=str(tmp_path / "c.json"), jump_metric="box_iou", jump_threshold=0.25
    )
    boxes = iter([0.2, 0.3, 0.6])  # base, steps 0 and 10; mask IoU never moves
    callback.step_is_the_base_model = lambda *args: False
    callback.evaluate = lambda module, dataset, use_adapter=True: {
        "mask_iou": 0.1,
        "box_iou": next(boxes),
        "caption_accuracy": 0.5,
    }
    datamodule = SimpleNamespace(val_dataset=None)
    trainer = SimpleNamespace(global_step=0, is_global_zero=True, loggers=[], datamodule=datamodule)
    callback.on_train_start(trainer, None)
    trainer.global_step = 10
    callback.on_train_end(trainer, None)
    assert callback.control_step == 10  # gains: step 0 (0.3-0.2)/0.8 = 0.125, step 10 (0.6-0.2)/0.8 = 0.5
    assert json.loads((tmp_path / "c.json").read_text())["jump_metric"] == "box_iou"


def test_an_unknown_jump_metric_is_named(tmp_path):
    import pytest

    with pytest.raises(ValueError, match=r"unknown jump_metric 'fid'; choose one of: canny_f1"):
        ControllabilityCallback(output_file=str(tmp_path / "c.json"), jump_metric="fid")


def test_draw_curve_draws_each_series(tmp_path):
    """The curve PNG has the requested size, the jump metric, mask IoU and the control step in their colours."""
    curve = [{"step": step, "depth_rmse": 200.0 - step, "mask_iou": step / 100} for step in (0, 50, 100)]
    draw_curve(curve, {"depth_rmse": 180.0}, 50, tmp_path / "d.png", "depth_rmse", size=(400, 250))
    pixels = np.asarray(Image.open(tmp_path / "d.png").convert("RGB")).astype(int)
    assert pixels.shape == (250, 400, 3)
    colours = {"tab:blue": (31, 119, 180), "tab:green": (44, 160, 44), "tab:red": (214, 39, 40)}
    for name, colour in colours.items():
        assert (np.abs(pixels - colour).sum(-1) < 30).sum() > 20, name


def test_base_scores_come_from_the_cache_in_a_second_run(make_train_config, tmp_path, monkeypatch):
    """The base model is scored once per (weights, items, sampler, precision); a change of any misses."""
    evaluations = []
    evaluate = ControllabilityCallback.evaluate

    def counting(self, pl_module, dataset, use_adapter=True):
        evaluations.append(use_adapter)
        return evaluate(self, pl_module, dataset, use_adapter)

    monkeypatch.setattr(ControllabilityCallback, "evaluate", counting)

    def run(name: str, *overrides: str) -> dict:
        cfg = make_train_config(
            f"callbacks.controllability.base_cache_dir={tmp_path / 'base_scores'}", "trainer.max_steps=1", *overrides
        )
        with open_dict(cfg):
            cfg.paths.output_dir = str(tmp_path / name)
        evaluations.clear()
        train(cfg)
        return json.loads((tmp_path / name / "controllability.json").read_text())["base_without_adapter"]

    first = run("first")
    assert evaluations.count(False) == 1 and len(list((tmp_path / "base_scores").glob("*.json"))) == 1
    assert run("second") == first and evaluations.count(False) == 0  # read back, not scored
    run("other_sampler", "callbacks.controllability.num_inference_steps=3")
    assert evaluations.count(False) == 1 and len(list((tmp_path / "base_scores").glob("*.json"))) == 2
