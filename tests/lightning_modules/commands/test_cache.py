"""``ctrlkit cache``: it writes exactly the entries a training run with the same overrides reads, once."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra.core.global_hydra import GlobalHydra

from lightning_modules.commands.cache import run_cache
from lightning_modules.commands.train import train
from lightning_modules.errors import CtrlkitError
from tests.conftest import FAST_OVERRIDES, compose_config

# four items = two steps of batch 2: the run's one epoch meets every item
RUN = ["data.train_size=4", "trainer.max_steps=2"]
QUIET_TRAINING = ["callbacks.controllability.every_n_steps=0", "callbacks.sample_grid.every_n_steps=0"]


@pytest.fixture
def compose(tmp_path):
    def make(config_name: str, *overrides: str):
        return compose_config(config_name, tmp_path / config_name, [*FAST_OVERRIDES, *overrides])

    yield make
    GlobalHydra.instance().clear()


# bf16-mixed: the frozen weights are cast before their fingerprints are taken, in cache as in training
@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_training_after_cache_never_runs_the_vae_encoder(compose, tmp_path, monkeypatch, capsys, precision):
    from lightning_modules.backbone import Backbone

    cache_dir = f"system.cache_dir={tmp_path / 'cache'}"
    run = [*RUN, f"trainer.precision={precision}", cache_dir]
    report = run_cache(compose("cache", *run, "progress=false"))
    assert report.items == 4 and report.found == 0
    assert report.by_kind["vae_posterior"] == [0, 4]
    assert report.by_kind["text_embedding"][1] >= 3  # the training and validation captions, and ""
    (line,) = [line for line in capsys.readouterr().out.splitlines() if line.startswith("ctrlkit cache:")]
    assert f"4 items; {report.written} entries written" in line and str(tmp_path / "cache") in line

    encoded, encode_posterior = [], Backbone.encode_posterior

    def counting_posterior(self, pixel_values):
        encoded.append(len(pixel_values))
        return encode_posterior(self, pixel_values)

    monkeypatch.setattr(Backbone, "encode_posterior", counting_posterior)
    _, objects = train(compose("train", *run, *QUIET_TRAINING))
    counts = objects["system"].feature_cache.counts.by_kind
    assert counts["vae_posterior"] == [4, 0] and counts["text_embedding"][1] == 0
    assert encoded == []  # nor did anything else run it (no validation step, which encodes its own items)


def test_a_second_cache_run_writes_nothing(compose, tmp_path):
    overrides = [*RUN, f"system.cache_dir={tmp_path / 'cache'}", "progress=false", "num_workers=1", "batch_size=3"]
    first = run_cache(compose("cache", *overrides))
    files = sorted((tmp_path / "cache").rglob("*.safetensors"))
    second = run_cache(compose("cache", *overrides))
    assert first.written == len(files) and first.found == 0
    assert second.written == 0 and second.found == first.written
    assert sorted((tmp_path / "cache").rglob("*.safetensors")) == files
    assert run_cache(compose("cache", *overrides, "limit=2")).items == 2


def _cli(capsys, *argv: str) -> tuple[int, list[str]]:
    from lightning_modules.commands.cli import main

    try:
        code = main(list(argv))
    except SystemExit as exit_:
        code = exit_.code
    return code, [line for line in capsys.readouterr().err.splitlines() if line.strip()]


def test_missing_cache_dir_is_one_line(compose, tmp_path, capsys, monkeypatch):
    with pytest.raises(CtrlkitError, match=r"system.cache_dir is required: .* system.cache_dir=outputs/feature_cache"):
        run_cache(compose("cache", *RUN))
    monkeypatch.chdir(tmp_path)
    for empty in ("system.cache_dir=null", "system.cache_dir="):  # nothing encoded, no progress bar first
        code, lines = _cli(capsys, "cache", "trainer=cpu", "logger=none", empty)
        assert code == 2 and len(lines) == 1, lines
        assert lines[0].startswith("ctrlkit cache: error: system.cache_dir is required")
    assert sorted(path.name for path in Path(tmp_path).iterdir()) == []  # no run folder, no log file
