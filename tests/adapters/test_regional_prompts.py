"""Regional prompts: inside a box the cross-attention reads the box's phrase, outside it the prompt; no box, no
change; the option is saved, loaded and asks for the phrases' contexts, which the backbone encodes as prompts."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from adapters import GroundingCondition
from adapters.gligen_masked import BoxMaskedGligenAdapter
from adapters.regional_prompts import RegionalAttnProcessor, RegionalPrompts
from lightning_modules.backbone import build_tiny_backbone
from tests.adapters.test_gligen_masked import TOP_LEFT, grounding, open_gates, unet_output

WHOLE_IMAGE = [0.0, 0.0, 1.0, 1.0]


def with_contexts(condition: GroundingCondition, seed: int = 5) -> GroundingCondition:
    """``condition`` with random phrase contexts (B, N, 32, 64), the tiny text encoder's shape."""
    generator = torch.Generator().manual_seed(seed)
    contexts = torch.randn(*condition.masks.shape, 32, 64, generator=generator)
    return condition.with_embeddings(condition.phrase_embeddings, contexts)


def test_a_boxed_token_reads_its_phrase_and_the_others_the_prompt():
    attention = Attention(query_dim=8, cross_attention_dim=6, heads=2, dim_head=4, processor=RegionalAttnProcessor())
    generator = torch.Generator().manual_seed(0)
    tokens, prompt = torch.randn(1, 16, 8, generator=generator), torch.randn(1, 5, 6, generator=generator)
    phrases = torch.randn(1, 2, 5, 6, generator=generator)  # two slots; the second is padding
    regions = RegionalPrompts(phrases, torch.tensor([[TOP_LEFT, WHOLE_IMAGE]]), torch.tensor([[1.0, 0.0]]), (4, 4))
    plain = AttnProcessor2_0()
    with torch.no_grad():
        output = attention(tokens, encoder_hidden_states=prompt, regional_prompts=regions)
        from_prompt = plain(attention, tokens, prompt)
        from_phrase = plain(attention, tokens, phrases[:, 0])
    top_left = torch.tensor([0, 1, 4, 5])  # the 4 x 4 grid's cells inside TOP_LEFT
    outside = torch.tensor([i for i in range(16) if i not in top_left.tolist()])
    assert torch.allclose(output[:, top_left], from_phrase[:, top_left], atol=1e-6)
    assert torch.equal(output[:, outside], from_prompt[:, outside])  # the padded whole-image slot is never read
    assert (from_phrase - from_prompt)[:, top_left].abs().max() > 1e-3  # the first check can fail
    self_attention = Attention(query_dim=8, heads=2, dim_head=4, processor=RegionalAttnProcessor())
    with torch.no_grad():  # self-attention ignores the phrases
        assert torch.equal(self_attention(tokens, regional_prompts=regions), plain(self_attention, tokens))


def test_overlapping_boxes_average_their_phrases():
    attention = Attention(query_dim=8, cross_attention_dim=6, heads=2, dim_head=4, processor=RegionalAttnProcessor())
    generator = torch.Generator().manual_seed(1)
    tokens, prompt = torch.randn(1, 16, 8, generator=generator), torch.randn(1, 5, 6, generator=generator)
    phrases = torch.randn(1, 2, 5, 6, generator=generator)
    regions = RegionalPrompts(phrases, torch.tensor([[WHOLE_IMAGE, TOP_LEFT]]), torch.ones(1, 2), (4, 4))
    plain = AttnProcessor2_0()
    with torch.no_grad():
        output = attention(tokens, encoder_hidden_states=prompt, regional_prompts=regions)
        first, second = (plain(attention, tokens, phrases[:, slot]) for slot in (0, 1))
    assert torch.allclose(output[:, 0], (first[:, 0] + second[:, 0]) / 2, atol=1e-6)  # in both boxes
    assert torch.allclose(output[:, 15], first[:, 15], atol=1e-6)  # in the whole-image box only


