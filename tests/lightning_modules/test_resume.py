"""Training that survives: a run SIGKILLed after a checkpoint resumes to bit-identical adapter weights; a truncated
newest checkpoint is reported and resume falls back to the one before; checkpoints are written atomically."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lightning_modules.checkpoints import AtomicCheckpointIO, find_resume_checkpoint
from lightning_modules.commands.train import train
from lightning_modules.errors import CtrlkitError
from tests.conftest import FAST_OVERRIDES, compose_train_config

REPO = Path(__file__).resolve().parents[2]
# 6 steps over 4-batch epochs (so the run crosses an epoch and meets cached latents again), a checkpoint, a
# validation and a controllability score every 2 steps.
RUN = [
    "trainer.max_steps=6",
    "data.train_size=8",
    "trainer.val_check_interval=2",
    "callbacks.model_checkpoint.every_n_train_steps=2",
    "callbacks.controllability.every_n_steps=2",
    "callbacks.sample_grid.every_n_steps=0",
]


def adapter_weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    return torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]


def assert_identical(expected: dict, actual: dict) -> None:
    assert expected.keys() == actual.keys()
    for name, tensor in expected.items():
        assert torch.equal(tensor, actual[name]), name


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    """The run directory of the 6-step run that nobody interrupted."""
    run = tmp_path_factory.mktemp("uninterrupted") / "run"
    train(compose_train_config(run, RUN))
    return run


def kill_after_step(
    killed: Path,
    marker: Path,
    run: list[str],
    step: int = 3,
    checkpoint_step: int = 2,
    fast: list[str] | None = None,
    env: dict[str, str] | None = None,
) -> None:
    """Run ``ctrlkit train`` with ``run`` in a subprocess and SIGKILL it -- with every process it started (DDP) --
    after its training step ``step``, when its newest checkpoint is the one of ``checkpoint_step``."""
    # same thread count as this process: CPU kernels round the same way
    # (tests/helpers on the path itself: an unrelated site-packages `tests` package can shadow ours)
    helpers = REPO / "tests" / "helpers"
    env = {
        **os.environ,
        "PYTHONPATH": f"{REPO}{os.pathsep}{helpers}",
        "OMP_NUM_THREADS": str(torch.get_num_threads()),
        **(env or {}),
    }
    command = [
        sys.executable,
        "-m",
        "lightning_modules.commands.cli",
        "train",
        *(FAST_OVERRIDES if fast is None else fast),
        *run,
        f"hydra.run.dir={killed}",
    ]
    # from `step` on, each step pauses: the kill lands after the checkpoint, with the steps after it done and lost
    command += [
        "+callbacks.pause._target_=slow_steps.SleepFromStep",
        f"+callbacks.pause.step={step}",
        "+callbacks.pause.seconds=60",
        f"+callbacks.pause.marker={marker}",
    ]
    process = subprocess.Popen(
        command, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 180
        while not marker.exists():
            assert process.poll() is None, process.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, f"the training subprocess never reached step {step}"
            time.sleep(0.2)
    finally:
        os.killpg(process.pid, signal.SIGKILL)  # the launcher and the processes it started (its session)
        process.wait()
    assert process.returncode == -signal.SIGKILL
    assert marker.read_text() == str(step)
    assert torch.load(killed / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == checkpoint_step


def kill_after_step_3(killed: Path, marker: Path, run: list[str]) -> None:
    """``kill_after_step`` at step 3, with the checkpoint of step 2."""
    kill_after_step(killed, marker, run)


def straight_and_resumed(tmp_path: Path, run: list[str]) -> tuple[Path, Path, int]:
    """``run`` trained straight through, and again SIGKILLed after step 3 and resumed (``resume=auto``): the two
    run directories and the resumed run's final global step."""
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    train(compose_train_config(straight, run))
    kill_after_step_3(killed, tmp_path / "reached", run)
    _, objects = train(compose_train_config(killed, [*run, "resume=auto"]))
    return straight, killed, objects["trainer"].global_step


def test_killed_run_resumes_to_identical_weights(uninterrupted, tmp_path):
    killed = tmp_path / "killed"
    kill_after_step_3(killed, tmp_path / "reached", RUN)

    _, objects = train(compose_train_config(killed, [*RUN, "resume=auto"]))
    assert objects["trainer"].global_step == 6
    assert_identical(
        adapter_weights(uninterrupted / "checkpoints" / "last.ckpt"),
        adapter_weights(killed / "checkpoints" / "last.ckpt"),
    )


