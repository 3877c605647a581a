"""Worker for tests/test_train_ddp.py, launched by ``torchrun --nproc_per_node=2`` (gloo, CPU).

Usage: ``torchrun --nproc_per_node=2 tests/ddp_worker.py <image folder> <out dir>``. Each rank
runs two finetune() calls and saves its final weights to ``<out>/<name>_rank<r>.pt``:
``cached`` (frozen backbone, cached features, head under DDP) and ``gradual`` (images every
epoch, gradual unfreezing: one more block per epoch, the DDP wrapper rebuilt at each unfreeze).
"""

import os
import sys

import torch

import transferkit as tk
from transferkit.train.distributed import exit_cleanly


def main() -> None:
    torch.set_num_threads(1)
    data, out = sys.argv[1], sys.argv[2]
    rank = int(os.environ["RANK"])
    common = dict(weights=None, data=data, image_size=32, device="cpu", num_workers=0, seed=0, verbose=False)
    r = tk.finetune("tk:small_cnn", policy="feature_extraction", epochs=3, batch_size=4, lr=0.05, optimizer="sgd",
                    restore_best=False, **common)
    torch.save({"state": r.model.state_dict(), "history": r.history}, os.path.join(out, f"cached_rank{rank}.pt"))
    r = tk.finetune("tk:small_cnn", policy="gradual:every=1", epochs=3, batch_size=4, lr=0.01, restore_best=False,
                    checkpoint=os.path.join(out, "gradual.pt"), **common)
    torch.save({"state": r.model.state_dict(), "history": r.history}, os.path.join(out, f"gradual_rank{rank}.pt"))


if __name__ == "__main__":
    try:
        main()
    except BaseException:
        import traceback

        traceback.print_exc()
        exit_cleanly(1)
    exit_cleanly(0)
