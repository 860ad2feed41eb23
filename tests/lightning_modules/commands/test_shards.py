"""``ctrlkit shards``: shards + manifest from an imagefolder, fill50k, an extract output or the shapes scenes; a rerun
skips finished shards, bad images are named and left out; training on the shards works end to end."""

from __future__ import annotations

import json
import os

import pytest
import torch
import webdataset as wds
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from conditions import CannyExtractor
from conditions.circles import write_circles
from conditions.folder import extract_folder
from lightning_modules.commands.config_checks import CONF_DIR
from lightning_modules.commands.shards import Sample, extract_source, run_shards
from lightning_modules.data.shapes import ShapesDataset
from lightning_modules.data.webdataset import WebDataModule
from lightning_modules.errors import CtrlkitError
from tests.helpers.cli import run_cli, the_error_line
from tests.lightning_modules.commands.test_cli import error_lines, run_ctrlkit


def shards_config(*overrides: str):
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
        cfg = compose(config_name="shards", overrides=["progress=false", *overrides])
    GlobalHydra.instance().clear()
    return cfg


def keys(shard) -> list[str]:
    return [
        sample["__key__"] for sample in wds.DataPipeline(wds.SimpleShardList([str(shard)]), wds.tarfile_to_samples())
    ]


@pytest.mark.parametrize("layout", ["imagefolder", "fill50k"])
def test_shards_write_a_manifest_leave_bad_images_out_and_a_rerun_skips_finished_shards(tmp_path, caplog, layout):
    root = write_circles(tmp_path / "in", count=12, size=32, layout=layout)
    image = "images/7.png" if layout == "imagefolder" else "target/7.png"
    (root / image).write_bytes(b"not a png")
    output = tmp_path / "shards"
    cfg = shards_config(f"source={layout}", f"input={root}", f"output={output}", "maxcount=5")
    report = run_shards(cfg)
    manifest = json.loads((output / "manifest.json").read_text())
    assert [shard["name"] for shard in manifest["shards"]] == [
        "shard-000000.tar",
        "shard-000001.tar",
        "shard-000002.tar",
    ]
    assert [shard["samples"] for shard in manifest["shards"]] == [5, 4, 2] and manifest["samples"] == 11
    (bad,) = manifest["shards"][1]["bad"]
    assert f"cannot decode image {root / image}" in bad and f"left out {bad}" in caplog.text
    assert manifest["maps"] and manifest["settings"]["source"] == layout and report.written and not report.done
    assert "000000007" not in keys(output / "shard-000001.tar")
    times = {path.name: path.stat().st_mtime_ns for path in output.glob("*.tar")}

    (output / "shard-000001.tar").unlink()  # as if the run had stopped before this shard
    again = run_shards(cfg)
    assert again.written == ["shard-000001.tar"] and again.done == ["shard-000000.tar", "shard-000002.tar"]
    assert again.summary(output, 0.0).startswith("ctrlkit shards: 11 samples in 3 shards (1 written, 2 already done)")
    assert all(times[name] == (output / name).stat().st_mtime_ns for name in again.done)
    with pytest.raises(CtrlkitError, match=r"holds shards written with maxcount=5; use another output folder"):
        run_shards(shards_config(f"source={layout}", f"input={root}", f"output={output}", "maxcount=4"))


def test_an_interrupted_shard_leaves_no_partial_tar(tmp_path, monkeypatch):
    root = write_circles(tmp_path / "in", count=6, size=16, layout="imagefolder")
    output = tmp_path / "shards"
    cfg = shards_config(f"input={root}", f"output={output}", "maxcount=4")
    load = Sample.__init__

    def interrupt_at_5(self, index, source, read):
        def reading():
            if index == 5:
                raise KeyboardInterrupt
            return read()

        load(self, index, source, reading)

    monkeypatch.setattr(Sample, "__init__", interrupt_at_5)
    with pytest.raises(KeyboardInterrupt):
        run_shards(cfg)
    assert sorted(path.name for path in output.iterdir()) == ["manifest.json", "shard-000000.tar"]
    monkeypatch.undo()
    report = run_shards(cfg)
    assert report.done == ["shard-000000.tar"] and report.written == ["shard-000001.tar"] and report.samples == 6


