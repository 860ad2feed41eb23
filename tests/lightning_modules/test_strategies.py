"""trainer=fsdp and trainer=deepspeed compose and build their Lightning strategies (running them needs CUDA GPUs)."""

from __future__ import annotations

import pytest
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import open_dict

from lightning_modules.commands.config_checks import check_strategy_installed, check_train_config, module_installed
from lightning_modules.errors import CtrlkitError


def check_train_config_here(cfg) -> None:
    """The config checks pass where there is a CUDA GPU; elsewhere they say it needs one."""
    if torch.cuda.is_available():
        check_train_config(cfg)
        return
    with pytest.raises(CtrlkitError, match=r"runs on CUDA GPUs only, and torch finds none here"):
        check_train_config(cfg)


def test_fsdp_composes_and_builds_its_strategy(make_train_config, tiny_backbone):
    from pytorch_lightning.strategies import FSDPStrategy
    from torch.distributed.fsdp import ShardingStrategy

    cfg = make_train_config("trainer=fsdp")
    check_train_config_here(cfg)
    assert cfg.trainer.accelerator == "gpu" and cfg.trainer.devices == 2 and cfg.trainer.num_nodes == 1
    assert cfg.trainer.use_distributed_sampler is False  # our data modules shard by rank themselves (default.yaml)
    strategy = instantiate(cfg.trainer.strategy)
    assert isinstance(strategy, FSDPStrategy)
    assert strategy.sharding_strategy == ShardingStrategy.FULL_SHARD
    assert strategy._state_dict_type == "full"  # checkpoints stay one plain file
    assert strategy.kwargs["use_orig_params"] is True
    # the wrap policy makes units of the repeated blocks of the frozen UNet and of the adapter built from it
    block_classes = tuple(strategy.kwargs["auto_wrap_policy"]._module_classes)
    adapter = instantiate(cfg.adapter.build, _convert_="all")(tiny_backbone.unet, vae_scale_factor=4)
    unet = tiny_backbone.unet
    blocks = len(unet.down_blocks) + 1 + len(unet.up_blocks)
    assert sum(isinstance(module, block_classes) for module in unet.modules()) == blocks
    # ControlNet: the copy of the encoder, its down blocks and middle block
    assert sum(isinstance(module, block_classes) for module in adapter.modules()) == len(unet.down_blocks) + 1


def test_fsdp_on_a_cpu_is_lightnings_one_line_refusal(make_train_config):
    """FSDP runs on CUDA GPUs only: a Trainer asked for it on a CPU refuses with a ValueError, which the CLI prints
    as one line (``ctrlkit train: error: trainer: The strategy `fsdp` requires a GPU accelerator ...``)."""
    cfg = make_train_config("trainer=fsdp")
    with open_dict(cfg):
        cfg.trainer.accelerator = "cpu"
    with pytest.raises(InstantiationException) as raised:
        instantiate(cfg.trainer)
    assert isinstance(raised.value.__cause__, ValueError) and "requires a GPU accelerator" in str(raised.value)


@pytest.mark.parametrize("trainer", ["fsdp", "deepspeed"])
def test_a_sharded_strategy_on_a_cpu_is_one_line(make_train_config, trainer):
    """Lightning refuses FSDP on a CPU when the Trainer is built, DeepSpeed only once fit starts (a traceback):
    ctrlkit says it before any model loads."""
    cfg = make_train_config(f"trainer={trainer}", "trainer.accelerator=cpu")
    name = "FSDPStrategy" if trainer == "fsdp" else "DeepSpeedStrategy"
    message = rf"^trainer.strategy {name} runs on CUDA GPUs only, not trainer.accelerator=cpu; on CPUs use trainer=ddp"
    if trainer == "deepspeed" and not module_installed("deepspeed"):
        message = r"needs the deepspeed package"  # checked first
    with pytest.raises(CtrlkitError, match=message):
        check_strategy_installed(cfg)


def test_an_unknown_wrap_class_is_named():
    from lightning_modules.strategies import module_classes

    with pytest.raises(CtrlkitError, match=r"auto_wrap_policy: cannot import the class diffusers.models.NoSuchBlock"):
        module_classes(["diffusers.models.NoSuchBlock"])


def test_deepspeed_composes_and_builds_its_strategy_or_names_the_extra(make_train_config):
    cfg = make_train_config("trainer=deepspeed")
    assert cfg.trainer.accelerator == "gpu" and cfg.trainer.use_distributed_sampler is False
    if not module_installed("deepspeed"):  # CI installs ".[dev]", which leaves deepspeed out
        with pytest.raises(CtrlkitError, match=r"needs the deepspeed package.*pip install 'ctrlkit\[deepspeed\]'"):
            check_train_config(cfg)
        return
    from pytorch_lightning.strategies import DeepSpeedStrategy

    check_train_config_here(cfg)
    strategy = instantiate(cfg.trainer.strategy)
    assert isinstance(strategy, DeepSpeedStrategy)
    zero = strategy.config["zero_optimization"]
    assert zero["stage"] == 2 and zero["overlap_comm"] and zero["contiguous_gradients"]


def test_deepspeed_missing_is_one_line_naming_the_extra(make_train_config, monkeypatch):
    cfg = make_train_config("trainer=deepspeed")
    monkeypatch.setitem(__import__("sys").modules, "deepspeed", None)  # as if it were not installed
    with pytest.raises(CtrlkitError) as raised:
        check_strategy_installed(cfg)
    message = str(raised.value)
    assert "\n" not in message
    assert message == (
        "trainer.strategy DeepSpeedStrategy needs the deepspeed package, which is not installed: "
        "pip install 'ctrlkit[deepspeed]'"
    )
