"""Composition of conditioning units: parity with diffusers' ControlNet pipeline, windows, scale, modes, regions."""

from __future__ import annotations

import pytest
import torch
from diffusers import StableDiffusionControlNetPipeline

from adapters import ControlNetAdapter, GroundingCondition, make_scheduler, sample_latents
from adapters.composition import PROMPT_MODE_BASE, Composition, ControlUnit, _weigh
from lightning_modules.backbone import load_tiny_backbone
from tests.adapters.test_adapters import randomize_zero_convs

PROMPTS = ["a red circle on a blue background", "a green square on a white background"]


@pytest.fixture(scope="module")
def shipped():
    return load_tiny_backbone()


def trained_controlnet(backbone, seed: int) -> ControlNetAdapter:
    adapter = ControlNetAdapter.from_unet(backbone.unet, vae_scale_factor=backbone.vae_scale_factor)
    randomize_zero_convs(adapter, seed=seed)
    return adapter.eval()


def edge_condition(seed: int, batch: int = 2) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (torch.rand(batch, 3, 64, 64, generator=generator) > 0.9).float()


def sample(backbone, *, composition=None, steps: int = 6, scheduler: str = "unipc", guidance: float = 5.0):
    latents = sample_latents(
        backbone.unet,
        make_scheduler(scheduler, backbone.noise_scheduler.config),
        backbone.encode_prompts(PROMPTS),
        (len(PROMPTS), 4, 16, 16),
        composition=composition,
        uncond_hidden_states=backbone.encode_prompts([""] * len(PROMPTS)),
        guidance_scale=guidance,
        num_inference_steps=steps,
        generator=torch.Generator().manual_seed(0),
    )
    return backbone.decode_latents(latents)


class CallCounter(torch.nn.Module):
    """Wraps an adapter and counts its calls."""

    def __init__(self, adapter) -> None:
        super().__init__()
        self.adapter, self.calls = adapter, 0

    def forward(self, condition, **kwargs):
        self.calls += 1
        return self.adapter(condition, **kwargs)


@pytest.mark.parametrize(("scheduler", "scale", "start", "end"), [("unipc", 1.0, 0.0, 1.0), ("ddim", 0.7, 0.2, 0.6)])
def test_one_controlnet_equals_diffusers_pipeline(shipped, scheduler, scale, start, end):
    adapter = trained_controlnet(shipped, seed=1)
    condition = edge_condition(0)
    unit = ControlUnit(adapter, condition, scale=scale, start=start, end=end)
    ours = sample(shipped, composition=Composition([unit]), scheduler=scheduler)

    pipeline = StableDiffusionControlNetPipeline(**shipped.to_pipeline().components, controlnet=adapter.controlnet)
    pipeline.scheduler = make_scheduler(scheduler, shipped.noise_scheduler.config)
    pipeline.set_progress_bar_config(disable=True)
    theirs = pipeline(
        PROMPTS,
        image=condition,
        height=64,
        width=64,
        num_inference_steps=6,
        guidance_scale=5.0,
        controlnet_conditioning_scale=scale,
        control_guidance_start=start,
        control_guidance_end=end,
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
    ).images
    assert ours.shape == theirs.shape == (2, 3, 64, 64)
    assert (ours - theirs).abs().max() <= 1e-3
    assert (ours - sample(shipped)).abs().max() > 1e-2  # the unit mattered: the comparison can fail


def test_each_unit_matters_and_scale_zero_equals_leaving_it_out(shipped):
    first = ControlUnit(trained_controlnet(shipped, seed=1), edge_condition(0), name="first")
    second = ControlUnit(trained_controlnet(shipped, seed=2), edge_condition(1), scale=0.8, name="second")
    both = sample(shipped, composition=Composition([first, second]))
    assert (both - sample(shipped, composition=Composition([first]))).abs().max() > 1e-3
    assert (both - sample(shipped, composition=Composition([second]))).abs().max() > 1e-3
    silenced = ControlUnit(second.adapter, second.condition, scale=0.0)
    assert torch.equal(
        sample(shipped, composition=Composition([first, silenced])), sample(shipped, composition=Composition([first]))
    )


@pytest.mark.parametrize(("start", "end", "expected_calls"), [(0.0, 1.0, 10), (0.0, 0.5, 5), (0.9, 1.0, 1)])
def test_a_unit_runs_only_inside_its_window(shipped, start, end, expected_calls):
    counter = CallCounter(trained_controlnet(shipped, seed=1))
    unit = ControlUnit(counter, edge_condition(0), start=start, end=end)
    sample(shipped, composition=Composition([unit]), steps=10)
    assert counter.calls == expected_calls


def test_outside_every_window_the_output_is_the_base_models(shipped):
    counter = CallCounter(trained_controlnet(shipped, seed=1))
    late = ControlUnit(counter, edge_condition(0), start=0.5, end=0.6)  # no step of 1 satisfies the window
    assert torch.equal(sample(shipped, composition=Composition([late]), steps=1), sample(shipped, steps=1))
    assert counter.calls == 0


