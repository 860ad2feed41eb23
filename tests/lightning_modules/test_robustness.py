"""Bad data is skipped and counted (or stops the run), a NaN loss skips its step (N in a row stop the run, the last
good checkpoint stays), bad configs fail before any model loads, and pickles that run code are refused."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
import torch

from conditions import CannyExtractor, UnsafeWeightsError, load_state_dict_file
from conditions.circles import write_circles
from lightning_modules.commands.config_checks import check_train_config
from lightning_modules.commands.train import check_checkpoint, train
from lightning_modules.data.files import FileDataModule
from lightning_modules.data.shapes import ShapesDataModule, ShapesDataset
from lightning_modules.errors import BadDataError, CtrlkitError, NonFiniteLossError
from lightning_modules.system import AdapterTrainingSystem

# ------------------------------------------------------------------ bad data


def fill50k_with_bad_items(root: Path) -> Path:
    """6 circles; line 2's image unreadable, line 3's image missing, line 4's caption empty."""
    write_circles(root, count=6, size=32)
    (root / "target" / "1.png").write_bytes(b"\x89PNG not really")
    lines = (root / "prompt.json").read_text().splitlines()
    lines[2] = lines[2].replace("target/2.png", "target/missing.png")
    lines[3] = lines[3].replace(lines[3].split('"prompt": ')[1], '"  "}')
    (root / "prompt.json").write_text("\n".join(lines) + "\n")
    return root


def test_bad_items_are_reported_skipped_and_counted(tmp_path, caplog):
    root = fill50k_with_bad_items(tmp_path / "data")
    with caplog.at_level(logging.WARNING):
        datamodule = FileDataModule(str(root), CannyExtractor(), image_size=32, val_size=1, batch_size=4)
    # index time: the missing file and the empty caption, named by file and line
    assert datamodule.skipped_lines == 2
    assert "prompt.json line 3: file not found" in caplog.text and "prompt.json line 4: empty caption" in caplog.text
    # load time: the unreadable image is left out of its batch and named
    batches = list(datamodule.train_dataloader())
    skipped = [message for batch in batches for message in batch["skipped"]]
    assert len(skipped) == 1 and "line 2" in skipped[0] and "1.png" in skipped[0]
    assert sum(len(batch["prompt"]) for batch in batches if "prompt" in batch) == 2  # 3 train items - 1 bad


@pytest.mark.parametrize("bad", ["unreadable", "missing", "empty caption"])
def test_bad_item_stops_the_run_with_on_error_raise(tmp_path, bad):
    root = write_circles(tmp_path / "data", count=4, size=32)
    if bad == "unreadable":
        (root / "target" / "0.png").write_bytes(b"\x00garbage")
        datamodule = FileDataModule(str(root), CannyExtractor(), image_size=32, val_size=1, on_error="raise")
        with pytest.raises(BadDataError, match=r"prompt\.json line 1: cannot decode image .*0\.png"):
            datamodule.train_dataloader().dataset[0]
        return
    if bad == "missing":
        (root / "target" / "0.png").unlink()
        match = r"prompt\.json line 1: file not found: .*0\.png"
    else:
        text = (root / "prompt.json").read_text().splitlines()
        text[0] = text[0].replace(text[0].split('"prompt": ')[1], '""}')
        (root / "prompt.json").write_text("\n".join(text) + "\n")
        match = r"prompt\.json line 1: empty caption"
    with pytest.raises(BadDataError, match=match):
        FileDataModule(str(root), CannyExtractor(), image_size=32, val_size=1, on_error="raise")


def test_training_counts_and_logs_skipped_items(make_train_config, tmp_path, monkeypatch):
    scene = ShapesDataset.scene

    def scene_with_empty_captions(self, index):
        drawn = scene(self, index)
        return drawn if index % 4 else type(drawn)(**{**vars(drawn), "caption": ""})

    monkeypatch.setattr(ShapesDataset, "scene", scene_with_empty_captions)
    cfg = make_train_config("trainer.max_steps=3", "data.train_size=8", "logger=csv", "trainer.log_every_n_steps=1")
    _, objects = train(cfg)
    system = objects["system"]
    assert system.skipped_items >= 1 and objects["trainer"].global_step == 3
    logged = (Path(cfg.paths.output_dir) / "csv" / "version_0" / "metrics.csv").read_text()
    assert "train/skipped_items" in logged
    monkeypatch.setattr(ShapesDataset, "scene", scene_with_empty_captions)
    with pytest.raises(BadDataError, match=r"shapes scene \d+ \(seed \d+\): empty caption"):
        train(make_train_config("trainer.max_steps=3", "data.train_size=8", "data.on_error=raise"))


