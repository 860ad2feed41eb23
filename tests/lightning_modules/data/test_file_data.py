"""fill50k and imagefolder datasets: generated circles on disk, both condition sources, errors naming file and line."""

from __future__ import annotations

import json

import cv2
import pytest
import torch

from conditions import CannyExtractor, ImageDecodeError, read_image
from conditions.circles import write_circles
from conditions.multi import MultiConditionExtractor
from conditions.shapes_truth import ShapesTruthExtractor
from lightning_modules.data.files import FileDataModule
from lightning_modules.errors import CtrlkitError


@pytest.mark.parametrize("layout", ["fill50k", "imagefolder"])
def test_generated_circles_load_as_training_batches(tmp_path, layout):
    root = write_circles(tmp_path / layout, count=6, size=48, seed=1, layout=layout)
    datamodule = FileDataModule(str(root), CannyExtractor(), layout=layout, image_size=32, val_size=2, batch_size=2)
    assert len(datamodule.train_dataset) == 4 and len(datamodule.val_dataset) == 2
    batch = next(iter(datamodule.train_dataloader()))
    assert batch["pixel_values"].shape == (2, 3, 32, 32) and -1 <= batch["pixel_values"].min()
    assert batch["pixel_values"].max() <= 1 and batch["pixel_values"].std() > 0.05
    assert batch["condition"].shape == (2, 3, 32, 32) and set(batch["condition"].unique().tolist()) <= {0.0, 1.0}
    assert all(p.endswith(" background") and " circle with " in p for p in batch["prompt"])
    fixed = datamodule.fixed_batch(2)
    assert torch.equal(fixed["condition"], datamodule.fixed_batch(2)["condition"])


def test_extractor_on_the_fly_differs_from_the_outline_files(tmp_path):
    root = write_circles(tmp_path / "c", count=3, size=64)
    files = FileDataModule(str(root), CannyExtractor(), image_size=64, val_size=1).train_dataset[0]
    fly = FileDataModule(str(root), CannyExtractor(), conditions="extractor", image_size=64, val_size=1)
    item = fly.train_dataset[0]
    assert torch.equal(item["condition"], CannyExtractor()(read_image(root / "target" / "0.png")))
    assert item["condition"].sum() > 0 and not torch.equal(item["condition"], files["condition"])


def test_items_carry_sdxl_micro_conditioning_from_the_stored_image(tmp_path):
    """time_ids = (original height, width, crop top, left, target height, width): a 96x64 picture resized to 48x32
    and centre-cropped to 32x32 was cropped 8 rows from the top; a square one is not cropped."""
    root = write_circles(tmp_path / "c", count=3, size=48)
    image = read_image(root / "target" / "0.png")
    cv2.imwrite(str(root / "target" / "0.png"), cv2.resize(image, (64, 96)))
    datamodule = FileDataModule(str(root), CannyExtractor(), image_size=32, val_size=1)

    assert datamodule.train_dataset[0]["time_ids"].tolist() == [96, 64, 8, 0, 32, 32]
    assert datamodule.train_dataset[1]["time_ids"].tolist() == [48, 48, 0, 0, 32, 32]
    batch = next(iter(datamodule.train_dataloader()))
    assert batch["time_ids"].shape == (2, 6)  # batched for the SDXL UNet's added inputs


def corrupt(root, line_number: int, text: str) -> None:
    lines = (root / "prompt.json").read_text().splitlines()
    lines[line_number - 1] = text
    (root / "prompt.json").write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"source": "source/0.png", "target": "target/0.png"', "line 3: Expecting"),
        ('{"source": "source/0.png", "target": "target/0.png"}', "line 3: missing key\\(s\\) prompt"),
        ('{"source": "source/0.png", "target": "target/404.png", "prompt": "x"}', "line 3: file not found: .*404"),
    ],
)
def test_bad_line_names_file_and_line_or_is_skipped_and_counted(tmp_path, caplog, text, message):
    root = write_circles(tmp_path / "c", count=5, size=16)
    corrupt(root, 3, text)
    with pytest.raises(CtrlkitError, match=rf"prompt\.json {message}.*data.on_error=skip"):
        FileDataModule(str(root), CannyExtractor(), image_size=16, val_size=1, on_error="raise")
    datamodule = FileDataModule(str(root), CannyExtractor(), image_size=16, val_size=1)  # on_error=skip
    assert len(datamodule.train_dataset) + len(datamodule.val_dataset) == 4 and datamodule.skipped_lines == 1
    assert "skipped 1 invalid line(s)" in caplog.text and "prompt.json line 3" in caplog.text