def unit_kwargs(shipped, unit: ControlUnit, guided: bool = True) -> dict:
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(4 if guided else 2, 4, 16, 16, generator=generator)
    hidden = shipped.encode_prompts(PROMPTS * (2 if guided else 1))
    with torch.no_grad():
        return Composition([unit])(latents, torch.tensor(500), hidden, step_index=0, num_steps=1, guided=guided)


def test_prompt_mode_weights_residuals_by_depth(shipped):
    adapter = trained_controlnet(shipped, seed=1)
    balanced = unit_kwargs(shipped, ControlUnit(adapter, edge_condition(0)))
    prompt = unit_kwargs(shipped, ControlUnit(adapter, edge_condition(0), mode="prompt"))
    count = len(balanced["down_block_additional_residuals"])
    for index, (b, p) in enumerate(
        zip(balanced["down_block_additional_residuals"], prompt["down_block_additional_residuals"])
    ):
        torch.testing.assert_close(p, b * PROMPT_MODE_BASE ** (count - index))
    torch.testing.assert_close(prompt["mid_block_additional_residual"], balanced["mid_block_additional_residual"])


def test_control_mode_leaves_the_unconditional_half_alone(shipped):
    adapter = trained_controlnet(shipped, seed=1)
    kwargs = unit_kwargs(shipped, ControlUnit(adapter, edge_condition(0), mode="control"))
    mid = kwargs["mid_block_additional_residual"]
    assert mid.shape[0] == 4
    assert torch.count_nonzero(mid[:2]) == 0 and torch.count_nonzero(mid[2:]) > 0


def test_region_mask_limits_residuals_to_the_region(shipped):
    adapter = trained_controlnet(shipped, seed=1)
    mask = torch.zeros(1, 1, 64, 64)
    mask[..., :, :32] = 1.0  # left half
    kwargs = unit_kwargs(shipped, ControlUnit(adapter, edge_condition(0), mask=mask))
    first = kwargs["down_block_additional_residuals"][0]  # (4, C, 16, 16)
    assert torch.count_nonzero(first[..., 8:]) == 0 and torch.count_nonzero(first[..., :8]) > 0


def test_bad_unit_settings_are_named():
    with pytest.raises(ValueError, match="unit 'edges': need 0 <= start < end <= 1"):
        ControlUnit(None, None, start=0.6, end=0.4, name="edges")
    with pytest.raises(ValueError, match="unit 'edges': mode 'loud'; choose one of: balanced, prompt, control"):
        ControlUnit(None, None, mode="loud", name="edges")


def test_weigh_leaves_grounding_kwargs_untouched():
    """Scale, prompt-mode weights and region masks are for residuals: grounding passes through value for value."""
    boxes, masks = torch.rand(2, 3, 4), torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    embeddings = torch.randn(2, 3, 8)
    grounding = {
        "cross_attention_kwargs": {"gligen": {"boxes": boxes, "positive_embeddings": embeddings, "masks": masks}}
    }
    units = [
        ControlUnit(None, None, scale=0.5),
        ControlUnit(None, None, mode="prompt"),
        ControlUnit(None, None, mask=torch.zeros(1, 1, 8, 8)),
    ]
    for unit in units:
        gligen = _weigh(grounding, unit)["cross_attention_kwargs"]["gligen"]
        assert set(gligen) == {"boxes", "positive_embeddings", "masks"}
        assert torch.equal(gligen["boxes"], boxes) and torch.equal(gligen["masks"], masks)
        assert torch.equal(gligen["positive_embeddings"], embeddings)


def test_a_grounding_unit_refuses_settings_it_cannot_apply():
    from adapters.gligen import GligenAdapter
    from lightning_modules.backbone import build_tiny_backbone

    gligen = GligenAdapter.from_unet(build_tiny_backbone().unet)
    grounding = GroundingCondition(
        boxes=torch.zeros(1, 30, 4), masks=torch.zeros(1, 30), phrase_embeddings=torch.zeros(1, 30, 32)
    )
    for options, named in [
        ({"scale": 0.5}, "scale=0.5"),
        ({"mode": "prompt"}, "mode=prompt"),
        ({"mask": torch.ones(1, 1, 8, 8)}, "mask"),
    ]:
        with pytest.raises(ValueError, match=f"grounding unit \\(GLIGEN\\) takes no {named}"):
            ControlUnit(gligen, grounding, name="boxes", **options)
    # on, off, a window and where guidance's unconditional half stands are what it has
    for scale in (1.0, 0.0):
        ControlUnit(gligen, grounding, scale=scale, start=0.0, end=0.3)
    assert ControlUnit(gligen, grounding, mode="balanced").mode == "balanced"


def test_a_unit_given_no_mode_takes_its_adapters_guidance_mode(shipped):
    from adapters.gligen import GligenAdapter

    assert ControlUnit(trained_controlnet(shipped, seed=1), edge_condition(0)).mode == "balanced"
    gligen = GligenAdapter.from_unet(load_tiny_backbone().unet)
    assert ControlUnit(gligen, gligen_grounding(load_tiny_backbone())).mode == "control"
    assert ControlUnit(None, None).mode == "balanced"


