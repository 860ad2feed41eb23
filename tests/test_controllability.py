"""The controllability callback: base score beside the adapter's, the curve, and the step where control appears."""

import json
from types import SimpleNamespace

from lightning_modules.controllability import ShapesControllabilityCallback


class RecordingLogger:
    def __init__(self):
        self.rows = []

    def log_metrics(self, metrics, step):
        self.rows.append((step, metrics))


def test_control_step_is_the_first_jump_over_the_base(tmp_path):
    callback = ShapesControllabilityCallback(
        output_file=str(tmp_path / "c.json"), every_n_steps=10, jump_threshold=0.25
    )
    ious = iter([0.1, 0.15, 0.3, 0.5, 0.9])  # base, then steps 0, 10, 20, 30
    callback.evaluate = lambda module, dataset, use_adapter=True: {
        "mask_iou": next(ious),
        "box_iou": 0.2,
        "caption_accuracy": 0.5,
    }
    callback.score_dataset_images = lambda dataset: {"mask_iou": 1.0, "box_iou": 0.8, "caption_accuracy": 1.0}
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
    assert logger.rows[0][1]["val/box_iou"] == 0.2 and logger.rows[0][1]["val/box_iou_truth"] == 0.8
    summary = json.loads((tmp_path / "c.json").read_text())
    assert summary["control_step"] == 20 and summary["final"]["mask_iou"] == 0.9
    assert summary["base_without_adapter"]["mask_iou"] == 0.1
    assert (tmp_path / "c.png").is_file()


def test_turns_itself_off_without_ground_truth(tmp_path):
    callback = ShapesControllabilityCallback(output_file=str(tmp_path / "c.json"))
    trainer = SimpleNamespace(
        global_step=0, is_global_zero=True, loggers=[], datamodule=SimpleNamespace(val_dataset=object())
    )
    callback.on_train_start(trainer, None)
    assert not callback.enabled


def test_the_condition_picks_the_metric_of_the_control_step(tmp_path):
    callback = ShapesControllabilityCallback(output_file=str(tmp_path / "c.json"), metric="box_iou")
    boxes = iter([0.2, 0.3, 0.6])  # base, steps 0 and 10; mask IoU never moves
    callback.evaluate = lambda module, dataset, use_adapter=True: {
        "mask_iou": 0.1,
        "box_iou": next(boxes),
        "caption_accuracy": 0.5,
    }
    callback.score_dataset_images = lambda dataset: {"mask_iou": 1.0, "box_iou": 0.8, "caption_accuracy": 1.0}
    datamodule = SimpleNamespace(val_dataset=SimpleNamespace(scene=1))
    trainer = SimpleNamespace(global_step=0, is_global_zero=True, loggers=[], datamodule=datamodule)
    callback.on_train_start(trainer, None)
    trainer.global_step = 10
    callback.on_train_end(trainer, None)
    assert callback.control_step == 10
    summary = json.loads((tmp_path / "c.json").read_text())
    assert summary["metric"] == "box_iou" and summary["dataset_images"]["box_iou"] == 0.8


def test_an_unknown_metric_is_named(tmp_path):
    import pytest

    with pytest.raises(ValueError, match=r"controllability metric 'fid'; choose one of: mask_iou, box_iou"):
        ShapesControllabilityCallback(output_file=str(tmp_path / "c.json"), metric="fid")
