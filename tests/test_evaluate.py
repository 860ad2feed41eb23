"""`ctrlkit evaluate` end to end on an adapter trained for a few steps: outputs, base beside adapter, W&B table."""

import csv
import json
from pathlib import Path

import pytest
from hydra.core.global_hydra import GlobalHydra

from lightning_modules.errors import CtrlkitError
from lightning_modules.evaluate import locate_adapter, run_evaluate
from lightning_modules.train import train
from tests.conftest import compose_config
from tests.helpers.wandb_records import read_history
from tests.test_cli import run_ctrlkit


def compose_evaluate_config(output_dir: Path, overrides: list[str]):
    return compose_config("evaluate", output_dir, overrides)


@pytest.fixture
def trained_run(make_train_config) -> Path:
    cfg = make_train_config("trainer.max_steps=2")
    train(cfg)
    return Path(cfg.paths.output_dir)


def test_evaluate_a_trained_adapter(trained_run, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    out = tmp_path / "evaluation"
    cfg = compose_evaluate_config(
        out,
        [
            f"adapter_path={trained_run}",
            "num_samples=3",
            "num_seeds=2",
            "batch_size=2",
            "sampling.num_inference_steps=2",
            "grid_rows=1",
            f"quality.inception_weights={tmp_path / 'absent' / 'inception.pth'}",
            f"quality.clip_model={tmp_path / 'absent' / 'clip'}",
            "logger=wandb",
            "logger.wandb.mode=offline",
        ],
    )
    summary = run_evaluate(cfg)
    GlobalHydra.instance().clear()
    printed = capsys.readouterr().out
    assert summary["condition"] == "canny" and summary["primary_metric"] == "canny_f1"
    for model in ("base", "adapter"):
        scores = summary[model]
        assert 0.0 <= scores["canny_f1"] <= 1.0 and 0.0 <= scores["mask_iou"] <= 1.0
        assert scores["fid"] == f"unavailable: {tmp_path / 'absent' / 'inception.pth'} not found"
        assert scores["clip_score"].startswith("unavailable:")
    assert json.loads((out / "metrics.json").read_text()) == summary
    rows = list(csv.DictReader((out / "per_sample.csv").open()))
    assert len(rows) == 2 * 2 * 3  # models x seeds x items
    assert {(row["model"], row["item"], row["seed"]) for row in rows} == {
        (model, str(item), str(seed)) for model in ("base", "adapter") for item in range(3) for seed in range(2)
    }
    # two seeds give two different images of the same item
    base = [row for row in rows if row["model"] == "base" and row["item"] == "0"]
    assert base[0]["canny_ssim"] != base[1]["canny_ssim"]
    assert (out / "grid.png").is_file() and [row["rank"] for row in summary["grid"]["rows"]] == ["best", "worst"]
    assert "canny_f1" in printed and "mask_iou" in printed and "base" in printed and "adapter" in printed
    (run_dir,) = (out / "wandb").glob("offline-run-*")
    history = read_history(run_dir)
    assert history["evaluate/samples/_type"] == ["table-file"] and history["evaluate/samples/nrows"] == [12]
    table = json.loads((run_dir / "files" / history["evaluate/samples/path"][0]).read_text())
    assert table["columns"][:4] == ["model", "condition", "prompt", "sample"] and "canny_f1" in table["columns"]
    assert history["evaluate/adapter/canny_f1"] == [summary["adapter"]["canny_f1"]]


def test_adapter_path_errors(tmp_path):
    with pytest.raises(CtrlkitError, match="is not a folder"):
        locate_adapter(str(tmp_path / "absent"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CtrlkitError, match="is empty"):
        locate_adapter(str(tmp_path / "empty"))
    result = run_ctrlkit("evaluate", f"adapter_path={tmp_path / 'absent'}", cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"ctrlkit evaluate: error: adapter_path {tmp_path / 'absent'} is not a folder" in result.stderr
