"""GroundingCondition: construction from padded slots, batching (index, expand, concatenate), moving, dropping."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from adapters import GroundingCondition
from adapters.composition import _batch_twice, _concatenate
from conditions.boxes import GroundingRecord, pad_grounding


def padded(boxes: list[list[float]], phrases: list[str], slots: int = 4) -> GroundingCondition:
    return GroundingCondition.from_slots(**pad_grounding(GroundingRecord(np.array(boxes), phrases), slots))


def two_images() -> GroundingCondition:
    return GroundingCondition.cat(
        [padded([[0.1, 0.1, 0.5, 0.5]], ["red circle"]), padded([[0.2, 0.3, 0.9, 0.8]] * 2, ["a", "b"])]
    )


def test_padded_slots_become_a_batch_of_one():
    condition = padded([[0.1, 0.2, 0.5, 0.6], [0.5, 0.5, 1.0, 1.0]], ["red circle", "blue square"])
    assert len(condition) == 1 and condition.num_slots == 4
    assert condition.boxes.shape == (1, 4, 4) and condition.boxes.dtype == torch.float32
    torch.testing.assert_close(condition.boxes[0, 1], torch.tensor([0.5, 0.5, 1.0, 1.0]))
    assert condition.boxes[0, 2:].abs().sum() == 0
    assert condition.masks.tolist() == [[1.0, 1.0, 0.0, 0.0]]
    assert condition.phrases == [["red circle", "blue square", "", ""]] and condition.phrase_embeddings is None
    boxes, phrases = condition.filled_slots()[0]
    assert boxes.shape == (2, 4) and phrases == ["red circle", "blue square"]


def test_shapes_are_checked():
    with pytest.raises(ValueError, match=r"boxes \(B, N, 4\) and masks \(B, N\)"):
        GroundingCondition(boxes=torch.zeros(2, 3, 4), masks=torch.zeros(2, 4))
    with pytest.raises(ValueError, match="2 lists of 3 strings"):
        GroundingCondition(boxes=torch.zeros(2, 3, 4), masks=torch.zeros(2, 3), phrases=[["a"] * 3])
    with pytest.raises(ValueError, match=r"do not match \(2, 3, D\)"):
        GroundingCondition(boxes=torch.zeros(2, 3, 4), masks=torch.zeros(2, 3), phrase_embeddings=torch.zeros(2, 8))


def test_concatenate_index_and_expand():
    condition = two_images().with_embeddings(torch.arange(2 * 4 * 3, dtype=torch.float32).view(2, 4, 3))
    assert len(condition) == 2 and condition.phrases[1] == ["a", "b", "", ""]
    second = condition[1]
    assert len(second) == 1 and second.phrases == [condition.phrases[1]]
    assert torch.equal(second.boxes, condition.boxes[1:])
    assert torch.equal(second.phrase_embeddings[0], condition.phrase_embeddings[1])
    assert condition[-1].phrases == second.phrases
    with pytest.raises(IndexError):
        condition[2]
    reordered = condition[torch.tensor([1, 0])]
    assert reordered.phrases == condition.phrases[::-1] and torch.equal(reordered.masks, condition.masks.flip(0))
    expanded = second.expand(3)
    assert len(expanded) == 3 and expanded.phrases == [condition.phrases[1]] * 3
    assert torch.equal(expanded.phrase_embeddings, condition.phrase_embeddings[1:].expand(3, -1, -1))
    with pytest.raises(ValueError, match="only a batch of one"):
        condition.expand(4)
    # without embeddings on one side, the stack has none (they would not line up with the batch)
    assert GroundingCondition.cat([condition, two_images()]).phrase_embeddings is None


def test_guidance_stacks_both_halves_row_for_row():
    """The sampler's classifier-free guidance batch: [unconditional; conditional], phrases one row per image."""
    condition = two_images().with_embeddings(torch.randn(2, 4, 3))
    null = condition.drop(torch.ones(2, dtype=torch.bool))
    stacked = _concatenate(null, condition)
    assert isinstance(stacked, GroundingCondition) and len(stacked) == 4
    assert stacked.phrases == condition.phrases * 2
    assert stacked.masks[:2].sum() == 0 and torch.equal(stacked.masks[2:], condition.masks)
    assert torch.equal(stacked.boxes, torch.cat([condition.boxes, condition.boxes]))
    assert torch.equal(stacked.phrase_embeddings[2:], condition.phrase_embeddings)
    assert _batch_twice(condition).phrases == condition.phrases * 2


def test_drop_empties_only_the_dropped_items():
    condition = two_images()
    dropped = condition.drop(torch.tensor([False, True]))
    assert torch.equal(dropped.masks[0], condition.masks[0]) and dropped.masks[1].sum() == 0
    # the null condition keeps boxes and phrases: an empty slot is empty whatever they say
    assert torch.equal(dropped.boxes, condition.boxes) and dropped.phrases == condition.phrases
    assert condition.masks[1].sum() == 2  # not changed in place


def test_to_moves_and_casts_the_tensors_and_keeps_the_phrases():
    condition = two_images().with_embeddings(torch.randn(2, 4, 3))
    half = condition.to("cpu", torch.float16)
    assert half.boxes.dtype == half.masks.dtype == half.phrase_embeddings.dtype == torch.float16
    assert half.phrases == condition.phrases and condition.boxes.dtype == torch.float32
    moved = condition.to(torch.device("meta"))
    assert moved.boxes.device.type == moved.masks.device.type == moved.phrase_embeddings.device.type == "meta"
    assert moved.boxes.dtype == torch.float32
