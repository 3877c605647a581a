"""Worker for tests/test_feature_store_ddp.py: ``finetune`` on one of two simulated nodes (two
torchrun launches on 127.0.0.1 with c10d rendezvous, gloo, one process each) with a shared
``cache_dir``.

Usage: ``torchrun --nnodes=2 --nproc_per_node=1 --rdzv-backend=c10d ... tests/store_finetune_worker.py
<image folder> <cache dir> <out dir>`` (``{node}`` in the cache dir: the node's number, for a
cache_dir local to each node); saves ``<out>/rank<r>.pt``: the head's weights and the
run's ``feature_report``.
"""

import os
import sys
import traceback

import torch

import transferkit as tk
import transferkit.train.feature_store as feature_store
from transferkit.train.distributed import exit_cleanly

RUN = dict(weights=None, image_size=16, device="cpu", num_workers=0, seed=0, verbose=False, epochs=2, batch_size=4,
           precision="fp32", policy="feature_extraction", optimizer="sgd", lr=0.05, restore_best=False)
PART_ROWS = 4  # a tiny folder in several parts


def main(data: str, cache: str, out: str) -> None:
    torch.set_num_threads(1)
    feature_store.MIN_PART_ROWS = PART_ROWS
    r = tk.finetune("tk:small_cnn", data=data, cache_dir=cache.format(node=os.environ["GROUP_RANK"]), **RUN)
    torch.save({"head": r.model.head.state_dict(), "report": r.feature_report},
               os.path.join(out, f"rank{os.environ['RANK']}.pt"))


if __name__ == "__main__":
    try:
        main(*sys.argv[1:4])
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
        exit_cleanly(1)
    exit_cleanly()
