"""Every sample exactly once, deterministically, across ranks and workers: shards of uneven
sizes, an empty shard, fewer shards than ranks x workers, fewer samples than ranks; with the
global shuffle and with the shard-by-shard (grouped) order used for remote shards larger
than the shard cache."""

from __future__ import annotations

import warnings
from collections import Counter

import pytest
import torch

from conftest import make_image_folder
from shard_helpers import folder_items, write_shards

import transferkit as tk
from transferkit.data import eval_transform, prepare_data
from transferkit.train.loaders import EpochSampler, make_loader


class Keys(torch.utils.data.Dataset):
    """Item ``i`` is ``(i, key i)``: what a loader delivered, without decoding; ``grouped``: the
    samples ask to be drawn shard by shard, as remote shards larger than the shard cache do."""

    def __init__(self, ds, grouped: bool = False) -> None:
        self.keys = ds.keys
        self.groups = ds.source.shard_of[ds.indices] if grouped else None

    def sample_groups(self):
        return self.groups

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, i):
        return i, 0


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("s")
    items = folder_items(make_image_folder(tmp / "img", per_class=11))  # 22 samples
    write_shards(items, tmp / "s", [13, 0, 2, 7])  # uneven, one empty; 3 shards < 2 ranks x 2 workers
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return prepare_data(str(tmp / "s"), val_split=0).train


def _epoch(ds, *, rank, world, workers, shuffle, pad=True, epoch=0, drop_last=False, batch_size=4, grouped=False):
    dl = make_loader(Keys(ds, grouped), batch_size=batch_size, shuffle=shuffle, device=torch.device("cpu"),
                     num_workers=workers, seed=7, rank=rank, world_size=world, pad=pad, drop_last=drop_last)
    dl.sampler.set_epoch(epoch)
    return [b[0].tolist() for b in dl]


@pytest.mark.parametrize("grouped", [False, True])
@pytest.mark.parametrize("world", [1, 2, 3, 5])
def test_training_epoch_covers_every_sample_with_equal_batches_per_rank(shards, world, grouped):
    n = len(shards)
    per_rank = [_epoch(shards, rank=r, world=world, workers=0, shuffle=True, grouped=grouped) for r in range(world)]
    assert len({len(b) for b in per_rank}) == 1  # the same number of batches on every rank: no DDP hang
    seen = Counter(i for batches in per_rank for b in batches for i in b)
    assert set(seen) == set(range(n))  # every sample
    assert sum(seen.values()) - n == (-n) % world  # padding repeats only what evens the ranks out


@pytest.mark.parametrize("grouped", [False, True])
@pytest.mark.parametrize("world", [2, 3, 5, 30])
def test_validation_sees_each_sample_exactly_once(shards, world, grouped):
    n = len(shards)
    per_rank = [_epoch(shards, rank=r, world=world, workers=0, shuffle=False, pad=False, grouped=grouped)
                for r in range(world)]
    seen = Counter(i for batches in per_rank for b in batches for i in b)
    assert seen == Counter(range(n))


@pytest.mark.parametrize("grouped", [False, True])
def test_order_depends_on_seed_and_epoch_not_on_workers(shards, grouped):
    a = _epoch(shards, rank=1, world=2, workers=0, shuffle=True, epoch=3, grouped=grouped)
    b = _epoch(shards, rank=1, world=2, workers=2, shuffle=True, epoch=3, grouped=grouped)
    assert a == b
    assert a != _epoch(shards, rank=1, world=2, workers=0, shuffle=True, epoch=4, grouped=grouped)


@pytest.mark.parametrize("world", [1, 2, 3])
def test_grouped_order_reads_each_shard_in_one_stretch(shards, world):
    shard_of = shards.source.shard_of[shards.indices]
    orders = set()
    for epoch in range(4):
        per_rank = [[i for b in _epoch(shards, rank=r, world=world, workers=0, shuffle=True, epoch=epoch,
                                       grouped=True) for i in b] for r in range(world)]
        n = len(shards)
        stream = [i for order in per_rank for i in order][:n]  # the ranks' slices, in rank order, unpadded
        runs = [int(shard_of[i]) for k, i in enumerate(stream) if k == 0 or shard_of[i] != shard_of[stream[k - 1]]]
        assert len(runs) == len(set(runs)) == 3  # each non-empty shard in one stretch: fetched once per epoch
        orders.add(tuple(runs))
    assert len(orders) > 1  # the shard order changes with the epoch


def test_fewer_samples_than_ranks_still_gives_every_rank_a_batch():
    samplers = [EpochSampler(2, shuffle=True, rank=r, world_size=5) for r in range(5)]
    assert [len(s) for s in samplers] == [len(list(s)) for s in samplers] == [1] * 5
    assert sorted({i for s in samplers for i, _ in s}) == [0, 1]


def test_shard_images_decoded_in_workers_arrive_in_sampler_order(shards):
    ds = shards.view(transform=eval_transform(tk.InputSpec(image_size=8)))
    a = [y.tolist() for _, y in make_loader(ds, batch_size=5, shuffle=True, device=torch.device("cpu"),
                                            num_workers=0, seed=1)]
    b = [y.tolist() for _, y in make_loader(ds, batch_size=5, shuffle=True, device=torch.device("cpu"),
                                            num_workers=2, seed=1)]
    assert a == b
