"""The ``ctrlkit`` command as a user runs it: one-line errors, and a Hydra sweep with one directory per job."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import FAST_OVERRIDES

CTRLKIT = [sys.executable, "-m", "lightning_modules.commands.cli"]


def run_ctrlkit(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", "CTRLKIT_OUTPUTS": str(cwd / "outputs")}
    return subprocess.run(
        [*CTRLKIT, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL
    )


def error_lines(result: subprocess.CompletedProcess) -> list[str]:
    return [line for line in result.stderr.splitlines() if "error" in line.lower()]


def test_help_and_unknown_command(tmp_path):
    assert run_ctrlkit("--help", cwd=tmp_path).returncode == 0
    result = run_ctrlkit("trian", cwd=tmp_path)
    assert result.returncode == 2 and "unknown command 'trian'; choose one of: train" in result.stderr


def test_the_help_names_files_that_exist():
    import re

    from lightning_modules.commands.cli import USAGE

    repo = Path(__file__).resolve().parents[3]
    named = re.findall(r"examples/[\w./-]+", USAGE)
    assert named and all((repo / path).is_file() for path in named), named


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["adapter=contrlnet"], "unknown adapter 'contrlnet'; choose one of: control_lora, controlnet"),
        (["condition=dept"], "unknown condition 'dept'; choose one of: boxes, canny"),
        (["model=sd99"], "unknown model 'sd99'; choose one of: sd15, sd15_random, sd2, sdxl, tiny, tiny_random"),
        (["model=sd15", "model.path=/no/such/pipeline"], "model path /no/such/pipeline does not exist"),
        (["model=sd15"], "model.path is required"),
    ],
)
def test_bad_input_gives_one_line_error(tmp_path, args, message):
    result = run_ctrlkit("train", *args, "logger=none", cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    (line,) = error_lines(result)
    assert message in line


def test_wrong_checkpoint_format_from_the_cli(tmp_path):
    (tmp_path / "weights.ckpt").write_bytes(os.urandom(256))
    result = run_ctrlkit("train", f"ckpt_path={tmp_path / 'weights.ckpt'}", "logger=none", cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    (line,) = error_lines(result)
    assert "is not a ctrlkit training checkpoint" in line


def test_sweep_runs_one_directory_per_job(tmp_path):
    result = run_ctrlkit(
        "train", "-m", "adapter.learning_rate=1e-4,1e-5", "trainer.max_steps=1", *FAST_OVERRIDES, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (sweep,) = (tmp_path / "outputs" / "train" / "multiruns").iterdir()
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert [p.name for p in jobs] == ["0", "1"]
    rates = [
        torch.load(job / "checkpoints" / "last.ckpt", weights_only=True)["hyper_parameters"]["learning_rate"]
        for job in jobs
    ]
    assert rates == [1e-4, 1e-5]
    assert all((job / "adapter" / "config.json").is_file() for job in jobs)
