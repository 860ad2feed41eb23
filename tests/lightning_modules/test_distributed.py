"""DDP on the CPU (gloo, 2 processes): the same training as one process with the whole batch, outputs written
once, and an exact resume after SIGKILL. Multi-process runs take a minute: `pytest -m distributed` (CI step 4)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lightning_modules.commands.train import train
from tests.conftest import FAST_OVERRIDES, compose_train_config
from tests.helpers.wandb_records import read_history
from tests.lightning_modules.test_resume import REPO, adapter_weights, assert_identical, kill_after_step

pytestmark = pytest.mark.distributed

DDP = [override for override in FAST_OVERRIDES if override != "trainer=cpu"] + [
    "trainer=ddp",
    "trainer.accelerator=cpu",
    "trainer.devices=2",
    "logger=wandb",
    "logger.wandb.mode=offline",
]
# 240 items in steps of 16 (2 processes x 8): 15 steps an epoch, so the run crosses an epoch, and the step-10
# checkpoint is mid-epoch
RUN = [
    # SGD: an update proportional to the gradient, so the comparison measures the gradients' float rounding (AdamW
    # divides near-zero gradients by their own size and turns that rounding into lr-sized steps: measured 7e-6)
    "optimizer=sgd",
    "adapter.learning_rate=0.01",
    "data.train_size=240",
    "data.val_size=4",
    "trainer.max_steps=20",
    "trainer.val_check_interval=10",
    "callbacks.model_checkpoint.every_n_train_steps=5",
    "callbacks.controllability.every_n_steps=10",
    "callbacks.sample_grid.every_n_steps=10",
]
PER_PROCESS = [*RUN, "data.batch_size=8"]


def ddp_env(tmp_path: Path) -> dict[str, str]:
    # one thread per process (2 processes on 2 cores); W&B's staging folders inside the test
    return {"OMP_NUM_THREADS": "1", "HOME": str(tmp_path), "WANDB_DATA_DIR": str(tmp_path / "wandb-data")}


# both ways a run starts: the console script the README uses (Lightning relaunches the other rank with its argv) and
# `python -m` (the device scripts')
CONSOLE_SCRIPT = [str(Path(sys.executable).parent / "ctrlkit")]
MODULE = [sys.executable, "-m", "lightning_modules.commands.cli"]


def run_ddp(
    run_dir: Path, tmp_path: Path, *overrides: str, launcher: list[str] = MODULE
) -> subprocess.CompletedProcess:
    command = [*launcher, "train", *DDP, *overrides]
    result = subprocess.run(
        [*command, f"hydra.run.dir={run_dir}"],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO), **ddp_env(tmp_path)},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory) -> tuple[Path, str]:
    """The uninterrupted 2-process run, started by the console script: (its folder, what it printed)."""
    home = tmp_path_factory.mktemp("ddp")
    result = run_ddp(home / "run", home, *PER_PROCESS, launcher=CONSOLE_SCRIPT)
    return home / "run", result.stdout + result.stderr


def flat(weights: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([tensor.flatten().double() for _, tensor in sorted(weights.items())])


def test_two_processes_of_8_train_as_one_process_of_16(ddp_run, tmp_path):
    run, _ = ddp_run
    single = tmp_path / "single"
    _, objects = train(compose_train_config(single, [*RUN, "data.batch_size=16"]))
    assert objects["trainer"].global_step == 20
    two, one = (
        flat(adapter_weights(run / "checkpoints" / "last.ckpt")),
        flat(adapter_weights(single / "checkpoints" / "last.ckpt")),
    )
    # the same items in every step and the same per-item draws (system.draws=item): only float rounding differs
    # (the mean of two 8-item gradient means vs one 16-item mean)
    difference = ((two - one).norm() / one.norm()).item()
    five_steps = flat(adapter_weights(single / "checkpoints" / "step_000015.ckpt"))
    progress = ((one - five_steps).norm() / one.norm()).item()  # what 5 steps of training move: the scale of a miss
    print(f"DDP 2x8 vs 1x16 after 20 steps: relative difference {difference:.2e} (5 steps move {progress:.2e})")
    assert difference <= 1e-6
    assert progress > 1e-4


def test_a_ddp_run_writes_its_outputs_once(ddp_run):
    run, output = ddp_run
    assert "Starting with 2 processes" in output
    checkpoints = sorted(path.name for path in (run / "checkpoints").iterdir())
    # keep_last=3 periodic checkpoints + last + best, once: no per-rank copies, no temporary files left
    assert checkpoints == ["best.ckpt", "last.ckpt", "step_000010.ckpt", "step_000015.ckpt", "step_000020.ckpt"]
    assert sorted(path.name for path in (run / "samples").iterdir()) == [
        "step_000000.png",
        "step_000010.png",
        "step_000020.png",
    ]
    assert {"README.md", "samples.png", "config.json"} <= {path.name for path in (run / "adapter").iterdir()}
    assert not [path for path in run.rglob("*.tmp-*")]
    (wandb_run,) = (run / "wandb").glob("offline-run-*")
    history = read_history(wandb_run)
    assert history["trainer/global_step"].count(20) >= 1
    # validation at steps 10 and 20 from one process: each logged once
    assert len(history["val/loss"]) == 2
    assert len(history["val/canny_f1"]) == 3  # steps 0, 10, 20
    assert output.count("ctrlkit train: 20 steps") == 1  # the summary from rank zero only
    assert "[rank 1]" in (run / "train_ddp_process_1.log").read_text()
    assert "[rank 0]" in (run / "train.log").read_text()


def test_a_killed_ddp_run_resumes_to_identical_weights(ddp_run, tmp_path):
    run, _ = ddp_run
    killed = tmp_path / "killed"
    kill_after_step(
        killed, tmp_path / "reached", PER_PROCESS, step=12, checkpoint_step=10, fast=DDP, env=ddp_env(tmp_path)
    )
    resumed = run_ddp(killed, tmp_path, *PER_PROCESS, "resume=auto")
    assert (resumed.stdout + resumed.stderr).count("resuming from") == 1  # said by rank zero only
    assert_identical(
        adapter_weights(run / "checkpoints" / "last.ckpt"), adapter_weights(killed / "checkpoints" / "last.ckpt")
    )
