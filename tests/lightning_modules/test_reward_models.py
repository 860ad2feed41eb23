"""The shapes segmenter (the `reward=shapes_mask` reward model): the shipped one finds the foreground of drawn and
decoded scenes, its trainer lowers its loss, and the reward term built on it trains the adapter."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate

from conditions.shapes import render_scene
from conditions.shapes_segmenter import ShapesSegmenter, mask_consistency_loss
from conditions.shapes_truth import ShapesTruthExtractor
from lightning_modules.backbone import load_tiny_backbone
from lightning_modules.errors import CtrlkitError
from lightning_modules.loss_terms import CycleConsistencyReward
from lightning_modules.reward_models import (
    held_out_mask_iou,
    load_shapes_segmenter,
    scene_batch,
    train_shapes_segmenter,
)
from tests.lightning_modules.test_loss_terms import canny_batch, make_system


def test_the_shipped_segmenter_finds_the_foreground_of_drawn_and_decoded_scenes():
    scores = held_out_mask_iou(load_shapes_segmenter(), load_tiny_backbone(), count=32)
    assert scores["drawn"] > 0.95 and scores["decoded"] > 0.9
    assert held_out_mask_iou(ShapesSegmenter().eval(), count=32)["drawn"] < 0.5  # the check can fail


def test_training_lowers_the_segmenters_loss():
    images, masks = scene_batch(np.random.default_rng(3), 16)
    loss = lambda model: float(F.binary_cross_entropy_with_logits(model(images), masks))  # noqa: E731
    torch.manual_seed(0)
    untrained = ShapesSegmenter()
    trained = train_shapes_segmenter(steps=30, batch_size=8, progress=False)
    assert loss(trained) < 0.8 * loss(untrained)


def test_the_mask_reward_trains_the_adapter_and_prefers_the_true_mask(tiny_backbone, tmp_path):
    images, masks = scene_batch(np.random.default_rng(4), 4)
    segmenter = load_shapes_segmenter()
    with torch.no_grad():
        right = mask_consistency_loss(segmenter(images), masks)
        wrong = mask_consistency_loss(segmenter(images), masks.flip(0))
    assert (right < wrong).all()

    reward = CycleConsistencyReward(extractor="shapes_segmenter", condition="shapes_mask")
    system = make_system(tiny_backbone, loss_terms={"reward": reward})
    batch = canny_batch()  # its scenes' masks instead of their edges
    scenes = [render_scene(np.random.default_rng(seed), 64) for seed in range(4)]
    batch["condition"] = torch.stack([ShapesTruthExtractor("mask").from_scene(scene) for scene in scenes])
    inputs = system.training_inputs(batch, generator=torch.Generator().manual_seed(0), with_loss_terms=True)
    value, scalars = reward(system, inputs, inputs.term_draws["reward"])
    assert value.item() == pytest.approx(scalars["reward_loss"]) and value.item() > 0
    value.backward()
    grads = [p.grad for p in system.adapter.trainable_parameters()]
    assert all(g is not None for g in grads) and sum(float(g.abs().sum()) for g in grads) > 0
    assert all(p.grad is None for p in reward.segmenter.parameters())  # the reward model stays frozen
    with pytest.raises(CtrlkitError, match="no shapes segmenter at .*config.json not found"):
        CycleConsistencyReward(extractor="shapes_segmenter", condition="shapes_mask", segmenter_path=str(tmp_path))
    segmenter.save_pretrained(tmp_path / "corrupt")
    (tmp_path / "corrupt" / "diffusion_pytorch_model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(CtrlkitError, match=r"cannot load the shapes segmenter from .*corrupt: "):
        load_shapes_segmenter(tmp_path / "corrupt")


def test_the_shapes_mask_reward_config_builds_the_shipped_segmenter(make_train_config):
    cfg = make_train_config("reward=shapes_mask", "condition=shapes_mask")
    term = instantiate(cfg.system.loss_terms.reward)
    assert isinstance(term, CycleConsistencyReward) and isinstance(term.segmenter, ShapesSegmenter)
