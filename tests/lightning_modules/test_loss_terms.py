"""Loss terms from config (ControlNet++'s cycle-consistency reward, `reward=canny`): the system adds them in training
steps only, they train the adapter through the frozen UNet and VAE decoder, dropped conditions are left out, a run
without them draws what it always did, and a reward for another condition stops with one line."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate

from adapters import ControlNetAdapter
from conditions.canny import CannyExtractor
from conditions.shapes import render_scene
from lightning_modules.errors import CtrlkitError
from lightning_modules.loss_terms import CycleConsistencyReward, DecodedImageLoss, predicted_clean
from lightning_modules.step_inputs import ConditionDropout, TrainingInputs
from lightning_modules.system import AdapterTrainingSystem
from tests.adapters.test_adapters import randomize_zero_convs


def canny_batch(count: int = 4) -> dict:
    scenes = [render_scene(np.random.default_rng(seed), 64) for seed in range(count)]
    return {
        "index": torch.arange(count),
        "pixel_values": torch.stack([torch.from_numpy(s.image).permute(2, 0, 1).float() / 127.5 - 1 for s in scenes]),
        "prompt": [s.caption for s in scenes],
        "condition": torch.stack([CannyExtractor()(s.image) for s in scenes]),
    }


def make_system(backbone, **settings) -> AdapterTrainingSystem:
    adapter = ControlNetAdapter.from_unet(backbone.unet, vae_scale_factor=backbone.vae_scale_factor)
    randomize_zero_convs(adapter)  # a trained adapter's residuals: the reward's gradient reaches every weight
    return AdapterTrainingSystem(backbone, adapter, **settings)


def test_the_reward_adds_a_term_with_a_gradient_in_training_steps_only(tiny_backbone):
    reward = CycleConsistencyReward(weight=1.0, max_timestep=200)
    system = make_system(tiny_backbone, loss_terms={"reward": reward})
    batch, draws = canny_batch(), torch.Generator
    plain = system.compute_loss(batch, generator=draws().manual_seed(0))
    total = system.compute_loss(batch, generator=draws().manual_seed(0), with_loss_terms=True)
    assert total > plain  # the same diffusion loss (drawn first) plus a positive term

    inputs = system.training_inputs(batch, generator=draws().manual_seed(0), with_loss_terms=True)
    assert inputs.term_draws["reward"]["timesteps"].max() < 200
    value, scalars = reward(system, inputs, inputs.term_draws["reward"])
    assert value.item() == pytest.approx(scalars["reward_loss"]) and value.item() > 0
    value.backward()
    grads = [p.grad for p in system.adapter.trainable_parameters()]
    assert all(g is not None for g in grads) and sum(float(g.abs().sum()) for g in grads) > 0
    assert all(p.grad is None for p in system.backbone.unet.parameters())  # the base stays frozen
    assert all(p.grad is None for p in system.backbone.vae.parameters())


def test_a_run_without_loss_terms_draws_what_it_always_did(tiny_backbone):
    system = make_system(tiny_backbone)
    batch = canny_batch()
    before = system.training_inputs(batch, generator=torch.Generator().manual_seed(5))
    after = system.training_inputs(batch, generator=torch.Generator().manual_seed(5), with_loss_terms=True)
    assert after.term_draws == {}
    assert torch.equal(before.noisy_latents, after.noisy_latents) and torch.equal(before.timesteps, after.timesteps)


def test_items_whose_condition_was_dropped_get_no_reward(tiny_backbone):
    reward = CycleConsistencyReward()
    system = make_system(tiny_backbone, loss_terms={"reward": reward})
    everything_dropped = ConditionDropout(condition=1.0)
    inputs = system.training_inputs(canny_batch(), everything_dropped, torch.Generator().manual_seed(0), False, True)
    assert not inputs.condition_kept.any()
    value, scalars = reward(system, inputs, inputs.term_draws["reward"])
    assert value.item() == 0.0 and scalars["reward_loss"] == 0.0


def test_predicted_clean_inverts_the_noising(tiny_backbone):
    scheduler = tiny_backbone.noise_scheduler
    latents, noise = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    timesteps = torch.tensor([0, 100, 199])
    noisy = scheduler.add_noise(latents, noise, timesteps)
    torch.testing.assert_close(predicted_clean(scheduler, noisy, timesteps, noise), latents, atol=1e-4, rtol=1e-4)


def test_the_reward_config_builds_the_term_and_refuses_another_condition(make_train_config):
    cfg = make_train_config("reward=canny")
    term = instantiate(cfg.system.loss_terms.reward)
    assert isinstance(term, CycleConsistencyReward) and term.thresholds == (100, 200) and term.max_timestep == 200
    exact = instantiate(make_train_config("reward=canny_exact").system.loss_terms.reward)
    assert exact.edges.__name__ == "soft_canny_nms" and exact.edge_loss == "cross_entropy" and exact.tolerance == 0
    assert exact.start == "samples" and exact.max_items == 8 and exact.weight == 0.03
    assert exact.thresholds == (100, 200) and exact.max_timestep == 200
    cfg = make_train_config("reward=canny", "condition=shapes_mask")
    with pytest.raises(InstantiationException) as raised:  # the ctrlkit CLI prints its cause, one line
        instantiate(cfg.system.loss_terms.reward)
    cause = raised.value.__cause__
    assert isinstance(cause, CtrlkitError) and "\n" not in str(cause)
    assert "re-extracts canny maps; this run's condition is shapes_mask" in str(cause)
    assert "rewards exist for condition=canny or shapes_mask" in str(cause)  # each condition named once


def test_bad_reward_settings_and_a_grounding_condition_are_named(tiny_backbone):
    with pytest.raises(CtrlkitError, match="reward extractor 'sobel'; choose one of: soft_canny"):
        CycleConsistencyReward(extractor="sobel")
    with pytest.raises(CtrlkitError, match="reward edge_loss 'l2'; choose cross_entropy or soft_f1"):
        CycleConsistencyReward(edge_loss="l2")
    with pytest.raises(CtrlkitError, match="0 < max_timestep <= 1000 and weight >= 0; got 0, 1.0"):
        CycleConsistencyReward(max_timestep=0)
    with pytest.raises(CtrlkitError, match="got 200, -1"):
        CycleConsistencyReward(weight=-1)
    reward = CycleConsistencyReward()
    system = make_system(tiny_backbone, loss_terms={"reward": reward})
    inputs = system.training_inputs(canny_batch(2), generator=torch.Generator().manual_seed(0), with_loss_terms=True)
    inputs.condition = object()  # a grounding condition is no map to re-extract
    with pytest.raises(CtrlkitError, match="needs an image condition"):
        reward(system, inputs, inputs.term_draws["reward"])


def test_a_samples_reward_noises_the_adapters_own_samples_of_at_most_max_items(tiny_backbone):
    reward = CycleConsistencyReward(start="samples", sample_steps=2, max_items=2)
    system = make_system(tiny_backbone, loss_terms={"reward": reward})
    inputs = system.training_inputs(canny_batch(), generator=torch.Generator().manual_seed(0), with_loss_terms=True)
    draws = inputs.term_draws["reward"]
    sampled = []
    own_samples = reward.own_samples
    reward.own_samples = lambda *args: sampled.append(own_samples(*args)) or sampled[-1]
    value, _ = reward(system, inputs, draws)
    assert sampled[0].shape == (2, *inputs.latents.shape[1:])  # the first two kept items only
    assert not torch.allclose(sampled[0], inputs.latents[:2], atol=0.1)  # samples, not the training latents
    again = own_samples(system, inputs.encoder_hidden_states[:2], inputs.condition[:2], None, (2, 4, 16, 16), 7)
    assert torch.equal(
        again, own_samples(system, inputs.encoder_hidden_states[:2], inputs.condition[:2], None, (2, 4, 16, 16), 7)
    )  # the drawn seed fixes them: resume stays exact
    value.backward()
    assert sum(float(p.grad.abs().sum()) for p in system.adapter.trainable_parameters() if p.grad is not None) > 0
    data_value, _ = CycleConsistencyReward(max_items=2)(system, inputs, draws)
    assert data_value.item() != pytest.approx(value.item())
    with pytest.raises(CtrlkitError, match="reward start 'noise'; choose data"):
        CycleConsistencyReward(start="noise")
    with pytest.raises(CtrlkitError, match="sample_steps >= 1 and max_items >= 1; got 10, 0"):
        CycleConsistencyReward(max_items=0)


def test_the_pixel_exact_edge_reward_scores_the_true_edges_above_edges_one_pixel_off():
    reward = CycleConsistencyReward(extractor="soft_canny_nms", edge_loss="soft_f1", tolerance=0)
    scene = render_scene(np.random.default_rng(3), 64)
    image = (torch.from_numpy(scene.image).permute(2, 0, 1)[None].float() / 255).requires_grad_()
    target = (CannyExtractor()(scene.image)[:1] > 0.5).float()[None]
    exact = reward.consistency(image, target)
    assert exact.shape == (1,) and exact.item() < 0.1
    assert reward.consistency(image.roll(1, dims=3), target).item() > 0.5
    exact.sum().backward()
    assert image.grad.abs().sum() > 0


def test_the_decoded_image_loss_is_the_pixel_error_of_the_one_step_estimate(tiny_backbone):
    """The target is the item's own image (not its latents' decode), weighted; gradients reach the adapter only."""
    term = DecodedImageLoss(weight=2.0, max_timestep=200)
    system = make_system(tiny_backbone, loss_terms={"pixels": term})
    batch = canny_batch(2)
    inputs = system.training_inputs(batch, generator=torch.Generator().manual_seed(0), with_loss_terms=True)
    draws = inputs.term_draws["pixels"]
    assert draws["timesteps"].max() < 200
    value, scalars = term(system, inputs, draws)

    scheduler = tiny_backbone.noise_scheduler
    noisy = scheduler.add_noise(inputs.latents, draws["noise"], draws["timesteps"])
    with torch.no_grad():
        prediction = system.unet_prediction(
            TrainingInputs(noisy, draws["timesteps"], inputs.encoder_hidden_states, inputs.condition, inputs.target)
        )
        images = tiny_backbone.decode_latents(predicted_clean(scheduler, noisy, draws["timesteps"], prediction))
    expected = torch.nn.functional.mse_loss(images, (batch["pixel_values"] + 1) / 2).item()
    assert scalars["decoded_image_loss"] == pytest.approx(expected, rel=1e-4)
    assert value.item() == pytest.approx(2.0 * expected, rel=1e-4)
    value.backward()
    grads = [p.grad for p in system.adapter.trainable_parameters()]
    assert all(g is not None for g in grads) and sum(float(g.abs().sum()) for g in grads) > 0
    assert all(p.grad is None for p in system.backbone.unet.parameters())
    assert all(p.grad is None for p in system.backbone.vae.parameters())


def test_the_decoded_image_loss_takes_the_first_max_items_of_a_grounding_batch(tiny_backbone):
    from adapters.grounding import GroundingCondition
    from adapters.layout_controlnet import LayoutControlNetAdapter
    from tests.adapters.test_adapter_contract import grounding_condition

    adapter = LayoutControlNetAdapter.from_unet(tiny_backbone.unet, vae_scale_factor=4, embedding_channels=3)
    randomize_zero_convs(adapter)
    system = AdapterTrainingSystem(tiny_backbone, adapter)
    inputs = system.training_inputs(canny_batch(3), generator=torch.Generator().manual_seed(0))
    condition = grounding_condition(3)
    phrases = [["a red circle", "a blue square", "", ""], ["a green star", "a red square", "", ""], ["x", "y", "", ""]]
    inputs.condition = GroundingCondition(condition.boxes, condition.masks, phrases, condition.phrase_embeddings)
    draws = DecodedImageLoss().draw(inputs.latents, torch.Generator().manual_seed(1))
    with torch.no_grad():
        first_two, _ = DecodedImageLoss(max_items=2)(system, inputs, draws)
        whole, _ = DecodedImageLoss()(system, inputs, draws)
        g = inputs.condition
        inputs.condition = GroundingCondition(g.boxes[:2], g.masks[:2], phrases[:2], g.phrase_embeddings[:2])
        inputs.latents, inputs.images = inputs.latents[:2], inputs.images[:2]
        inputs.encoder_hidden_states, inputs.target = inputs.encoder_hidden_states[:2], inputs.target[:2]
        alone, _ = DecodedImageLoss()(system, inputs, {name: value[:2] for name, value in draws.items()})
    assert first_two.item() == pytest.approx(alone.item(), rel=1e-5)
    assert first_two.item() != pytest.approx(whole.item())


def test_bad_decoded_image_loss_settings_are_named(tiny_backbone):
    with pytest.raises(CtrlkitError, match="0 < max_timestep <= 1000 and weight >= 0; got 0, 1.0"):
        DecodedImageLoss(max_timestep=0)
    with pytest.raises(CtrlkitError, match="max_items >= 1; got 0"):
        DecodedImageLoss(max_items=0)
    term = DecodedImageLoss()
    system = make_system(tiny_backbone, loss_terms={"pixels": term})
    inputs = system.training_inputs(canny_batch(2), generator=torch.Generator().manual_seed(0), with_loss_terms=True)
    inputs.images = None
    with pytest.raises(CtrlkitError, match="needs the batch's images"):
        term(system, inputs, inputs.term_draws["pixels"])


def test_the_pixel_loss_config_builds_the_term_beside_a_reward(make_train_config):
    cfg = make_train_config("pixel_loss=decoded_image", "reward=canny")
    terms = {name: instantiate(term) for name, term in cfg.system.loss_terms.items()}
    assert isinstance(terms["pixel_loss"], DecodedImageLoss) and isinstance(terms["reward"], CycleConsistencyReward)
    assert terms["pixel_loss"].weight == 10.0 and terms["pixel_loss"].max_timestep == 200

    from lightning_modules.commands.train import train

    _, objects = train(make_train_config("pixel_loss=decoded_image", "trainer.max_steps=2"))
    assert objects["trainer"].global_step == 2
    assert objects["trainer"].callback_metrics["train/decoded_image_loss"] > 0  # logged by the run's steps