def test_a_whole_image_box_is_the_unet_prompted_with_its_phrase(tiny_backbone):
    adapter = BoxMaskedGligenAdapter.from_unet(tiny_backbone.unet, regional_prompts=True, export_unet=False)
    condition = with_contexts(grounding([WHOLE_IMAGE]))
    generator = torch.Generator().manual_seed(0)
    latents, prompt = torch.randn(2, 4, 16, 16, generator=generator), torch.randn(2, 32, 64, generator=generator)
    kwargs = adapter(condition, noisy_latents=latents, timesteps=torch.tensor(400), encoder_hidden_states=prompt)
    with torch.no_grad():
        regional = adapter.unet(latents, 400, prompt, **kwargs).sample
        phrase_prompted = adapter.unet(latents, 400, condition.phrase_contexts[:, 0]).sample
        prompted = adapter.unet(latents, 400, prompt).sample
    # the gates are closed at init: every token of every block reads the phrase instead of the prompt
    assert torch.allclose(regional, phrase_prompted, atol=1e-5)
    assert (regional - prompted).abs().max() > 1e-3
    null = adapter(
        condition.drop(torch.tensor([True, True])),
        noisy_latents=latents,
        timesteps=torch.tensor(400),
        encoder_hidden_states=prompt,
    )
    with torch.no_grad():
        assert torch.equal(adapter.unet(latents, 400, prompt, **null).sample, prompted)  # null grounding: no region


def test_the_option_is_saved_loaded_and_asks_for_contexts(tiny_backbone, tmp_path):
    adapter = BoxMaskedGligenAdapter.from_unet(tiny_backbone.unet, regional_prompts=True, export_unet=False)
    open_gates(adapter)
    assert adapter.reads_phrase_contexts
    condition = with_contexts(grounding([TOP_LEFT]))
    expected = unet_output(adapter, condition)
    adapter.save_pretrained(tmp_path / "regional")
    assert json.loads((tmp_path / "regional" / "gligen_config.json").read_text())["regional_prompts"] is True
    loaded = BoxMaskedGligenAdapter.from_pretrained(tmp_path / "regional", build_tiny_backbone(seed=0).unet)
    assert loaded.regional_prompts and torch.equal(unet_output(loaded, condition), expected)
    with pytest.raises(ValueError, match=r"regional_prompts needs the grounding's phrase_contexts"):
        unet_output(loaded, grounding([TOP_LEFT]))
    without = BoxMaskedGligenAdapter.from_unet(build_tiny_backbone(seed=0).unet, export_unet=False)
    assert not without.reads_phrase_contexts and "regional_prompts" not in without.saved_config()


def test_the_backbone_encodes_each_phrase_as_a_prompt(tiny_backbone):
    phrases = [["a red circle", "a blue square", ""], ["a blue square", "", ""]]
    condition = GroundingCondition(torch.rand(2, 3, 4), torch.tensor([[1.0, 1, 0], [1, 0, 0]]), phrases)
    embedded = tiny_backbone.embed_grounding(condition, contexts=True)
    assert embedded.phrase_contexts.shape == (2, 3, 32, 64)
    expected = tiny_backbone.encode_prompts(["a blue square"])[0]
    assert torch.allclose(embedded.phrase_contexts[0, 1], expected, atol=1e-6)
    assert torch.allclose(embedded.phrase_contexts[1, 0], expected, atol=1e-6)
    assert torch.equal(GroundingCondition.cat([embedded, embedded])[3].phrase_contexts, embedded[1].phrase_contexts)
    assert tiny_backbone.embed_grounding(condition).phrase_contexts is None  # only when asked


def test_contexts_of_the_wrong_shape_are_refused():
    boxes, masks = torch.rand(2, 3, 4), torch.ones(2, 3)
    with pytest.raises(ValueError, match=r"phrase_contexts \(2, 2, 32, 64\) do not match \(2, 3, L, D\) slots"):
        GroundingCondition(boxes, masks, phrase_contexts=torch.zeros(2, 2, 32, 64))
    with pytest.raises(ValueError, match=r"phrase_contexts \(2, 3, 64\) do not match"):
        GroundingCondition(boxes, masks, phrase_contexts=torch.zeros(2, 3, 64))
