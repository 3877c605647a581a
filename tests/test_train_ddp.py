"""DDP through torchrun: 2 CPU processes with gloo (see tests/ddp_worker.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import transferkit as tk
from transferkit.backbones import get_backbone

from conftest import make_image_folder

WORKER = Path(__file__).with_name("ddp_worker.py")


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    data = make_image_folder(tmp / "images", per_class=12, size=28)
    out = tmp / "out"
    out.mkdir()
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    cmd = [str(torchrun), "--nproc_per_node=2", "--master_port=0", "--rdzv_backend=c10d", "--rdzv_endpoint=localhost:0",
           str(WORKER), str(data), str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, f"torchrun failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return data, out


def _load(out: Path, name: str, rank: int) -> dict:
    return torch.load(out / f"{name}_rank{rank}.pt", weights_only=True)


@pytest.mark.parametrize("name", ["cached", "gradual"])
def test_both_ranks_end_with_identical_weights(ddp_run, name):
    _, out = ddp_run
    a, b = _load(out, name, 0), _load(out, name, 1)
    assert a["state"].keys() == b["state"].keys()
    for k in a["state"]:
        assert torch.equal(a["state"][k], b["state"][k]), k
    def strip(h):
        return [{k: v for k, v in row.items() if k != "time_s"} for row in h]

    assert strip(a["history"]) == strip(b["history"])  # losses are all-reduced: every rank reports the same


def test_cached_ddp_matches_single_process_with_the_global_batch(ddp_run):
    """2 ranks x batch 4 = one process with batch 8: each step's two shards are the halves of the
    single-process batch (same permutation), and DDP averages their gradients."""
    data, out = ddp_run
    ddp = _load(out, "cached", 0)["state"]
    single = tk.finetune("tk:small_cnn", weights=None, data=data, image_size=32, device="cpu", num_workers=0, seed=0,
                         verbose=False, policy="feature_extraction", epochs=3, batch_size=8, lr=0.05, optimizer="sgd",
                         restore_best=False)
    for k, v in single.model.state_dict().items():
        assert torch.allclose(v, ddp[k], atol=1e-5), k
    head = [k for k in ddp if k.startswith("head.")]
    init = tk.finetune("tk:small_cnn", weights=None, data=data, image_size=32, device="cpu", num_workers=0, seed=0,
                       verbose=False, policy="feature_extraction", epochs=1, batch_size=8, lr=1e-12,
                       optimizer="sgd").model.state_dict()
    assert any(not torch.allclose(init[k], ddp[k], atol=1e-4) for k in head)  # the head did train


def test_gradual_unfreezing_under_ddp(ddp_run):
    """Policy gradual:every=1 over 3 epochs on blocks stem, stage1, stage2, stage3: stage3 trains from
    epoch 1, stage2 from epoch 2; stem and stage1 never. DDP is rebuilt at each unfreeze."""
    _, out = ddp_run
    final = _load(out, "gradual", 0)["state"]
    torch.manual_seed(0)
    tk.seed_everything(0)
    init = get_backbone("tk:small_cnn", weights=None).trunk.state_dict()
    bb = get_backbone("tk:small_cnn", weights=None)

    def changed(block: str) -> bool:
        names = [n for n, _ in bb.trunk.named_parameters() if bb.block_of(n) == block]
        return any(not torch.equal(init[n], final[f"trunk.{n}"]) for n in names)

    assert changed("stage3") and changed("stage2")
    assert not changed("stage1") and not changed("stem")
    ckpt = tk.train.load_checkpoint(out / "gradual.pt")  # written by rank 0 only, complete
    assert ckpt["complete"] and ckpt["epoch"] == 3
