"""Gradient accumulation (trainer.accumulate_grad_batches): 2 x batch 8 trains as batch 16 does, and a run killed
mid-epoch resumes to bit-identical weights."""

from __future__ import annotations

import pytest
import torch
from omegaconf import open_dict

from lightning_modules.commands.train import train
from tests.conftest import compose_train_config
from tests.lightning_modules.test_resume import adapter_weights, assert_identical, kill_after_step_3


def test_two_batches_of_8_accumulated_train_as_one_batch_of_16(make_train_config, tmp_path):
    # system.draws=item (the default): an item gets the same noise, timestep and dropout whichever batch carries it

    def weights(name: str, *overrides: str) -> torch.Tensor:
        # SGD: an update proportional to the gradient (Adam divides near-zero gradients by their own size, so
        # float32 rounding there becomes a full-size difference); the accumulated gradient is what is compared
        cfg = make_train_config(
            "trainer.max_steps=3", "data.train_size=48", "optimizer=sgd", "adapter.learning_rate=0.01", *overrides
        )
        with open_dict(cfg):
            cfg.paths.output_dir = str(tmp_path / name)
        _, objects = train(cfg)
        assert objects["trainer"].global_step == 3
        return torch.cat([p.detach().flatten() for p in objects["system"].adapter.trainable_parameters()])

    whole = weights("whole", "data.batch_size=16")
    accumulated = weights("accumulated", "data.batch_size=8", "trainer.accumulate_grad_batches=2")
    single = weights("single", "data.batch_size=8")  # 3 steps of 8: a different run, to show the check can fail
    # one stream of draws, batch by batch: the items' draws depend on the batching (what system.draws=item removes)
    stream = weights("stream", "data.batch_size=8", "trainer.accumulate_grad_batches=2", "system.draws=stream")
    # the same sum in another order: float32 rounding only (measured 4e-9; batch 8 without accumulation: 2e-3)
    assert torch.allclose(whole, accumulated, atol=1e-7, rtol=0)
    assert not torch.allclose(whole, single, atol=1e-4, rtol=0)
    assert not torch.allclose(whole, stream, atol=1e-4, rtol=0)


ACCUMULATED_RUN = [
    "trainer.max_steps=6",
    "trainer.accumulate_grad_batches=2",
    "data.train_size=12",  # 6 batches of 2 per epoch = 3 optimizer steps: the step-2 checkpoint is mid-epoch
    "trainer.val_check_interval=2",
    "callbacks.model_checkpoint.every_n_train_steps=2",
    "callbacks.controllability.every_n_steps=2",
    "callbacks.sample_grid.every_n_steps=0",
]


@pytest.mark.slow  # ~30 s; the default set resumes a plain run after a kill (test_resume.py)
def test_an_accumulating_run_killed_mid_epoch_resumes_to_identical_weights(tmp_path):
    uninterrupted = tmp_path / "uninterrupted"
    _, objects = train(compose_train_config(uninterrupted, ACCUMULATED_RUN))
    assert objects["trainer"].global_step == 6
    killed = tmp_path / "killed"
    kill_after_step_3(killed, tmp_path / "reached", ACCUMULATED_RUN)
    _, objects = train(compose_train_config(killed, [*ACCUMULATED_RUN, "resume=auto"]))
    assert objects["trainer"].global_step == 6
    assert_identical(
        adapter_weights(uninterrupted / "checkpoints" / "last.ckpt"),
        adapter_weights(killed / "checkpoints" / "last.ckpt"),
    )