def test_shapes_fixed_batch_skips_bad_validation_items(monkeypatch):
    datamodule = ShapesDataModule(CannyExtractor(), val_size=4)
    scene = ShapesDataset.scene
    monkeypatch.setattr(
        ShapesDataset,
        "scene",
        lambda self, i: type(s := scene(self, i))(**{**vars(s), "caption": "" if i == 0 else s.caption}),
    )
    batch = datamodule.fixed_batch(2)
    assert len(batch["prompt"]) == 2 and all(batch["prompt"])


# ------------------------------------------------------------------ non-finite loss


def nan_loss_at(steps: set[int] | None):
    """A compute_loss that returns NaN for the training steps in ``steps`` (None: always)."""
    original = AdapterTrainingSystem.compute_loss

    def compute_loss(self, batch, *args, **kwargs):
        loss = original(self, batch, *args, **kwargs)
        if self.training and (steps is None or self.global_step + 1 in steps):
            return loss * float("nan")
        return loss

    return compute_loss


def test_nan_step_is_skipped_and_counted(make_train_config, monkeypatch):
    monkeypatch.setattr(AdapterTrainingSystem, "compute_loss", nan_loss_at({2}))
    _, objects = train(make_train_config("trainer.max_steps=3"))
    system = objects["system"]
    assert system.nonfinite_steps == 1 and system.nonfinite_in_a_row == 0
    # the NaN batch counts as step 2 but changes no weight (no gradient reaches the optimizer)
    assert objects["trainer"].global_step == 3
    assert all(torch.isfinite(p).all() for p in objects["adapter"].parameters())


def test_nan_steps_in_a_row_stop_the_run_and_keep_the_last_checkpoint(make_train_config, monkeypatch):
    monkeypatch.setattr(AdapterTrainingSystem, "compute_loss", nan_loss_at({3, 4, 5, 6}))
    cfg = make_train_config(
        "trainer.max_steps=6", "callbacks.model_checkpoint.every_n_train_steps=2", "system.max_nonfinite_steps=3"
    )
    with pytest.raises(NonFiniteLossError, match=r"for 3 steps in a row, the last at step 5 .*max_nonfinite_steps=3"):
        train(cfg)
    checkpoints = Path(cfg.paths.output_dir) / "checkpoints"
    last = torch.load(checkpoints / "last.ckpt", weights_only=True)["state_dict"]
    good = torch.load(checkpoints / "step_000002.ckpt", weights_only=True)["state_dict"]
    # the checkpoint after the skipped steps 3 and 4 holds the step-2 weights: skipped steps changed nothing
    assert all(torch.isfinite(t).all() and torch.equal(t, good[name]) for name, t in last.items())
    assert not (Path(cfg.paths.output_dir) / "adapter").exists()  # no export of a failed run