def test_truncated_newest_checkpoint_is_reported_and_the_previous_one_used(uninterrupted, tmp_path, caplog):
    run = tmp_path / "run"
    shutil.copytree(uninterrupted, run)  # copy2 keeps the files' times: the newest stays the newest
    for name in ("last.ckpt", "step_000006.ckpt"):  # both hold step 6: the newest checkpoint
        path = run / "checkpoints" / name
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    assert find_resume_checkpoint(run) == run / "checkpoints" / "step_000004.ckpt"
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        _, objects = train(compose_train_config(run, [*RUN, "resume=auto"]))
    assert "skipping unreadable checkpoint" in caplog.text and "step_000006.ckpt" in caplog.text
    assert objects["trainer"].global_step == 6  # steps 5 and 6 trained again, from the step-4 checkpoint
    # step 4 ended an epoch: the resumed run starts the next epoch with the same order
    assert_identical(
        adapter_weights(uninterrupted / "checkpoints" / "last.ckpt"),
        adapter_weights(run / "checkpoints" / "last.ckpt"),
    )


def test_checkpoints_keep_the_last_k_and_the_best(uninterrupted):
    names = sorted(path.name for path in (uninterrupted / "checkpoints").glob("*.ckpt"))
    assert names == ["best.ckpt", "last.ckpt", "step_000002.ckpt", "step_000004.ckpt", "step_000006.ckpt"]
    best = torch.load(uninterrupted / "checkpoints" / "best.ckpt", weights_only=True)
    state = next(value for key, value in best["callbacks"].items() if key.startswith("AdapterCheckpoint"))
    curve = next(value for key, value in best["callbacks"].items() if "Controllability" in key)["curve"]
    # best_metric auto: the condition's own score (canny_f1 for the default canny condition), not mask_iou
    assert state["best_key"] == "val/canny_f1"
    assert state["best_score"] == max(point["canny_f1"] for point in curve[: len(curve)])
    assert best["global_step"] == state["best_step"]


def test_keep_last_removes_older_periodic_checkpoints(make_train_config):
    cfg = make_train_config(
        "trainer.max_steps=4",
        "callbacks.model_checkpoint.every_n_train_steps=1",
        "callbacks.model_checkpoint.keep_last=2",
        "callbacks.model_checkpoint.best_metric=null",
    )
    train(cfg)
    names = sorted(path.name for path in (Path(cfg.paths.output_dir) / "checkpoints").glob("*.ckpt"))
    assert names == ["last.ckpt", "step_000003.ckpt", "step_000004.ckpt"]


def test_a_checkpoint_due_on_an_epochs_last_step_is_written(make_train_config):
    # 12 items in batches of 2: 6 steps an epoch; validation every 4 steps, so none follows the epoch's end (where
    # Lightning would defer the save to, and lose it)
    cfg = make_train_config(
        "trainer.max_steps=8",
        "data.train_size=12",
        "trainer.val_check_interval=4",
        "callbacks.model_checkpoint.every_n_train_steps=3",
        "callbacks.model_checkpoint.keep_last=-1",
        "callbacks.model_checkpoint.best_metric=null",
        "callbacks.controllability.every_n_steps=0",
        "callbacks.sample_grid.every_n_steps=0",
    )
    train(cfg)
    names = sorted(path.name for path in (Path(cfg.paths.output_dir) / "checkpoints").glob("*.ckpt"))
    assert names == ["last.ckpt", "step_000003.ckpt", "step_000006.ckpt"]


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    target = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"step": torch.tensor(1)}, target)

    def killed_mid_write(obj, file, *args, **kwargs):
        file.write(b"PK\x03\x04 half a checkpoint")
        raise KeyboardInterrupt  # the job dies while writing

    monkeypatch.setattr(torch, "save", killed_mid_write)
    with pytest.raises(KeyboardInterrupt):
        AtomicCheckpointIO().save_checkpoint({"step": torch.tensor(2)}, target)
    assert torch.load(target, weights_only=True)["step"] == 1  # the old checkpoint, whole
    assert [path.name for path in tmp_path.iterdir()] == ["last.ckpt"]  # no temporary file left behind


def test_resume_errors_are_one_line(make_train_config, tmp_path):
    with pytest.raises(CtrlkitError, match="resume=.*nowhere: no such run directory"):
        train(make_train_config(f"resume={tmp_path / 'nowhere'}"))
    (tmp_path / "empty" / "checkpoints").mkdir(parents=True)
    with pytest.raises(CtrlkitError, match="holds no checkpoint"):
        train(make_train_config(f"resume={tmp_path / 'empty'}"))
    (tmp_path / "broken" / "checkpoints").mkdir(parents=True)
    (tmp_path / "broken" / "checkpoints" / "last.ckpt").write_bytes(b"\x00")
    with pytest.raises(CtrlkitError, match="no checkpoint in .*broken/checkpoints can be read"):
        train(make_train_config(f"resume={tmp_path / 'broken'}"))