GLIGEN_PHRASES = ["red circle", "blue square"]
GLIGEN_BOXES = [[0.05, 0.1, 0.45, 0.5], [0.5, 0.45, 0.95, 0.9]]


def gligen_grounding(backbone, batch: int = len(PROMPTS), slots: int = 30) -> GroundingCondition:
    """GLIGEN_PHRASES in GLIGEN_BOXES for each of ``batch`` prompts, padded to ``slots`` as diffusers' pipeline."""
    boxes, masks = torch.zeros(batch, slots, 4), torch.zeros(batch, slots)
    boxes[:, : len(GLIGEN_BOXES)] = torch.tensor(GLIGEN_BOXES)
    masks[:, : len(GLIGEN_BOXES)] = 1.0
    embeddings = torch.zeros(batch, slots, backbone.unet.config.cross_attention_dim)
    embeddings[:, : len(GLIGEN_PHRASES)] = backbone.encode_phrases(GLIGEN_PHRASES)
    return GroundingCondition(boxes=boxes, masks=masks, phrase_embeddings=embeddings)


def trained_gligen(seed: int):
    """A fresh shipped backbone (GLIGEN changes its UNet in place) with GLIGEN's gates and null tokens moved."""
    from adapters.gligen import GligenAdapter

    backbone = load_tiny_backbone()
    torch.manual_seed(seed)  # GLIGEN's layers draw their initial weights from the global generator
    adapter = GligenAdapter.from_unet(backbone.unet).eval()
    generator = torch.Generator().manual_seed(seed)
    for fuser in adapter.fusers:
        fuser.alpha_attn.data.fill_(2.0)  # open, so grounding changes the image well beyond numerical noise
        fuser.alpha_dense.data.fill_(0.5)
        fuser.attn.to_out[0].weight.data.mul_(4.0)
    for null in (adapter.position_net.null_positive_feature, adapter.position_net.null_position_feature):
        null.data.copy_(torch.randn(null.shape, generator=generator))
    return backbone, adapter


@pytest.mark.parametrize("beta", [0.5, 1.0])
def test_one_gligen_equals_diffusers_gligen_pipeline(beta):
    from diffusers import StableDiffusionGLIGENPipeline

    backbone, adapter = trained_gligen(seed=0)
    condition = gligen_grounding(backbone)
    ours = sample(backbone, composition=Composition([ControlUnit(adapter, condition, end=beta)]))

    components = {k: v for k, v in backbone.to_pipeline().components.items() if k != "image_encoder"}
    pipeline = StableDiffusionGLIGENPipeline(**components)
    pipeline.scheduler = make_scheduler("unipc", backbone.noise_scheduler.config)
    pipeline.set_progress_bar_config(disable=True)
    theirs = pipeline(
        PROMPTS,
        gligen_phrases=GLIGEN_PHRASES,
        gligen_boxes=GLIGEN_BOXES,
        gligen_scheduled_sampling_beta=beta,
        height=64,
        width=64,
        num_inference_steps=6,
        guidance_scale=5.0,
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
    ).images
    assert ours.shape == theirs.shape == (2, 3, 64, 64)
    assert (ours - theirs).abs().max() <= 1e-3
    # the routing is what makes them equal: grounding on both halves of guidance gives another image
    balanced = sample(backbone, composition=Composition([ControlUnit(adapter, condition, end=beta, mode="balanced")]))
    assert (balanced - theirs).abs().max() > 2e-2


def test_gligen_control_mode_gives_the_unconditional_half_null_grounding():
    """What the UNet gets under guidance is, value for value, the adapter's own output for the condition on the
    conditional half, and for the null condition (every slot empty) on the unconditional half in control mode."""
    backbone, adapter = trained_gligen(seed=0)
    condition = gligen_grounding(backbone)
    latents, hidden = torch.randn(2, 4, 16, 16), backbone.encode_prompts(PROMPTS)
    inputs = {"noisy_latents": latents, "timesteps": torch.tensor(500), "encoder_hidden_states": hidden}
    own = adapter(condition, **inputs)["cross_attention_kwargs"]["gligen"]
    null = adapter(adapter.drop_condition(condition, torch.ones(2, dtype=bool)), **inputs)
    null = null["cross_attention_kwargs"]["gligen"]
    assert null["masks"].sum() == 0 and own["masks"].sum() == 2 * len(GLIGEN_BOXES)
    for mode, unconditional in [("control", null), ("balanced", own)]:
        gligen = unit_kwargs(backbone, ControlUnit(adapter, condition, mode=mode))["cross_attention_kwargs"]["gligen"]
        assert set(gligen) == set(own)
        for key, value in gligen.items():
            assert value.shape[0] == 4, key
            assert torch.equal(value[:2], unconditional[key]), (mode, key)
            assert torch.equal(value[2:], own[key]), (mode, key)
