"""Reliability, round two: decompression bombs, failed resumes, unwritable folders, bad compositions and unit
fields, refused weights in evaluate, and the end of training as resumable work."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conditions import CannyExtractor, ImageDecodeError, read_image
from conditions.circles import write_circles
from conditions.folder import MANIFEST, extract_folder
from lightning_modules.data.files import FileDataModule
from lightning_modules.errors import CtrlkitError
from tests.helpers.bomb import write_bomb_png

# ------------------------------------------------------------------ decompression bombs and other undecodable files


def test_a_bomb_is_refused_from_its_header_naming_the_file(tmp_path):
    bomb = write_bomb_png(tmp_path / "bomb.png")  # 100000x100000: over PIL's own hard limit
    with pytest.raises(ImageDecodeError, match=r"bomb\.png"):
        read_image(bomb)
    # between our limit and PIL's: our header check refuses it before decoding, and says the size and the limit
    big = write_bomb_png(tmp_path / "big.png", 9000, 9000)
    with pytest.raises(ImageDecodeError, match=r"big\.png is 9000x9000 = 81000000 pixels, over the limit of 67108864"):
        read_image(big)
    small = tmp_path / "small.png"
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(small)
    assert read_image(small).shape == (20, 30, 3)
    with pytest.raises(ImageDecodeError, match=r"30x20 = 600 pixels, over the limit of 599"):
        read_image(small, max_pixels=599)


def test_any_decoder_failure_is_an_image_decode_error(tmp_path, monkeypatch):
    image = tmp_path / "odd.png"
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(image)

    def decoder_bug(self, *args, **kwargs):
        raise MemoryError("decoder ran out of memory")

    monkeypatch.setattr(Image.Image, "load", decoder_bug)
    with pytest.raises(ImageDecodeError, match=r"cannot decode image .*odd\.png: MemoryError: decoder ran out"):
        read_image(image)


def test_extract_writes_the_good_images_and_names_the_bomb(tmp_path):
    source = tmp_path / "in"
    for index in range(3):
        source.mkdir(exist_ok=True)
        Image.fromarray(np.full((32, 32, 3), 60 * index, np.uint8)).save(source / f"good{index}.png")
    write_bomb_png(source / "bomb.png")
    report = extract_folder(CannyExtractor(), source, tmp_path / "out", num_workers=0, chunk_size=8, progress=False)
    assert report.written == 3  # the good images of the bomb's own chunk are written
    ((name, reason),) = report.failed
    assert name == "bomb.png" and "bomb.png" in reason
    entries = [json.loads(line)["source"] for line in (tmp_path / "out" / MANIFEST).read_text().splitlines()]
    assert sorted(entries) == ["good0.png", "good1.png", "good2.png"]


def test_training_data_skips_and_counts_a_bomb(tmp_path):
    root = write_circles(tmp_path / "data", count=6, size=32)
    write_bomb_png(root / "target" / "1.png")
    datamodule = FileDataModule(str(root), CannyExtractor(), image_size=32, val_size=1, batch_size=8)
    (batch,) = list(datamodule.train_dataloader())
    (skipped,) = batch["skipped"]
    assert "prompt.json line 2" in skipped and "1.png" in skipped
    assert len(batch["prompt"]) == 4  # 5 training items - the bomb


def test_training_with_on_error_skip_survives_a_bomb(make_train_config, tmp_path):
    from lightning_modules.commands.train import train

    root = write_circles(tmp_path / "data", count=6, size=32)
    write_bomb_png(root / "target" / "0.png")
    overrides = ["data=fill50k", f"data.root={root}", "data.image_size=32", "data.val_size=1", "data.batch_size=5"]
    _, objects = train(make_train_config(*overrides, "trainer.max_steps=2"))
    assert objects["trainer"].global_step == 2 and objects["system"].skipped_items == 2  # once per epoch


# ------------------------------------------------------------------ compositions and unit fields, before any model


@pytest.fixture
def adapter_folder(tmp_path) -> Path:
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    return folder


def _no_model(*args, **kwargs):
    raise AssertionError("a model was loaded before the composition was checked")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("units: [\n  - adapter: x\n", r"comp\.yaml is not valid YAML: .* at line \d+, column \d+"),
        ("- adapter: ADAPTER\n", r"comp\.yaml must be a mapping with 'units:' .*got list"),
        ("", r"comp\.yaml must be a mapping with 'units:' .*got an empty file"),
        ("units: {adapter: ADAPTER}\n", r"comp\.yaml must hold a list under 'units:'"),
        ("unit: []\n", r"comp\.yaml: unknown key\(s\) \['unit'\]"),
        ("units: [ADAPTER]\n", r"comp\.yaml: unit 0: a unit is a mapping"),
        (
            "units: [{adapter: ADAPTER, scale: .nan}]\n",
            r"comp\.yaml: unit 0: scale=nan; allowed: a finite number >= 0",
        ),
        ("units: [{adapter: ADAPTER, scale: -1}]\n", r"comp\.yaml: unit 0: scale=-1; allowed: a finite number >= 0"),
        ("units: [{adapter: ADAPTER, scale: abc}]\n", r"comp\.yaml: unit 0: scale='abc'; allowed: a finite number"),
        ("units: [{adapter: ADAPTER, scale: true}]\n", r"comp\.yaml: unit 0: scale=True; allowed"),
        ("units: [{adapter: ADAPTER}, {adapter: ADAPTER, start: 1.5}]\n", r"unit 1: start=1.5; allowed: a number in"),
        ("units: [{adapter: ADAPTER, start: 0.6, end: 0.4}]\n", r"unit 0: start=0.6 must be below end=0.4"),
        ("units: [{adapter: ADAPTER, mode: loud}]\n", r"unit 0: mode='loud'; choose one of: balanced, prompt"),
        ("units: [{adapter: ADAPTER, mask: /no/mask.png}]\n", r"unit 0: mask='/no/mask.png' is not an image file"),
        ("units: [{scale: 1}]\n", r"comp\.yaml: unit 0: adapter=<folder or file of adapter weights> is required"),
        ("units: [{adapter: ADAPTER, boxes: [[0.5, 0, 0.2, 1]], phrases: [a]}]\n", r"unit 0: boxes\[0\]="),
        ("units: [{adapter: ADAPTER, boxes: [[0, 0, 1, 1]], phrases: [a, b]}]\n", r"unit 0: phrases=.*a list of 1"),
        ("units: [{adapter: ADAPTER, weight: 2}]\n", r"unit 0: unknown field\(s\) \['weight'\]"),
    ],
)
def test_a_bad_composition_file_is_one_line_before_the_model_loads(
    tmp_path, adapter_folder, monkeypatch, text, message
):
    from lightning_modules.commands import generate
    from tests.lightning_modules.commands.test_generate import compose_generate

    monkeypatch.setattr(generate, "instantiate", _no_model)
    (tmp_path / "comp.yaml").write_text(text.replace("ADAPTER", str(adapter_folder)))
    cfg = compose_generate(tmp_path / "out", f"composition={tmp_path / 'comp.yaml'}")
    with pytest.raises(CtrlkitError, match=message) as raised:
        generate.run_generate(cfg)
    assert "\n" not in str(raised.value)


def test_bad_unit_fields_on_the_command_line_and_in_evaluate(tmp_path, adapter_folder, monkeypatch):
    from lightning_modules.commands import generate
    from lightning_modules.commands.evaluate import evaluation_units
    from tests.lightning_modules.commands.test_evaluate import compose_evaluate_config
    from tests.lightning_modules.commands.test_generate import compose_generate

    monkeypatch.setattr(generate, "instantiate", _no_model)
    cfg = compose_generate(tmp_path / "out", f"units=[{{adapter: {adapter_folder}, scale: nan}}]")
    with pytest.raises(CtrlkitError, match=r"^unit 0: scale=nan; allowed: a finite number >= 0$"):
        generate.run_generate(cfg)
    cfg = compose_evaluate_config(tmp_path / "eval", [f"units=[{{adapter: {adapter_folder}, end: 2}}]"])
    with pytest.raises(CtrlkitError, match=r"^unit 0: end=2; allowed: a number in \[0, 1\]$"):
        evaluation_units(cfg)


def test_a_nan_scale_is_refused_by_the_composition_itself(tiny_backbone):
    from adapters import ControlNetAdapter
    from adapters.composition import ControlUnit

    adapter = ControlNetAdapter.from_unet(tiny_backbone.unet, vae_scale_factor=4)
    with pytest.raises(ValueError, match=r"scale=nan; allowed: a finite number >= 0"):
        ControlUnit(adapter, None, scale=float("nan"))


# ------------------------------------------------------------------ the end of training is resumable work


def _run_files(run: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


def test_a_run_killed_after_its_last_checkpoint_finishes_its_end_on_resume(make_train_config, tmp_path, monkeypatch):
    import shutil

    from lightning_modules.commands.train import train
    from lightning_modules.system import AdapterTrainingSystem

    cfg = make_train_config("trainer.max_steps=2")
    _, objects = train(cfg)
    finished = Path(cfg.paths.output_dir)
    # the state a kill between last.ckpt and the rest of the end of training leaves: no export, no final grid,
    # no summary (the periodic grid of step 0 and the checkpoints stay)
    killed = tmp_path / "killed"
    shutil.copytree(finished, killed)
    shutil.rmtree(killed / "adapter")
    (killed / "controllability.json").unlink()
    (killed / "samples" / "step_000002.png").unlink()

    def no_training(*args, **kwargs):
        raise AssertionError("a training step ran after max_steps")

    monkeypatch.setattr(AdapterTrainingSystem, "training_step", no_training)
    _, resumed = train(make_train_config("trainer.max_steps=2", f"resume={killed}"))
    assert resumed["trainer"].global_step == 2
    expected, got = _run_files(finished), _run_files(killed)
    for name in ("adapter/diffusion_pytorch_model.safetensors", "adapter/config.json"):
        assert got[name] == expected[name], name  # the same export, byte for byte
    final = [json.loads(files["controllability.json"])["final"] for files in (expected, got)]
    assert final[0] == final[1] and final[0]["step"] == 2  # the same final scores
    assert "samples/step_000002.png" in got
    assert sorted(p.name for p in (killed / "checkpoints").iterdir()) == ["best.ckpt", "last.ckpt"]


def test_a_finished_run_resumed_redoes_nothing(make_train_config, monkeypatch):
    from lightning_modules.callbacks.samples import ExportAdapterCallback
    from lightning_modules.commands.train import train

    cfg = make_train_config("trainer.max_steps=1")
    train(cfg)

    def no_export(*args, **kwargs):
        raise AssertionError("the export was redone although it was there")

    monkeypatch.setattr(ExportAdapterCallback, "on_train_end", no_export)
    _, objects = train(make_train_config("trainer.max_steps=1", f"resume={cfg.paths.output_dir}"))
    assert objects["trainer"].global_step == 1


# ------------------------------------------------------------------ failed resumes, unwritable folders


def test_a_failed_resume_leaves_the_runs_config_as_it_was(make_train_config, tmp_path):
    from lightning_modules.commands.train import train

    cfg = make_train_config("trainer.max_steps=1")
    train(cfg)
    config = Path(cfg.paths.output_dir) / "config.yaml"
    before = config.read_bytes()
    wrong = make_train_config("trainer.max_steps=2", f"resume={cfg.paths.output_dir}", "adapter=t2i_adapter")
    with pytest.raises(CtrlkitError, match="checkpoint does not match this adapter"):
        train(wrong)
    assert config.read_bytes() == before


def test_an_unwritable_checkpoint_folder_rescues_the_state_and_stops_with_one_line(make_train_config, monkeypatch):
    import errno

    import torch

    from lightning_modules import checkpoints
    from lightning_modules.checkpoints import read_training_checkpoint
    from lightning_modules.commands.train import train

    cfg = make_train_config("trainer.max_steps=3", "callbacks.model_checkpoint.every_n_train_steps=2")
    run_checkpoints = Path(cfg.paths.output_dir) / "checkpoints"
    save = checkpoints._save_atomically

    def read_only_run(checkpoint, target):
        if target.parent == run_checkpoints and checkpoint["global_step"] >= 2:
            raise PermissionError(errno.EACCES, "Permission denied", str(target))
        save(checkpoint, target)

    monkeypatch.setattr(checkpoints, "_save_atomically", read_only_run)
    with pytest.raises(
        CtrlkitError,
        match=r"cannot write checkpoint .*step_000002\.ckpt \(Permission denied\); the "
        r"training state was saved to (\S+) instead: make the folder writable and continue with "
        r"ckpt_path=",
    ) as raised:
        train(cfg)
    rescued = Path(str(raised.value).rsplit("ckpt_path=", 1)[1])
    assert "\n" not in str(raised.value) and read_training_checkpoint(rescued)["global_step"] == 2
    monkeypatch.setattr(checkpoints, "_save_atomically", save)
    _, objects = train(make_train_config("trainer.max_steps=3", f"ckpt_path={rescued}"))
    assert objects["trainer"].global_step == 3
    rescued.unlink()
    assert torch.isfinite(torch.tensor(objects["trainer"].callback_metrics["train/loss"]))


def test_unwritable_folders_give_one_line(tmp_path, cli):
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    (tmp_path / "outputs").mkdir()
    for argv, message in [
        (["train", f"hydra.run.dir={a_file}/run"], f"cannot write the run folder (hydra.run.dir) {a_file}/run"),
        (["train", "hydra.run.dir=/sys/ctrlkit-run"], "cannot write the run folder (hydra.run.dir) /sys/ctrlkit-run"),
        (["extract", f"input={tmp_path / 'outputs'}", f"output={a_file}/maps"], f"cannot write output {a_file}/maps"),
        (["generate", f"output_dir={a_file}/images"], f"cannot write output_dir {a_file}/images"),
    ]:
        code, lines = cli(argv)
        assert code == 2 and len(lines) == 1 and message in lines[0], lines
        assert lines[0].startswith(f"ctrlkit {argv[0]}: error: ")


# ------------------------------------------------------------------ the smaller ones


def test_cli_user_errors_are_one_line_and_leave_no_run_folder(tmp_path, cli):
    import os

    import torch

    evil = tmp_path / "evil.ckpt"
    torch.save({"payload": os.system}, evil)
    tiny = Path(__file__).resolve().parents[2] / "lightning_modules" / "assets" / "tiny_shapes_sd"
    for argv, message in [
        (["train", "foo=1"], "unknown key 'foo'; ctrlkit's train config has: adapter, callbacks"),
        (["train", "trainer.max_steps=[1,"], "override not accepted: no viable alternative at input '[1,'"),
        (["train", "model=sd15"], "model.path is required with model=sd15: add model.path=<path>"),
        (["train", "adapter.learning_rate=abc"], "adapter.learning_rate='abc' has the wrong type"),
        (["train", "adapter.learning_rate=-1"], "adapter.learning_rate=-1 is out of range; allowed: a finite"),
        (["train", "model=sd15", f"model.path={evil}", f"model.config={tiny}"], "it is a pickle that needs to run"),
        (["generate", "foo=1"], "unknown key 'foo'; ctrlkit's generate config has"),
    ]:
        code, lines = cli([*argv, "logger=none" if argv[0] == "train" else "seed=0"])
        assert code == 2 and len(lines) == 1 and message in lines[0], lines
    runs = tmp_path / "outputs"
    assert not runs.exists() or not [p for p in runs.rglob("*") if p.is_file()]  # no run folder left behind


def test_refused_inception_weights_are_one_line_and_the_other_metrics_are_written(make_train_config, tmp_path, caplog):
    import logging
    import os

    import torch

    from lightning_modules.commands.evaluate import run_evaluate
    from lightning_modules.commands.train import train
    from tests.lightning_modules.commands.test_evaluate import compose_evaluate_config

    run = make_train_config("trainer.max_steps=1")
    train(run)
    evil = tmp_path / "weights-inception-2015-12-05-6726825d.pth"
    torch.save({"payload": os.system}, evil)
    cfg = compose_evaluate_config(
        tmp_path / "eval",
        [
            f"adapter_path={run.paths.output_dir}",
            "num_samples=2",
            "num_seeds=1",
            "sampling.num_inference_steps=2",
            f"quality.inception_weights={evil}",
        ],
    )
    with caplog.at_level(logging.WARNING):
        summary = run_evaluate(cfg)
    warnings = [r.getMessage() for r in caplog.records if "refusing to load" in r.getMessage()]
    assert len(warnings) == 1 and "\n" not in warnings[0] and str(evil) in warnings[0]
    written = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert written["adapter"]["fid"].startswith("unavailable: refusing to load")
    assert isinstance(written["adapter"]["canny_f1"], float) and written == json.loads(json.dumps(summary))
