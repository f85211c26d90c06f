"""The one shard rule of every loader (fastvae/data/sharding.py): N x B/N sees the global batches of 1 x B."""

import pytest

from fastvae.data.loaders import TorchTrainLoader
from fastvae.data.memory import MemoryTrainLoader, in_memory_tensors
from helpers import CPU, tiny_image_dataset as dataset, tiny_memory_loader as loader
from fastvae.data.sharding import ShardPlan




@pytest.mark.parametrize("drop_last", [True, False])
def test_memory_and_torch_loaders_shard_1xB_global_batches_among_N_ranks(drop_last):
    data, batch = dataset(100), 12  # 100 images: no world size x batch divides them
    loaders = {
        "memory": lambda r, w: MemoryTrainLoader(in_memory_tensors(data), batch // w, 5, CPU, drop_last, rank=r,
                                              world_size=w),
        "torch": lambda r, w: TorchTrainLoader(data, ShardPlan(len(data), batch // w, 5, r, w, drop_last), CPU, 0),
    }
    single = epoch_ids(loaders["memory"], 1)[0]
    for name, make in loaders.items():
        for world in (1, 2, 3):
            ranks = epoch_ids(make, world)
            assert len({len(r) for r in ranks}) == 1, f"{name}: every rank gets the same number of batches"
            steps = list(zip(*ranks))
            assert [sum(shares, []) for shares in steps] == single, f"{name} x {world}: the 1 x B global batches"
            seen = [i for r in ranks for b in r for i in b]
            assert len(seen) == len(set(seen)), f"{name}: no image twice in an epoch"
    if not drop_last:
        assert sorted(sum(single, [])) == list(range(100))  # nothing dropped: the last batch is 100 % 12 = 4


def test_the_last_global_batch_is_dropped_when_smaller_than_the_world():
    plan = ShardPlan(images=25, batch_size=4, seed=0, rank=0, world_size=3, drop_last=False)
    assert len(plan) == 2  # 2 x 12 images, then 1 image for 3 ranks: dropped
    assert len(ShardPlan(27, 4, 0, 0, 3, drop_last=False)) == 3  # 3 images: one each


def test_order_is_a_function_of_seed_and_epoch():
    a, b = loader(dataset()), loader(dataset())
    first = [i.tolist() for _, _, i in a]
    assert first == [i.tolist() for _, _, i in b]
    a.set_epoch(1)
    assert [i.tolist() for _, _, i in a] != first


def test_two_ranks_get_disjoint_equal_shards_of_every_global_batch():
    data = dataset(100)
    ranks = [loader(data, rank=r, world_size=2) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == 100 // 16
    seen = [[i.tolist() for _, _, i in r] for r in ranks]
    for a, b in zip(*seen):
        assert len(a) == len(b) == 8 and not set(a) & set(b)
    single = [i.tolist() for _, _, i in loader(data, batch=16)]
    assert [a + b for a, b in zip(*seen)] == single  # the same global batches as one process x 16


def test_last_partial_batch_is_split_evenly_or_dropped():
    data = dataset(37)  # 2 full global batches of 16, then 5 images
    ranks = [loader(data, rank=r, world_size=2, drop_last=False) for r in (0, 1)]
    sizes = [[len(i) for _, _, i in r] for r in ranks]
    assert sizes == [[8, 8, 3], [8, 8, 2]]
    ids = sorted(i for r in ranks for _, _, idx in r for i in idx.tolist())
    assert ids == list(range(37))  # every image once
    few = [loader(dataset(33), rank=r, world_size=2, drop_last=False) for r in (0, 1)]
    assert len(few[0]) == len(few[1]) == 2  # 1 image left for 2 ranks: dropped, not a hang


def epoch_ids(make_loader, world):
    """[rank][batch] -> sample ids of one epoch."""
    return [[ids.tolist() for _, _, ids in make_loader(rank, world)] for rank in range(world)]
