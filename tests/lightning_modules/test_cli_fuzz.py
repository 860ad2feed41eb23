"""Fuzzing ``ctrlkit`` overrides: random keys (the configs' own and made-up ones), values and types for train,
generate, evaluate and extract. Every run must end in success or in one line ``ctrlkit <command>: error: ...``
with exit code 2 -- never a traceback, never Hydra's multi-line report.

Runs are in this process through ``lightning_modules.commands.cli.main`` with settings that keep a successful job to
seconds (1 training step, 2 sampling steps, 2 images). Keys whose valid values cost minutes (step counts, image
sizes, sample counts) keep their cheap base value, and integers stay small, so a lucky draw cannot run for long.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from omegaconf import DictConfig
from PIL import Image

from lightning_modules.commands.cli import CONFIG_NAMES
from lightning_modules.commands.config_checks import CONF_DIR, _compose
from tests.conftest import FAST_OVERRIDES
from tests.helpers.cli import run_cli

# keys whose valid values make a job long, or that point the run somewhere else (left at the base values)
COSTLY = (
    "max_steps",
    "max_epochs",
    "train_size",
    "val_size",
    "num_samples",
    "num_seeds",
    "num_inference_steps",
    "image_size",
    "height",
    "width",
    "batch_size",
    "cache_limit",
    "chunk_size",
    "num_workers",
    "every_n",
    "val_check_interval",
    "limit_",
    "output_dir",
    "paths.",
    "hydra",
    "input",
    "output",
    "adapter_path",
    "inception_weights",
    "clip_model",
    "box_detector",
    "resume",
    "ckpt_path",
    "model.",
    "prompts",
    "accumulate",
)
COUNTER = itertools.count()


def leaf_keys(config_name: str) -> list[str]:
    cfg = _compose(config_name, [], CONF_DIR)
    keys = []

    def walk(node, prefix: str) -> None:
        for key in node.keys() if isinstance(node, DictConfig) else []:
            path = f"{prefix}{key}"
            child = node._get_node(key)
            if isinstance(child, DictConfig):
                walk(child, f"{path}.")
            elif not any(costly in path for costly in COSTLY) and not str(key).startswith("_"):
                keys.append(path)

    walk(cfg, "")
    return sorted(keys)


values = st.one_of(
    st.text(alphabet="abcxyz019_-./", min_size=0, max_size=6),
    st.integers(-3, 12).map(str),
    st.sampled_from(["nan", "inf", "-inf", "-1.5", "0.0", "0.5", "1e9", "true", "false", "null", "[]", "[1,2]"]),
    st.sampled_from(["{a: 1}", "'quoted'", "[a,[b]]", "1,2", "${oops}", "[", "=", "??"]),
)


@pytest.fixture(scope="module")
def fuzz_inputs(tmp_path_factory):
    """A trained run for evaluate and a folder of two images for extract."""
    from lightning_modules.commands.train import train
    from tests.conftest import compose_train_config

    root = tmp_path_factory.mktemp("fuzz")
    cfg = compose_train_config(root / "run", ["trainer.max_steps=1"])
    train(cfg)
    images = root / "images"
    images.mkdir()
    for index in range(2):
        Image.fromarray(np.full((32, 32, 3), 90 * index, np.uint8)).save(images / f"{index}.png")
    return root


def base_overrides(command: str, root) -> list[str]:
    run = root / f"job{next(COUNTER)}"
    return {
        "train": [*FAST_OVERRIDES, "trainer.max_steps=1", f"hydra.run.dir={run}"],
        "generate": ["num_inference_steps=2", f"hydra.run.dir={run}"],
        "evaluate": [
            f"adapter_path={root / 'run'}",
            "num_samples=2",
            "num_seeds=1",
            "sampling.num_inference_steps=2",
            f"hydra.run.dir={run}",
        ],
        "extract": [f"input={root / 'images'}", f"output={run}", "num_workers=0", "progress=false"],
    }[command]


KEYS = {command: leaf_keys(CONFIG_NAMES[command]) for command in ("train", "generate", "evaluate", "extract")}
keys_of = {
    command: st.one_of(st.sampled_from(keys), st.sampled_from(["foo", "system.bar", "data.x.y"]))
    for command, keys in KEYS.items()
}
jobs = st.sampled_from(sorted(KEYS)).flatmap(
    lambda command: st.tuples(st.just(command), st.lists(st.tuples(keys_of[command], values), min_size=1, max_size=2))
)


def check_job(fuzz_inputs, capsys, job) -> None:
    command, settings_ = job
    fuzzed = [f"{key}={value}" for key, value in settings_]
    argv = [command, *base_overrides(command, fuzz_inputs), *fuzzed]
    code, lines = run_cli(capsys, argv)
    assert code in (0, 2), (argv, lines[-5:])
    assert not any(line.startswith("Traceback") for line in lines), (argv, lines[-5:])
    if code == 2:
        assert lines[-1].startswith(f"ctrlkit {command}: error: "), (argv, lines[-5:])


FUZZ = {"deadline": None, "derandomize": True, "suppress_health_check": list(HealthCheck)}


@settings(max_examples=12, **FUZZ)
@given(job=jobs)
def test_random_overrides_end_in_success_or_one_line(fuzz_inputs, capsys, job):
    check_job(fuzz_inputs, capsys, job)


@pytest.mark.slow
@settings(max_examples=80, **FUZZ)
@given(job=jobs)
def test_many_more_random_overrides_end_in_success_or_one_line(fuzz_inputs, capsys, job):
    check_job(fuzz_inputs, capsys, job)


def test_the_fuzzed_keys_cover_every_command():
    assert all(len(keys) >= 5 for keys in KEYS.values()), {command: len(keys) for command, keys in KEYS.items()}
    assert "adapter.learning_rate" in KEYS["train"] and "units" in KEYS["generate"] and "device" in KEYS["evaluate"]
    assert not any("max_steps" in key or key.startswith("hydra") for key in KEYS["train"])