def test_best_checkpoint_follows_the_condition_score_and_its_direction(tmp_path):
    from types import SimpleNamespace

    from lightning_modules.callbacks.checkpoint import AdapterCheckpoint

    def scores(checkpoint, reports) -> list[int]:
        saved = []
        trainer = SimpleNamespace(sanity_checking=False, global_step=0, is_global_zero=True)
        trainer.save_checkpoint = lambda path, weights_only: saved.append(trainer.global_step)
        for step, (key, score, primary, higher_is_better) in enumerate(reports):
            trainer.global_step = step
            checkpoint.consider_best(trainer, key, score, primary=primary, higher_is_better=higher_is_better)
        return saved

    reports = [
        ("val/mask_iou", 0.9, False, True),
        ("val/depth_rmse", 10.0, True, False),  # the condition's score, lower is better
        ("val/depth_rmse", 12.0, True, False),
        ("val/mask_iou", 0.95, False, True),
        ("val/depth_rmse", 8.0, True, False),
    ]
    auto = AdapterCheckpoint(dirpath=str(tmp_path / "a"), best_metric="auto")
    assert scores(auto, reports) == [1, 4] and auto.best_key == "val/depth_rmse" and auto.best_score == 8.0
    named = AdapterCheckpoint(dirpath=str(tmp_path / "b"), best_metric="val/mask_iou", best_mode="max")
    assert scores(named, reports) == [0, 3] and named.best_key == "val/mask_iou"
    assert scores(AdapterCheckpoint(dirpath=str(tmp_path / "c"), best_metric=None), reports) == []


def test_a_new_run_from_a_checkpoint_trains_at_the_configured_learning_rate(make_train_config, tmp_path, caplog):
    """ckpt_path=<run> with another adapter.learning_rate (fine-tuning lower): the config's rate, not the one the
    checkpoint's optimizer was saved with; the same config resumes with its rate untouched."""
    first = make_train_config("trainer.max_steps=2", "adapter.learning_rate=1e-3")
    train(first)
    checkpoint = Path(first.paths.output_dir) / "checkpoints" / "last.ckpt"
    for rate, expected in (("1e-4", 1e-4), ("1e-3", 1e-3)):
        cfg = compose_train_config(
            tmp_path / f"finetune_{rate}",
            ["trainer.max_steps=3", f"adapter.learning_rate={rate}", f"ckpt_path={checkpoint}"],
        )
        with caplog.at_level(logging.WARNING):
            _, objects = train(cfg)
        assert objects["trainer"].global_step == 3
        assert objects["trainer"].optimizers[0].param_groups[0]["lr"] == pytest.approx(expected)
        said = "learning rates from the config ['0.0001'], not the checkpoint's ['0.001']" in caplog.text
        assert said == (rate == "1e-4")
        caplog.clear()


def test_configured_rates_keep_the_schedule_position():
    from diffusers.optimization import get_constant_schedule_with_warmup

    from lightning_modules.checkpoints import apply_configured_learning_rates

    def optimizer_and_schedule(rate: float):
        optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=rate)
        return optimizer, get_constant_schedule_with_warmup(optimizer, num_warmup_steps=10)

    optimizer, schedule = optimizer_and_schedule(1e-3)
    for _ in range(4):
        optimizer.step()
        schedule.step()
    checkpoint = {"optimizer_states": [optimizer.state_dict()], "lr_schedulers": [schedule.state_dict()]}
    assert apply_configured_learning_rates(checkpoint, [1e-4])
    resumed, resumed_schedule = optimizer_and_schedule(1e-4)
    resumed.load_state_dict(checkpoint["optimizer_states"][0])
    resumed_schedule.load_state_dict(checkpoint["lr_schedulers"][0])
    assert resumed.param_groups[0]["lr"] == pytest.approx(1e-4 * 4 / 10)  # step 4 of a 10-step warm-up, at 1e-4
    for _ in range(8):
        resumed.step()
        resumed_schedule.step()
    assert resumed.param_groups[0]["lr"] == pytest.approx(1e-4)
    assert not apply_configured_learning_rates(checkpoint, [1e-4])  # already at the configured rate


@pytest.mark.slow
def test_a_killed_control_lora_run_resumes_to_identical_weights_from_checkpoints_without_its_frozen_copy(tmp_path):
    """Control-LoRA's checkpoints leave out the frozen copy (the build makes it again from the base): a killed run
    still resumes bit for bit, the exported file included."""
    straight, killed, global_step = straight_and_resumed(tmp_path, [*RUN, "adapter=control_lora"])
    assert global_step == 6
    assert_identical(
        adapter_weights(straight / "checkpoints" / "last.ckpt"), adapter_weights(killed / "checkpoints" / "last.ckpt")
    )
    exported = [load_file(run_dir / "adapter" / "control_lora.safetensors") for run_dir in (straight, killed)]
    assert_identical(*exported)
