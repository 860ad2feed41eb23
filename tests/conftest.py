"""Shared fixtures: a tiny backbone built in code, and the training config composed like the CLI composes it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

from lightning_modules.backbone import Backbone, build_tiny_backbone
from lightning_modules.config_checks import CONF_DIR

# Tests never reach a hub, and W&B never goes online from a test.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

# Overrides that keep a training test to seconds: tiny validation, 2-step sampling, no experiment logger.
FAST_OVERRIDES = [
    "trainer=cpu",
    "logger=none",
    "data.batch_size=2",
    "data.val_size=2",
    "callbacks.sample_grid.num_samples=2",
    "callbacks.sample_grid.num_inference_steps=2",
    "callbacks.progress_bar.refresh_rate=0",
    "+trainer.enable_model_summary=false",
]


@pytest.fixture
def tiny_backbone() -> Backbone:
    return build_tiny_backbone(seed=0)


def compose_train_config(output_dir: Path, overrides: list[str] | None = None) -> DictConfig:
    """Compose conf/train.yaml with the Hydra runtime filled in, as `ctrlkit train` would see it."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
        cfg = compose(config_name="train", return_hydra_config=True, overrides=FAST_OVERRIDES + list(overrides or []))
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
        cfg.hydra.runtime.output_dir = str(output_dir)
        cfg.hydra.job.num = 0
    HydraConfig().set_config(cfg)
    return cfg


@pytest.fixture
def make_train_config(tmp_path):
    def make(*overrides: str) -> DictConfig:
        return compose_train_config(tmp_path / "run", list(overrides))

    yield make
    GlobalHydra.instance().clear()


@pytest.fixture(scope="session")
def hed_weights_dir(tmp_path_factory) -> Path:
    """A folder with ``ControlNetHED.pth`` as lllyasviel/Annotators lays it out: a state dict of controlnet_aux's
    ``ControlNetHED_Apache2``, here with seeded random weights."""
    from controlnet_aux.hed import ControlNetHED_Apache2

    folder = tmp_path_factory.mktemp("hed_weights")
    torch.manual_seed(0)
    torch.save(ControlNetHED_Apache2().state_dict(), folder / "ControlNetHED.pth")
    return folder
