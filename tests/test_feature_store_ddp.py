"""Two simulated nodes (two torchrun launches on 127.0.0.1, one gloo process each) fill one
sharded feature store and train a head from it under DDP (see tests/store_worker.py)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from store_worker import data, features
from transferkit.train.feature_store import ShardedFeatureStore, extract_parts

WORKER = Path(__file__).with_name("store_worker.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_nodes(commands: list[list[str]], env: dict[str, str], *, timeout: int, what: str) -> None:
    """Run one torchrun command per simulated node and wait for all; each must exit 0."""
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              start_new_session=True) for cmd in commands]
    for p in procs:
        try:
            _, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail(f"the two-node {what} did not end within {timeout} s")
        assert p.returncode == 0, err[-3000:]


def test_two_nodes_fill_the_store_bit_for_bit_and_end_with_the_same_head(tmp_path):
    runner = Path(sys.executable).with_name("torchrun")
    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    out = tmp_path / "out"
    out.mkdir()
    _two_nodes([[str(runner), "--nnodes=2", "--nproc_per_node=1", f"--node_rank={n}", "--master_addr=127.0.0.1",
                 f"--master_port={port}", str(WORKER), str(tmp_path / "store"), str(out)] for n in range(2)],
               env, timeout=240, what="job")
    ranks = [torch.load(out / f"rank{r}.pt") for r in range(2)]
    assert ranks[0]["mode"] == "blocks"
    for k in ranks[0]["weights"]:
        assert torch.equal(ranks[0]["weights"][k], ranks[1]["weights"][k])  # every rank the same head
    assert sorted(r["report"]["computed"] for r in ranks) == [5, 6]  # 11 parts, split between the nodes
    # the store equals a one-process store, bit for bit (fp32)
    ds = data()
    one = ShardedFeatureStore.open(tmp_path / "one", "k", num_samples=len(ds), part_size=96, dim=16)
    extract_parts(one, ds, features, batch_size=32)
    two = ShardedFeatureStore.open(tmp_path / "store", "k", num_samples=len(ds), part_size=96, dim=16)
    assert two.missing_parts(verify=True) == []
    a, b = one.load(), two.load()
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    # a node runs one process: its DataLoader workers use all its CPUs, not half of them
    assert [r["local_world"] for r in ranks] == ["1", "1"]
    assert ranks[0]["workers"] == ranks[1]["workers"] == min(8, len(os.sched_getaffinity(0)))


@pytest.mark.parametrize("cache", ["shared", "node-local"])
def test_two_nodes_finetune_through_the_store_like_one_process(tmp_path, monkeypatch, cache):
    """``finetune`` with a ``cache_dir`` shared by two simulated nodes (c10d rendezvous), or
    local to each: every store equals a one-process store bit for bit (fp32), the parts are
    split between the nodes (shared: each computed once), and both ranks end with the same
    head."""
    import transferkit as tk
    import transferkit.train.feature_store as feature_store
    from conftest import make_image_folder
    from store_finetune_worker import PART_ROWS, RUN

    images = make_image_folder(tmp_path / "images", per_class=10, size=16)
    runner = Path(sys.executable).with_name("torchrun")
    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    out = tmp_path / "out"
    out.mkdir()
    _two_nodes([[str(runner), "--nnodes=2", "--nproc_per_node=1", f"--node-rank={n}", "--rdzv-backend=c10d",
                 f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=store", str(WORKER.with_name("store_finetune_worker.py")),
                 str(images), str(tmp_path / ("shared" if cache == "shared" else "node{node}")), str(out)]
                for n in range(2)], env, timeout=300, what="finetune")
    ranks = [torch.load(out / f"rank{r}.pt") for r in range(2)]
    for k in ranks[0]["head"]:
        assert torch.equal(ranks[0]["head"][k], ranks[1]["head"][k])  # every rank the same head
    rep = ranks[0]["report"]
    assert rep["computed"] == rep["shards"] * (1 if cache == "shared" else 2) and rep["reused"] == 0
    assert rep == ranks[1]["report"] if cache == "shared" else rep["computed"] == ranks[1]["report"]["computed"]
    assert rep["splits"]["train"]["shards"] > 2  # enough parts to split between the nodes
    # the store equals a one-process store, bit for bit (fp32)
    monkeypatch.setattr(feature_store, "MIN_PART_ROWS", PART_ROWS)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one = tk.finetune("tk:small_cnn", data=images, cache_dir=tmp_path / "one", **RUN)
    finally:
        torch.set_num_threads(threads)
    assert one.feature_report["shards"] == rep["shards"] and one.feature_report["samples"] == rep["samples"]
    files = sorted(p.relative_to(tmp_path / "one") for p in (tmp_path / "one").rglob("*.npy"))
    for where in ["shared"] if cache == "shared" else ["node0", "node1"]:
        assert files and files == sorted(p.relative_to(tmp_path / where) for p in (tmp_path / where).rglob("*.npy"))
        for f in files:
            assert (tmp_path / "one" / f).read_bytes() == (tmp_path / where / f).read_bytes(), f
