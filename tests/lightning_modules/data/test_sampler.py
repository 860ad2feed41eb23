"""The resumable training order split over processes, and per-item random draws."""

from __future__ import annotations

import pytest
import torch

from lightning_modules.data.common import ResumableDataLoader, ResumableSampler
from lightning_modules.errors import CtrlkitError
from lightning_modules.step_inputs import item_generators, rand, randint, randn


def test_ranks_take_disjoint_shares_that_together_are_one_processes_order():
    one = list(ResumableSampler(30, seed=5))
    ranks = [list(ResumableSampler(30, seed=5, num_replicas=3, rank=rank)) for rank in range(3)]
    assert [len(shard) for shard in ranks] == [10, 10, 10]
    # batch k of every rank (size 2) together = batch k of one process (size 6): the same items in the same step
    for k in range(5):
        together = sorted(item for shard in ranks for item in shard[2 * k : 2 * k + 2])
        assert together == sorted(one[6 * k : 6 * k + 6])


def test_items_beyond_a_multiple_of_the_world_size_are_left_out_not_repeated():
    shards = [list(ResumableSampler(11, seed=0, num_replicas=2, rank=rank)) for rank in range(2)]
    seen = shards[0] + shards[1]
    assert len(seen) == 10 and len(set(seen)) == 10


@pytest.mark.parametrize("resumed_world", [1, 2, 4])
def test_the_saved_position_counts_all_processes_and_resumes_on_any_number_of_them(resumed_world):
    # two processes consumed 3 batches of 2 each: 12 items of the epoch
    samplers = [ResumableSampler(40, seed=1, num_replicas=2, rank=rank) for rank in range(2)]
    loaders = [ResumableDataLoader(list(range(40)), batch_size=2, sampler=sampler) for sampler in samplers]
    for sampler in samplers:
        iter(sampler)
        sampler.consumed = 6
    state = loaders[0].state_dict()
    assert state["consumed"] == 12
    rest = []
    for rank in range(resumed_world):
        sampler = ResumableSampler(40, seed=1, num_replicas=resumed_world, rank=rank)
        ResumableDataLoader(list(range(40)), batch_size=2, sampler=sampler).load_state_dict(state)
        rest += list(sampler)
    assert sorted(rest) == sorted(list(ResumableSampler(40, seed=1))[12:])


def test_a_sampler_refuses_a_rank_outside_the_world_and_too_few_items():
    with pytest.raises(CtrlkitError, match="rank 2"):
        ResumableSampler(10, num_replicas=2, rank=2)
    with pytest.raises(CtrlkitError, match="3 training items cannot be split over 4"):
        ResumableSampler(3, num_replicas=4, rank=0)


def test_per_item_draws_do_not_depend_on_the_batch():
    batch = item_generators(seed=0, epoch=2, indices=[7, 3, 9])
    alone = item_generators(seed=0, epoch=2, indices=[3])
    noise, steps, u = randn((3, 4, 2, 2), batch), randint(1000, 3, batch), rand(3, batch)
    assert torch.equal(noise[1:2], randn((1, 4, 2, 2), alone))
    assert torch.equal(steps[1:2], randint(1000, 1, alone))
    assert torch.equal(u[1:2], rand(1, alone))
    # another epoch, another seed or another item: other numbers
    for other in ([0, 3, [3]], [1, 2, [3]], [0, 2, [4]]):
        assert not torch.equal(noise[1:2], randn((1, 4, 2, 2), item_generators(other[0], other[1], other[2])))
    with pytest.raises(CtrlkitError, match="2 item generators for a batch of 3"):
        randn((3, 1), item_generators(0, 0, [1, 2]))
