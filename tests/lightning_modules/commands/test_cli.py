"""The ``ctrlkit`` command as a user runs it: one-line errors, and a Hydra sweep with one directory per job."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import FAST_OVERRIDES
from tests.helpers.cli import the_error_line

CTRLKIT = [sys.executable, "-m", "lightning_modules.commands.entry"]  # what the console script runs


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


def test_help_and_an_unknown_command_answer_without_importing_the_training_stack():
    """The console script (``entry``) answers these before torch is imported; every command it names runs."""
    from lightning_modules.commands import cli, entry

    assert list(entry.CONFIG_NAMES) == list(cli.COMMANDS)
    check = (
        "import sys\nfrom lightning_modules.commands.entry import main\n"
        "assert main(['--help']) == 0 and main(['trian']) == 2\n"
        "print(sorted(name for name in ('torch', 'lightning', 'hydra', 'diffusers') if name in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "[]"
    script = f"{sys.executable} -m lightning_modules.commands.entry --help | head -1"  # the reader leaves early
    piped = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=60)
    assert piped.stdout.startswith("usage: ctrlkit") and piped.stderr == "", piped.stderr[-2000:]


def test_the_help_names_files_that_exist():
    import re

    from lightning_modules.commands.entry import USAGE

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
def test_bad_input_gives_one_line_error(cli, args, message):
    """In this process (the test below runs the real command)."""
    assert message in the_error_line("train", *cli(["train", *args, "logger=none"]))


def test_bad_input_from_the_command_line_is_one_line(tmp_path):
    result = run_ctrlkit("train", "model=sd15", "model.path=/no/such/pipeline", "logger=none", cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    (line,) = error_lines(result)
    assert "model path /no/such/pipeline does not exist" in line


def test_wrong_checkpoint_format_from_the_cli(cli, tmp_path):
    """In this process, as the command runs it (the test above starts the real console command)."""
    (tmp_path / "weights.ckpt").write_bytes(os.urandom(256))
    refused = cli(["train", f"ckpt_path={tmp_path / 'weights.ckpt'}", "logger=none"])
    assert "is not a ctrlkit training checkpoint" in the_error_line("train", *refused)


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
