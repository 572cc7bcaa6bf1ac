"""util/data/samplers.py's RankStickySampler: fixed, balanced shards reshuffled every epoch; and where
util.runtime.build_train_loader uses it."""
import math

import pytest
import torch
from torch.utils.data import DistributedSampler, TensorDataset

import util.runtime
from util.data.samplers import RankStickySampler


def epoch_lists(n, world, epoch, seed=0, labels=None):
    data = range(n)
    samplers = [RankStickySampler(data, world, rank, seed, labels) for rank in range(world)]
    for sampler in samplers:
        sampler.set_epoch(epoch)
    return [list(sampler) for sampler in samplers]


@pytest.mark.parametrize('n, world', [(25, 2), (36, 3), (30, 4)])
def test_every_sample_stays_on_one_rank_and_every_epoch_reshuffles(n, world):
    first = epoch_lists(n, world, 0)
    shards = [set(indices) for indices in first]
    assert set().union(*shards) == set(range(n)) and sum(map(len, shards)) == n  # a partition: each sample once
    assert max(map(len, shards)) - min(map(len, shards)) <= 1
    for epoch in (1, 2, 3):
        lists = epoch_lists(n, world, epoch)
        assert [set(indices) for indices in lists] == shards  # the same samples on the same rank
        assert all(len(indices) == math.ceil(n / world) for indices in lists)  # equal steps: short shards repeat
        assert all(len(set(indices)) == len(shard) for indices, shard in zip(lists, shards))
        assert lists != first  # a new order
    assert epoch_lists(n, world, 2) == epoch_lists(n, world, 2)  # a restarted run replays an epoch exactly
    assert [set(x) for x in epoch_lists(n, world, 0, seed=1)] != shards


def test_shards_are_balanced_per_class():
    labels = [0] * 10 + [1] * 8 + [2] * 5
    shards = [set(indices) for indices in epoch_lists(len(labels), 4, 0, labels=labels)]
    for cls in range(3):
        counts = [sum(labels[i] == cls for i in shard) for shard in shards]
        assert max(counts) - min(counts) <= 1, (cls, counts)


def test_bad_rank_is_a_clear_error():
    with pytest.raises(ValueError, match=r'rank 2 is not in \[0, 2\)'):
        RankStickySampler(range(4), 2, 2)


def test_the_loader_is_rank_sticky_only_with_several_processes(monkeypatch):
    data = TensorDataset(torch.arange(8))
    data.targets = [0, 1] * 4
    kinds = {}
    for world in (1, 2):
        monkeypatch.setattr(util.runtime, 'get_world_size', lambda: world)
        monkeypatch.setattr(util.runtime, 'get_rank', lambda: world - 1)
        for sticky in (False, True):
            kinds[world, sticky] = util.runtime.build_train_loader(data, 2, 0, False, 0, rank_sticky=sticky).sampler
    assert isinstance(kinds[2, True], RankStickySampler) and kinds[2, True].rank == 1
    assert all(isinstance(kinds[key], DistributedSampler) for key in ((1, False), (1, True), (2, False)))
    shard = [data.targets[i] for i in kinds[2, True].shard]
    assert sorted(shard) == [0, 0, 1, 1]  # the labels were used