# ------------------------------------------------------------------ bad configs, before any model loads


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("+system.learning_rat=1e-4", r"unknown key 'system.learning_rat'; system takes: .*learning_rate"),
        ("+data.colour=red", r"unknown key 'data.colour'; data takes: .*batch_size"),
        ("data.batch_size=two", r"data.batch_size='two' has the wrong type; allowed: int"),
        ("system.cache_latents=maybe", r"system.cache_latents='maybe' has the wrong type; allowed: bool"),
        (
            "adapter.condition_dropout.text=1.5",
            r"adapter.condition_dropout.text=1.5 is a probability; allowed: a number in \[0, 1\]",
        ),
        ("adapter.condition_dropout.both=-0.1", r"adapter.condition_dropout.both=-0.1 is a probability"),
        ("data.batch_size=0", r"data.batch_size=0 must be >= 1; allowed: an integer >= 1"),
        ("data.image_size=72", r"data.image_size=72 must be a positive multiple of 16 .*VAE factor 4.*e.g. (64|80)"),
        ("adapter.build.conditioning_channels=1", r"conditioning_channels=1 does not match condition.channels=3"),
        ("condition.extractor.channels=1", r"condition.extractor.channels=1 does not match condition.channels=3"),
        ("data.on_error=ignore", r"data.on_error='ignore'; choose one of: skip, raise"),
        ("system.max_nonfinite_steps=0", r"system.max_nonfinite_steps=0 must be >= 1"),
        ("data.num_objects=[3,1]", r"data.num_objects=\[3, 1\]; allowed: a count >= 1, or an inclusive range"),
        ("data.num_objects=0", r"data.num_objects=0; allowed: a count >= 1"),
        ("trainer.accumulate_grad_batches=0", r"trainer.accumulate_grad_batches=0; allowed: an integer >= 1"),
        ("trainer.val_check_interval=0", r"trainer.val_check_interval=0; allowed: a step count >= 1, or a fraction"),
        ("data.num_objects=[1,2,3]", r"data.num_objects=\[1, 2, 3\]; allowed: .*\[low, high\]"),
    ],
)
def test_bad_config_fails_before_any_model_loads(make_train_config, monkeypatch, override, message):
    import lightning_modules.backbone as backbone

    def must_not_load(*args, **kwargs):
        raise AssertionError("a model was loaded before the config was checked")

    monkeypatch.setattr(backbone, "load_pretrained_backbone", must_not_load)
    monkeypatch.setattr(backbone, "build_tiny_backbone", must_not_load)
    cfg = make_train_config(override)
    with pytest.raises(CtrlkitError, match=message) as error:
        check_train_config(cfg)
    assert "\n" not in str(error.value)
    with pytest.raises(CtrlkitError, match=message):
        train(cfg)


def test_an_unknown_condition_source_of_file_data_fails_before_any_model_loads(make_train_config, monkeypatch):
    import lightning_modules.backbone as backbone

    monkeypatch.setattr(backbone, "build_tiny_backbone", lambda *args, **kwargs: pytest.fail("a model was loaded"))
    cfg = make_train_config("data=imagefolder", "data.root=/nowhere", "data.conditions=cache")
    with pytest.raises(CtrlkitError, match="unknown data.conditions 'cache'; choose one of: files, extractor"):
        train(cfg)


def test_good_configs_pass_the_checks(make_train_config):
    for overrides in ([], ["model=tiny_random"], ["condition=hed", "condition.extractor.weights_dir=/x"]):
        check_train_config(make_train_config(*overrides))
    check_train_config(make_train_config("experiment=gligen_boxes_shapes", "data.num_objects=[1,30]"))


def test_more_objects_than_grounding_slots_fails_before_any_model_loads(make_train_config):
    cfg = make_train_config("experiment=gligen_boxes_shapes", "data.num_objects=[1,31]")
    with pytest.raises(CtrlkitError, match=r"data.num_objects=31 objects but condition.extractor.max_boxes=30"):
        check_train_config(cfg)


def test_cli_names_an_unknown_override_key(cli):
    from tests.helpers.cli import the_error_line

    line = the_error_line("train", *cli(["train", "system.learnng_rate=1"]))
    assert line.startswith("ctrlkit train: error: unknown key 'system.learnng_rate'; system takes: ")


# ------------------------------------------------------------------ safe loading


class RunsCode:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_pickle_that_runs_code_is_refused_with_the_reason(tmp_path):
    torch.save({"weight": torch.zeros(1), "payload": RunsCode()}, tmp_path / "evil.pth")
    with pytest.raises(UnsafeWeightsError, match=r"refusing to load .*evil\.pth: .*needs to run code.*system"):
        load_state_dict_file(tmp_path / "evil.pth")
    torch.save({"state_dict": {}, "pytorch-lightning_version": "2", "x": RunsCode()}, tmp_path / "evil.ckpt")
    with pytest.raises(UnsafeWeightsError, match="refusing to load"):
        check_checkpoint(str(tmp_path / "evil.ckpt"))


def test_plain_pickles_and_safetensors_load(tmp_path):
    from safetensors.torch import save_file

    torch.save({"weight": torch.ones(2)}, tmp_path / "plain.pth")
    save_file({"weight": torch.ones(2)}, tmp_path / "w.safetensors")
    for name in ("plain.pth", "w.safetensors"):
        assert torch.equal(load_state_dict_file(tmp_path / name)["weight"], torch.ones(2))


def test_no_trust_remote_code_anywhere():
    root = Path(__file__).resolve().parents[2]
    sources = [p for folder in ("adapters", "conditions", "lightning_modules") for p in (root / folder).rglob("*.py")]
    assert sources and not [p for p in sources if "trust_remote_code" in p.read_text()]
