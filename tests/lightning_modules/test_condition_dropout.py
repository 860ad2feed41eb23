"""Condition dropout, one recipe for every adapter: text, condition or both dropped per item."""

from __future__ import annotations

import pytest
import torch

from adapters.gligen import GligenAdapter
from adapters.grounding import GroundingCondition
from adapters.t2i_adapter import T2IAdapterAdapter
from lightning_modules.errors import CtrlkitError
from lightning_modules.step_inputs import ConditionDropout
from lightning_modules.system import AdapterTrainingSystem


def test_the_three_events_are_exclusive_with_their_probabilities():
    drop_text, drop_condition = ConditionDropout(text=0.5, condition=0.1, both=0.2).sample(
        200_000, torch.Generator().manual_seed(0)
    )
    both = drop_text & drop_condition
    assert both.float().mean() == pytest.approx(0.2, abs=0.005)
    assert (drop_text & ~both).float().mean() == pytest.approx(0.5, abs=0.005)
    assert (drop_condition & ~both).float().mean() == pytest.approx(0.1, abs=0.005)


def test_text_only_dropout_draws_as_the_earlier_prompt_dropout():
    generator = torch.Generator().manual_seed(3)
    earlier = torch.rand(64, generator=generator) < 0.5
    drop_text, drop_condition = ConditionDropout(text=0.5).sample(64, torch.Generator().manual_seed(3))
    assert torch.equal(drop_text, earlier) and not drop_condition.any()


def test_bad_recipes_are_named():
    with pytest.raises(CtrlkitError, match=r"condition_dropout.text=1.5 must be in \[0, 1\]"):
        ConditionDropout(text=1.5)
    with pytest.raises(CtrlkitError, match=r"text \+ condition \+ both = 1.2 must be at most 1"):
        ConditionDropout(text=0.6, condition=0.6)


def test_the_system_reads_the_recipe(tiny_backbone):
    adapter = T2IAdapterAdapter.from_unet(tiny_backbone.unet, vae_scale_factor=4)
    system = AdapterTrainingSystem(tiny_backbone, adapter, condition_dropout={"text": 0.2, "condition": 0.3})
    assert system.condition_dropout == ConditionDropout(text=0.2, condition=0.3)
    with pytest.raises(CtrlkitError, match=r"unknown keys \['txt'\]"):
        AdapterTrainingSystem(tiny_backbone, adapter, condition_dropout={"txt": 0.2})


def test_dropped_conditions_reach_the_adapter_as_null_conditions(tiny_backbone):
    adapter = GligenAdapter.from_unet(tiny_backbone.unet)
    seen = []
    adapter.register_forward_pre_hook(lambda module, args: seen.append(args[0].masks.clone()))
    system = AdapterTrainingSystem(tiny_backbone, adapter, condition_dropout={"condition": 1.0})
    masks = torch.zeros(2, 30)
    masks[:, :2] = 1
    batch = {
        "pixel_values": torch.zeros(2, 3, 64, 64),
        "prompt": ["a red circle on a blue background"] * 2,
        "condition": GroundingCondition(
            boxes=torch.rand(2, 30, 4), masks=masks, phrases=[["red circle"] + [""] * 29] * 2
        ),
    }
    system.compute_loss(batch)
    system.compute_loss(batch, dropout=system.condition_dropout)
    assert torch.equal(seen[0], masks) and seen[1].sum() == 0
    # an image condition's null condition is an all-zero map
    image_adapter = T2IAdapterAdapter.from_unet(tiny_backbone.unet, vae_scale_factor=4)
    dropped = image_adapter.drop_condition(torch.ones(3, 3, 8, 8), torch.tensor([False, True, False]))
    assert dropped[1].sum() == 0 and dropped[0].sum() == dropped[2].sum() == 3 * 64


def test_validation_logs_how_much_the_condition_lowers_the_loss(tiny_backbone):
    """val/condition_gain = the loss with every condition nulled - the loss with them, same noise and timesteps:
    0 for GLIGEN at init (its gates are closed), non-zero once they are open; and the gates are logged."""
    adapter = GligenAdapter.from_unet(tiny_backbone.unet)
    system = AdapterTrainingSystem(tiny_backbone, adapter)
    logged = {}
    system.log = lambda name, value, **kwargs: logged.__setitem__(name, float(torch.as_tensor(value).detach()))
    masks = torch.zeros(2, 30)
    masks[:, :2] = 1
    # seeded: on the tiny model the grounding moves the loss by ~1e-5, a gain that unseeded draws can round to 0
    draws = torch.Generator().manual_seed(0)
    batch = {
        "pixel_values": torch.rand(2, 3, 64, 64, generator=draws) * 2 - 1,
        "prompt": ["a red circle and a blue square on a white background"] * 2,
        # the items' indices seed their noise and timesteps (system.draws=item)
        "index": torch.tensor([0, 1]),
        "condition": GroundingCondition(
            boxes=torch.tensor([[0.1, 0.1, 0.5, 0.5], [0.4, 0.4, 0.9, 0.9]] + [[0.0] * 4] * 28).expand(2, 30, 4),
            masks=masks,
            phrases=[["red circle", "blue square"] + [""] * 28] * 2,
        ),
    }
    system.validation_step(dict(batch), 0)
    assert logged["val/condition_gain"] == 0.0 and logged["val/loss_without_condition"] == logged["val/loss"]
    for fuser in adapter.fusers:
        fuser.alpha_attn.data.fill_(0.7)
        fuser.alpha_dense.data.fill_(-0.4)
    adapter.position_net.null_position_feature.data.normal_(generator=draws)
    system.validation_step(dict(batch), 0)
    assert abs(logged["val/condition_gain"]) > 1e-6  # ~100 float32 steps of a loss ~1.17
    assert logged["val/condition_gain"] == pytest.approx(logged["val/loss_without_condition"] - logged["val/loss"])
    scalars = {name: float(value) for name, value in adapter.training_scalars().items()}
    assert scalars == pytest.approx({"gate_attn": 0.6043678, "gate_dense": 0.3799490})