def test_undecodable_image_names_the_line(tmp_path):
    root = write_circles(tmp_path / "c", count=3, size=16)
    (root / "target" / "1.png").write_bytes(b"not a png")
    datamodule = FileDataModule(str(root), CannyExtractor(), image_size=16, val_size=1)
    with pytest.raises(ImageDecodeError, match=r"prompt\.json line 2: cannot decode image .*1\.png"):
        datamodule.train_dataset[1]


def test_bad_settings_are_named(tmp_path):
    root = write_circles(tmp_path / "c", count=3, size=16)
    with pytest.raises(CtrlkitError, match="unknown data.layout 'coco'; choose one of: fill50k, imagefolder"):
        FileDataModule(str(root), CannyExtractor(), layout="coco")
    with pytest.raises(CtrlkitError, match="unknown data.conditions 'cache'; choose one of: files, extractor"):
        FileDataModule(str(root), CannyExtractor(), conditions="cache")
    # ground truth of drawn shapes scenes cannot be extracted from files' pixels: said before any item loads
    multi = MultiConditionExtractor(
        {"canny": CannyExtractor(channels=1), "shapes_mask": ShapesTruthExtractor("mask", channels=1)}
    )
    for extractor, name in [(ShapesTruthExtractor("mask"), "shapes_truth"), (multi, "multi")]:
        with pytest.raises(
            CtrlkitError,
            match=f"the '{name}' condition extractor reads drawn shapes scenes, not pixels: train it on data=shapes",
        ):
            FileDataModule(str(root), extractor, conditions="extractor")
    with pytest.raises(CtrlkitError, match=r"data.val_size=3 must be >= 1 and below the 3 usable pairs"):
        FileDataModule(str(root), CannyExtractor(), val_size=3)
    with pytest.raises(CtrlkitError, match=r"dataset index not found: .*metadata\.jsonl"):
        FileDataModule(str(root), CannyExtractor(), layout="imagefolder")


def test_imagefolder_columns_are_settings(tmp_path):
    root = write_circles(tmp_path / "c", count=3, size=16, layout="imagefolder")
    lines = [json.loads(line) for line in (root / "metadata.jsonl").read_text().splitlines()]
    renamed = [{"image": e["file_name"], "caption": e["text"], "edges": e["conditioning_image"]} for e in lines]
    (root / "metadata.jsonl").write_text("".join(json.dumps(e) + "\n" for e in renamed))
    datamodule = FileDataModule(
        str(root),
        CannyExtractor(),
        layout="imagefolder",
        image_size=16,
        val_size=1,
        image_column="image",
        caption_column="caption",
        conditioning_image_column="edges",
    )
    assert datamodule.train_dataset[0]["prompt"] == lines[0]["text"]


# both layouts feed the same FileDataModule; the imagefolder run (~25 s here) is in the slow set (-m slow)
@pytest.mark.parametrize(
    ("layout", "fixture"),
    [("fill50k", "fill50k_root"), pytest.param("imagefolder", "imagefolder_root", marks=pytest.mark.slow)],
)
def test_train_runs_on_a_file_dataset(make_train_config, request, layout, fixture):
    from lightning_modules.commands.train import train

    root = request.getfixturevalue(fixture)
    metrics, objects = train(make_train_config(f"data={layout}", f"data.root={root}", "debug=fdr"))
    assert objects["trainer"].global_step == 1 and torch.isfinite(torch.tensor(metrics["train/loss"]))


def test_missing_data_root_is_named(make_train_config):
    from lightning_modules.commands.config_checks import check_train_config

    with pytest.raises(CtrlkitError, match=r"data.root is required: add data.root=<path>"):
        check_train_config(make_train_config("data=fill50k"))
