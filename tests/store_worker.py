"""Worker for tests/test_feature_store_ddp.py: one process of a job of two simulated nodes
(two torchrun launches on 127.0.0.1, gloo, CPU), one process each.

Usage: ``torchrun --nnodes=2 --nproc_per_node=1 ... tests/store_worker.py <store dir> <out dir>``.

Each rank extracts its parts of a 1,000-sample dataset into the shared store, waits for the
others, trains a linear head under DDP from ``store.batches(..., rank, world_size)`` for two
epochs and saves ``<out>/rank<r>.pt``: its head weights, its store report and its default
DataLoader worker count.
"""

import os
import sys
import traceback

import torch
import torch.distributed as dist

from transferkit.train.distributed import exit_cleanly
from transferkit.train.feature_store import ShardedFeatureStore, extract_parts
from transferkit.train.loaders import default_num_workers


def data() -> torch.utils.data.TensorDataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1000, 6, generator=g)
    return torch.utils.data.TensorDataset(x, (x[:, 0] + x[:, 1] > 0).long())


def features(x: torch.Tensor) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    w = torch.randn(6, 16, generator=g)
    return torch.tanh(x @ w)


class Files:
    samples: list = []


def main(store_dir: str, out: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    ds = data()
    store = ShardedFeatureStore.open(store_dir, "k", num_samples=len(ds), part_size=96, dim=16)
    extract_parts(store, ds, features, batch_size=32, rank=rank, world_size=world)
    dist.barrier()
    torch.manual_seed(0)
    head = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(16, 2))
    opt = torch.optim.SGD(head.parameters(), lr=0.2)
    batches = store.batches(25, seed=0, memory_budget=4096, rank=rank, world_size=world)  # blocks mode
    for epoch in range(2):
        batches.set_epoch(epoch)
        for x, y in batches:
            opt.zero_grad()
            torch.nn.functional.cross_entropy(head(x), y).backward()
            opt.step()
    torch.save({"weights": head.module.state_dict(), "report": store.report(), "mode": batches.mode,
                "workers": default_num_workers(Files(), world_size=world),
                "local_world": os.environ.get("LOCAL_WORLD_SIZE")}, os.path.join(out, f"rank{rank}.pt"))


if __name__ == "__main__":
    try:
        main(sys.argv[1], sys.argv[2])
    except BaseException:
        traceback.print_exc()
        exit_cleanly(1)
    exit_cleanly()