def test_an_extract_output_with_its_captions_becomes_shards(tmp_path):
    images = write_circles(tmp_path / "photos", count=6, size=32, layout="imagefolder")
    extract_folder(CannyExtractor(), images / "images", tmp_path / "maps", num_workers=0, progress=False)
    captions = [json.loads(line) for line in (images / "metadata.jsonl").read_text().splitlines()]
    for entry in captions:  # a caption beside each image, the other way extract sources are captioned
        (images / entry["file_name"]).with_suffix(".txt").write_text(entry["text"])
    source = extract_source(tmp_path / "maps", images / "images", "file_name", "text", 1 << 26)
    assert source.maps and source.condition["name"] == "canny" and len(source.samples) == 6
    cfg = shards_config(
        "source=extract",
        f"input={tmp_path / 'maps'}",
        f"images={images / 'images'}",
        f"output={tmp_path / 'shards'}",
        "maxcount=3",
    )
    assert run_shards(cfg).samples == 6
    datamodule = WebDataModule(str(tmp_path / "shards"), CannyExtractor(), image_size=32, val_size=2, batch_size=2)
    fly = WebDataModule(str(tmp_path / "shards"), CannyExtractor(), conditions="extractor", image_size=32, val_size=2)
    batch = datamodule.fixed_batch(2)
    assert torch.equal(batch["condition"], fly.fixed_batch(2)["condition"])  # the stored maps are canny's own
    assert batch["prompt"][0] == captions[0]["text"]
    with pytest.raises(CtrlkitError, match=r"the shards hold maps made by .*'canny'.* but the condition is"):
        WebDataModule(str(tmp_path / "shards"), CannyExtractor(50, 100), image_size=32, val_size=2)


def test_the_cli_names_a_missing_input(tmp_path, capsys, monkeypatch):
    result = run_ctrlkit("shards", "source=fill50k", f"output={tmp_path / 'x'}", cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    (line,) = error_lines(result)
    assert "input is required with source=fill50k" in line
    (tmp_path / "photos").mkdir()  # images without the index that names them and their captions
    monkeypatch.chdir(tmp_path)  # its run folder stays out of the repository
    code, lines = run_cli(  # in this process: seconds less than a second real command
        capsys, ["shards", "source=imagefolder", f"input={tmp_path / 'photos'}", f"output={tmp_path / 'x'}"]
    )
    line = the_error_line("shards", code, lines)
    assert (
        'photos has no metadata.jsonl: data=imagefolder reads one JSON line per image there, e.g. {"file_name"' in line
    )


def test_shapes_shards_hold_the_shapes_items_and_train_end_to_end(tmp_path, make_train_config):
    from lightning_modules.commands.train import train

    output = tmp_path / "shapes"
    report = run_shards(shards_config("source=shapes", "count=24", "maxcount=6", f"output={output}"))
    assert report.samples == 24 and len(report.written) == 4
    datamodule = WebDataModule(str(output), CannyExtractor(), val_size=2, batch_size=2)
    shapes = ShapesDataset(CannyExtractor(), 24)  # data=shapes' training items, seed 0
    for index, item in zip(datamodule.fixed_batch(2)["index"].tolist(), datamodule.val_dataset.items):
        expected = shapes[index]
        assert torch.equal(item["pixel_values"], expected["pixel_values"]) and item["prompt"] == expected["prompt"]
        assert torch.equal(item["condition"], expected["condition"])
        assert datamodule.val_dataset.scene(index).caption == item["prompt"]  # controllability's shapes scores
    cfg = make_train_config("data=webdataset", f"data.urls={output}", "trainer.max_steps=3", "data.num_workers=2")
    metrics, objects = train(cfg)
    assert objects["trainer"].global_step == 3 and torch.isfinite(torch.tensor(metrics["train/loss"]))
    assert objects["trainer"].fit_loop.state_dict()["state_dict"]["combined_loader"] == [
        {"epoch": 0, "batches": 3, "world_size": 1}
    ]
    assert os.path.isfile(cfg.paths.output_dir + "/checkpoints/last.ckpt")


# two training runs (~20-100 s on a loaded 2-core machine); the loader-level resume test in test_webdataset.py is fast
@pytest.mark.slow
def test_a_run_resumed_mid_epoch_from_shards_ends_with_identical_weights(tmp_path, webdataset_shards):
    """4 steps on 16 shapes samples (val 2 left out: 7 batches an epoch, 2 workers), a checkpoint every 2 steps;
    a run resumed from the step-2 checkpoint -- mid-epoch, its position (epoch 0, 2 batches) in it -- ends with the
    same adapter weights as the run never stopped."""
    from lightning_modules.commands.train import train
    from tests.conftest import compose_train_config
    from tests.lightning_modules.test_resume import adapter_weights, assert_identical

    run = [
        "data=webdataset",
        f"data.urls={webdataset_shards}",
        "data.num_workers=2",
        "trainer.max_steps=4",
        "trainer.val_check_interval=4",
        "callbacks.model_checkpoint.every_n_train_steps=2",
        "callbacks.controllability.every_n_steps=0",
        "callbacks.sample_grid.every_n_steps=0",
    ]
    whole = tmp_path / "whole"
    train(compose_train_config(whole, run))
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    step_2 = whole / "checkpoints" / "step_000002.ckpt"
    (resumed / "checkpoints" / step_2.name).write_bytes(step_2.read_bytes())
    assert torch.load(step_2, weights_only=True)["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [
        {"epoch": 0, "batches": 2, "world_size": 1}
    ]
    _, objects = train(compose_train_config(resumed, [*run, "resume=auto"]))
    assert objects["trainer"].global_step == 4
    assert_identical(
        adapter_weights(whole / "checkpoints" / "last.ckpt"), adapter_weights(resumed / "checkpoints" / "last.ckpt")
    )
