"""The multi-condition ControlNet (adapters/multi_condition.py): training keeps a random, never empty subset of
each item's parts (maps and presence planes zeroed together, from the step's generators), parts the data left out
stay out, the parts are saved beside the weights, and a mismatched layout is a one-line error."""

from __future__ import annotations

import pytest
import torch

from adapters.multi_condition import MultiConditionControlNetAdapter
from adapters.registry import load_adapter
from lightning_modules.backbone import build_tiny_backbone
from lightning_modules.step_inputs import item_generators

PARTS = {"part_names": ["edges", "depth", "mask"], "part_channels": [1, 2, 1]}


def build(**options) -> MultiConditionControlNetAdapter:
    unet = build_tiny_backbone().unet
    return MultiConditionControlNetAdapter.from_unet(unet, vae_scale_factor=4, **PARTS, **options)


def full_condition(batch: int) -> torch.Tensor:
    maps = torch.rand(batch, 4, 16, 16, generator=torch.Generator().manual_seed(0)) + 0.1  # nowhere zero
    return torch.cat([maps, torch.ones(batch, 3, 16, 16)], dim=1)


# channels of each part in the stacked map: its map channels and its presence plane
CHANNELS = {"edges": [0, 4], "depth": [1, 2, 5], "mask": [3, 6]}


def kept_parts(condition: torch.Tensor) -> list[set[str]]:
    """Per item, the parts whose channels are all given (and check no part is half kept)."""
    result = []
    for item in condition:
        present = {name: [bool(item[c].abs().sum() > 0) for c in channels] for name, channels in CHANNELS.items()}
        assert all(len(set(flags)) == 1 for flags in present.values())  # map and presence go together
        result.append({name for name, flags in present.items() if flags[0]})
    return result


def test_training_keeps_a_random_never_empty_subset_of_parts():
    adapter = build(keep_probability=0.5)
    condition = full_condition(64)
    kept = kept_parts(adapter.training_condition(condition, torch.Generator().manual_seed(0)))
    assert all(kept)  # never none
    subsets = {frozenset(parts) for parts in kept}
    assert len(subsets) == 7  # every non-empty subset of three parts appears in 64 items
    singles = sum(len(parts) == 1 for parts in kept)
    assert 8 <= singles <= 40  # 3/8 of the items expected
    # kept parts are unchanged, not rescaled
    out = adapter.training_condition(condition, torch.Generator().manual_seed(0))
    assert torch.equal(out[out != 0], condition[out != 0])


def test_the_subsets_follow_the_item_generators_not_the_batch():
    adapter = build()
    condition = full_condition(6)
    whole = adapter.training_condition(condition, item_generators(0, 0, range(6)))
    halves = [adapter.training_condition(condition[i : i + 3], item_generators(0, 0, range(i, i + 3))) for i in (0, 3)]
    assert torch.equal(whole, torch.cat(halves))
    again = adapter.training_condition(condition, item_generators(0, 0, range(6)))
    assert torch.equal(whole, again)
    assert not torch.equal(whole, adapter.training_condition(condition, item_generators(0, 1, range(6))))


def test_keep_probability_one_keeps_everything_and_absent_parts_stay_absent():
    condition = full_condition(4)
    assert torch.equal(build(keep_probability=1.0).training_condition(condition, None), condition)
    only_edges = condition.clone()
    only_edges[:, [1, 2, 3, 5, 6]] = 0  # the data gave edges alone
    out = build(keep_probability=0.5).training_condition(only_edges, torch.Generator().manual_seed(3))
    assert kept_parts(out) == [{"edges"}] * 4  # kept even when the draw dropped it: an item keeps a part


def test_single_probability_makes_items_keep_one_of_their_given_parts():
    condition = full_condition(90)
    condition[:30, [0, 4]] = 0  # the first 30 items come without edges
    kept = kept_parts(build(single_probability=1.0).training_condition(condition, torch.Generator().manual_seed(0)))
    assert all(len(parts) == 1 for parts in kept)
    assert all(parts != {"edges"} for parts in kept[:30])  # a part the data left out is never the one kept
    counts = {name: sum(parts == {name} for parts in kept) for name in CHANNELS}
    assert all(counts[name] >= 18 for name in CHANNELS), counts  # each alike: 20 / 35 / 35 expected
    mixed = kept_parts(build(single_probability=0.5).training_condition(condition, torch.Generator().manual_seed(0)))
    assert 50 <= sum(len(parts) == 1 for parts in mixed) <= 85  # half single, plus the subsets' own singles
    # 0 draws nothing more than one number per part and item: later draws of the step are those of earlier runs
    generator, reference = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    build(single_probability=0.0).training_condition(condition, generator)
    [torch.rand(90, generator=reference) for _ in CHANNELS]
    assert torch.equal(generator.get_state(), reference.get_state())
    with pytest.raises(ValueError, match="single_probability must be in"):
        build(single_probability=1.5)


def test_single_weights_choose_which_part_single_items_keep():
    condition = full_condition(300)
    condition[:100, [0, 4]] = 0  # the first 100 items come without edges
    generator = torch.Generator().manual_seed(0)
    kept = kept_parts(build(single_probability=1.0, single_weights=[8, 1, 1]).training_condition(condition, generator))
    assert all(parts != {"edges"} for parts in kept[:100])  # a weight never brings back a part the data left out
    edges = sum(parts == {"edges"} for parts in kept[100:])
    assert 140 <= edges <= 180, edges  # 8/10 of the 200 items with edges expected: 160
    # equal weights are the default: the same parts from the same draws
    alike = build(single_probability=1.0).training_condition(condition, torch.Generator().manual_seed(1))
    weighted = build(single_probability=1.0, single_weights=[2, 2, 2])
    assert torch.equal(alike, weighted.training_condition(condition, torch.Generator().manual_seed(1)))
    for bad in ([1, 1], [1, 0, 1]):
        with pytest.raises(ValueError, match="single_weights must give one positive weight per part"):
            build(single_weights=bad)


def test_parts_are_saved_and_loaded_back(tmp_path):
    adapter = build()
    adapter.save_pretrained(tmp_path / "multi")
    loaded, found = load_adapter(tmp_path / "multi", build_tiny_backbone().unet)
    assert isinstance(loaded, MultiConditionControlNetAdapter) and found.startswith("multi-condition ControlNet")
    assert (loaded.part_names, loaded.part_channels) == (PARTS["part_names"], PARTS["part_channels"])


def test_a_condition_without_parts_is_a_one_line_error():
    with pytest.raises(ValueError, match="needs a condition with parts: use condition=multi"):
        MultiConditionControlNetAdapter.from_unet(build_tiny_backbone().unet, vae_scale_factor=4)
    plain = build().controlnet
    with pytest.raises(ValueError, match=r"takes 9 channels; the ControlNet takes 7"):
        MultiConditionControlNetAdapter(plain, ["a", "b"], [3, 4])
    with pytest.raises(ValueError, match="keep_probability must be in"):
        build(keep_probability=0.0)


def test_training_it_without_a_multi_condition_is_a_one_line_error(make_train_config):
    from lightning_modules.commands.train import train
    from lightning_modules.errors import CtrlkitError

    with pytest.raises(CtrlkitError, match=r"adapter=controlnet_multi: .* needs a condition with parts"):
        train(make_train_config("adapter=controlnet_multi", "trainer.max_steps=1"))
