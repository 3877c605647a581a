"""The sharded, resumable feature store: parts committed atomically, a killed extraction
resumed (with another number of ranks), bf16 at half the bytes, bad samples masked,
free space checked, head training from memory or from blocks."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from conftest import make_image_folder
from shard_helpers import folder_items, write_shards

import transferkit as tk
from transferkit.data import eval_transform, prepare_data
from transferkit.train.feature_store import ShardedFeatureStore, extract_parts


class Tiny(torch.utils.data.Dataset):
    """``n`` samples of 4 numbers; the label is whether the first is positive."""

    def __init__(self, n: int = 3000, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 4, generator=g)
        self.y = (self.x[:, 0] > 0).long()

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], int(self.y[i])


def _forward(dtype=torch.float32):
    torch.manual_seed(0)
    lin = torch.nn.Linear(4, 8)
    return lambda x: lin(x.float()).to(dtype)


class Boom(Exception):
    pass


def _killing(forward, after_parts: int, part_size: int, batch: int):
    calls = {"n": 0}
    per_part = -(-part_size // batch)

    def f(x):
        calls["n"] += 1
        if calls["n"] > after_parts * per_part:
            raise Boom("killed")
        return forward(x)
    return f


def test_killed_extraction_resumes_recomputing_only_missing_parts(tmp_path):
    ds, fwd = Tiny(3000), _forward()
    store = ShardedFeatureStore.open(tmp_path, "k", num_samples=3000, part_size=256, dim=8)
    assert store.num_parts == 12
    with pytest.raises(Boom):
        extract_parts(store, ds, _killing(fwd, 5, 256, 64), batch_size=64)
    assert store.report()["computed"] == 5
    assert not list(tmp_path.glob("k/.*tmp"))  # the part being written when it died left nothing
    again = ShardedFeatureStore.open(tmp_path, "k", num_samples=3000, part_size=256, dim=8)
    assert len(again.missing_parts()) == 7
    extract_parts(again, ds, fwd, batch_size=64)
    rep = again.report()
    assert (rep["computed"], rep["reused"], rep["shards"], rep["samples"]) == (7, 5, 12, 3000)
    whole = ShardedFeatureStore.open(tmp_path / "ref", "k", num_samples=3000, part_size=256, dim=8)
    extract_parts(whole, ds, fwd, batch_size=64)
    assert torch.equal(again.load()[0], whole.load()[0])  # resumed = uninterrupted, bit for bit
    assert torch.equal(again.load()[1], ds.y)


def test_stored_pass_decodes_a_block_before_computing_it(tmp_path, monkeypatch):
    """On a CPU whose cores the decoding workers and the computation would share, each part
    is decoded (its workers have exited) before it is computed; with cores to spare it is
    computed while they decode. The features are the same either way."""
    import multiprocessing

    from transferkit.data import sampling

    ds, fwd = Tiny(96), _forward()
    stores = {}
    for name, cpus in (("shared", 1), ("spare", 64)):
        alive = []

        def forward(x, _alive=alive):
            _alive.append(len(multiprocessing.active_children()))
            return fwd(x)

        monkeypatch.setattr(sampling, "usable_cpus", lambda _c=cpus: _c)
        stores[name] = ShardedFeatureStore.open(tmp_path / name, "k", num_samples=96, part_size=48, dim=8)
        extract_parts(stores[name], ds, forward, batch_size=8, num_workers=2, device="cpu")
        assert len(alive) == 12
        if name == "shared":
            assert alive == [0] * 12  # every batch computed after its part's reading ended
        else:
            assert max(alive) == 2  # computed beside the live workers
    assert torch.equal(stores["shared"].load()[0], stores["spare"].load()[0])


def test_resume_with_another_number_of_ranks_covers_every_part_once(tmp_path):
    ds, fwd = Tiny(1000), _forward()
    store = ShardedFeatureStore.open(tmp_path, "k", num_samples=1000, part_size=100, dim=8)
    extract_parts(store, ds, fwd, rank=0, world_size=3)  # one of three ranks ran, then the job died
    assert store.report()["computed"] == 4
    opened = [ShardedFeatureStore.open(tmp_path, "k", num_samples=1000, part_size=100, dim=8) for _ in range(2)]
    assigned = [s.assigned_parts(r, 2) for r, s in enumerate(opened)]  # resumed on two ranks, at once
    written = [p for r, s in enumerate(opened) for p in extract_parts(s, ds, fwd, rank=r, world_size=2,
                                                                      parts=assigned[r])]
    assert sorted(written) == [1, 2, 4, 5, 7, 8]
    assert opened[0].assigned_parts(1, 2, missing=[1, 2, 4, 5, 7, 8]) == [2, 5, 8]  # an agreed list: balanced
    assert ShardedFeatureStore.open(tmp_path, "k", num_samples=1000, part_size=100, dim=8).missing_parts() == []


def test_bf16_is_stored_as_computed_in_half_the_bytes(tmp_path):
    ds = Tiny(2000)
    reports = {}
    for dtype in (torch.float32, torch.bfloat16):
        name = str(dtype).split(".")[1]
        store = ShardedFeatureStore.open(tmp_path, name, num_samples=2000, part_size=500, dim=8, dtype=dtype)
        extract_parts(store, ds, _forward(dtype))
        reports[name] = store.report()
        x = store.load()[0]
        assert x.dtype == dtype
        assert torch.equal(x[0], _forward(dtype)(ds.x))  # the computed values, bit for bit
    f32, bf16 = reports["float32"]["bytes"], reports["bfloat16"]["bytes"]
    feat32, feat16 = 2000 * 8 * 4, 2000 * 8 * 2
    assert bf16 < f32 and f32 - bf16 == feat32 - feat16
    with pytest.raises(ValueError, match="precision they were computed in"):
        ShardedFeatureStore.open(tmp_path, "bfloat16", num_samples=2000, part_size=500, dim=8,
                                 dtype="bfloat16").write_part(0, torch.zeros(500, 8), torch.zeros(500))


def test_bad_sample_is_masked_and_reported_not_a_reason_to_discard(tmp_path):
    folder = make_image_folder(tmp_path / "img", per_class=6)
    items = folder_items(folder)
    write_shards(items, tmp_path / "s", [12])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = prepare_data(str(tmp_path / "s"), val_split=0, scan="none").train
    ds.source.sizes[3] = 40  # the image of sample 3 now reads truncated: it passes no decoder
    view = ds.view(transform=eval_transform(tk.InputSpec(image_size=8)))
    store = ShardedFeatureStore.open(tmp_path / "c", "k", num_samples=12, part_size=5, dim=3)
    extract_parts(store, view, lambda x: x.float().mean((2, 3)))
    x, y, mask = store.load()
    assert mask.tolist() == [i != 3 for i in range(12)]
    assert y.tolist() == ds.targets
    rep = store.report()
    assert rep["masked_samples"] == 1 and "train0000003" in rep["masked"][0]
    assert "on_bad_file" not in rep["masked"][0], rep["masked"]  # why it failed; not advice the run already follows
    reopened = ShardedFeatureStore.open(tmp_path / "c", "k", num_samples=12, part_size=5, dim=3)
    assert reopened.report()["masked"] == rep["masked"]  # another run or rank reading the store names it too
    assert reopened.masked_reasons() == {3: rep["masked"][0]}
    info = reopened._part_dir(0) / "part.json"  # a part that records only how many it masked
    info.write_text(json.dumps({k: v for k, v in json.loads(info.read_text()).items() if k != "masked_samples"}))
    assert reopened.masked_reasons() == {3: "sample 3: masked when the feature store was filled"}
    hb = store.batches(4, memory_budget=1 << 30)
    assert sum(len(b[1]) for b in hb) == 11  # the masked sample is not trained on


def test_free_space_is_checked_before_writing(tmp_path, monkeypatch):
    import shutil

    store = ShardedFeatureStore.open(tmp_path, "k", num_samples=10, part_size=5, dim=3)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(100, 100, 1000))
    with pytest.raises(tk.OutputError, match=r"Not enough free space for the feature store .* it needs about 85 bytes "
                                             r"\(64 kB with a margin\) and 1000 bytes are free there.* the parts "
                                             "written so far are kept"):
        store.write_part(0, torch.zeros(5, 3), torch.zeros(5))
    assert store.missing_parts() == [0, 1]
    # the margin is that of every other write (5 % and 64 kB), not 64 MB: a few kB of features fit 1 MB
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(2**20, 0, 2**20))
    store.write_part(0, torch.zeros(5, 3), torch.zeros(5))
    assert store.missing_parts() == [1]


def test_damaged_part_is_found_and_recomputed(tmp_path):
    ds, fwd = Tiny(300), _forward()
    store = ShardedFeatureStore.open(tmp_path, "k", num_samples=300, part_size=100, dim=8)
    extract_parts(store, ds, fwd)
    f = tmp_path / "k" / "part-000001" / "features.npy"
    f.write_bytes(f.read_bytes()[:-8] + b"\0" * 8)
    assert store.missing_parts(verify=True) == [1]
    extract_parts(store, ds, fwd)
    parts = [tmp_path / "k" / f"part-00000{i}" for i in (0, 2)]  # two parts' folders swapped by hand
    parts[0].rename(tmp_path / "k" / "swap")
    parts[1].rename(parts[0])
    (tmp_path / "k" / "swap").rename(parts[1])
    assert store.missing_parts(verify=True) == [0, 2]  # each folder's part.json names the part it holds


def test_a_folder_file_or_fifo_in_the_place_of_a_store_s_file_is_damage_recomputed(tmp_path):
    """A folder or a FIFO where a part's file was ended every run in a raw IsADirectoryError, or
    hung reading the FIFO; a file where a part's folder was was a misleading 'check the disk'
    error; a folder named store.json, an IsADirectoryError naming a temporary."""
    import os

    ds, fwd = Tiny(300), _forward()
    store = ShardedFeatureStore.open(tmp_path, "k", num_samples=300, part_size=100, dim=8)
    extract_parts(store, ds, fwd)
    whole = [store.read_part(p)[0].copy() for p in range(3)]
    part = tmp_path / "k" / "part-000001"
    (part / "features.npy").unlink()
    (part / "features.npy").mkdir()
    (part / "mask.npy").unlink()
    os.mkfifo(part / "mask.npy")
    (tmp_path / "k" / "part-000002").rename(tmp_path / "gone")
    (tmp_path / "k" / "part-000002").write_text("x")
    assert store.missing_parts(verify=True) == [1, 2]
    extract_parts(store, ds, fwd)
    assert store.missing_parts(verify=True) == [] and all((store.read_part(p)[0] == whole[p]).all() for p in (1, 2))
    (tmp_path / "k" / "store.json").unlink()
    (tmp_path / "k" / "store.json").mkdir()
    again = ShardedFeatureStore.open(tmp_path, "k", num_samples=300, part_size=100, dim=8)
    assert again.missing_parts() == [0, 1, 2] and (tmp_path / "k" / "store.json").is_file()


def test_a_store_of_a_newer_format_is_not_wiped(tmp_path):
    """An older and a newer transferkit sharing one cache_dir wiped each other's stores in turn,
    without a word."""
    import json

    ds, fwd = Tiny(200), _forward()
    store = ShardedFeatureStore.open(tmp_path, "k", num_samples=200, part_size=100, dim=8)
    extract_parts(store, ds, fwd)
    meta = tmp_path / "k" / "store.json"
    meta.write_text(json.dumps({**json.loads(meta.read_text()), "format": 99}))
    with pytest.raises(tk.OutputError, match=r"written by a newer transferkit \(store format 99; this one writes 1\): "
                                          r"give this version another cache_dir, or upgrade it\. Nothing was removed"):
        ShardedFeatureStore.open(tmp_path, "k", num_samples=200, part_size=100, dim=8)
    assert sorted(p.name for p in (tmp_path / "k").glob("part-*")) == ["part-000000", "part-000001"]


def test_other_parameters_for_the_same_key_start_afresh(tmp_path):
    ds, fwd = Tiny(300), _forward()
    extract_parts(ShardedFeatureStore.open(tmp_path, "k", num_samples=300, part_size=100, dim=8), ds, fwd)
    s = ShardedFeatureStore.open(tmp_path, "k", num_samples=300, part_size=50, dim=8)
    assert len(s.missing_parts()) == 6 and s.report()["reused"] == 0


@pytest.mark.parametrize("budget", [1 << 30, 1000])
def test_head_batches_cover_each_sample_once_per_epoch_in_a_seeded_order(tmp_path, budget):
    ds, fwd = Tiny(1000), _forward()
    store = ShardedFeatureStore.open(tmp_path, "k", num_samples=1000, part_size=128, dim=8)
    extract_parts(store, ds, fwd)
    hb = store.batches(64, seed=3, memory_budget=budget)
    assert hb.mode == ("memory" if budget > 1000 else "blocks")
    feats = store.load()[0][0].float()
    epochs = []
    for e in (0, 1):
        hb.set_epoch(e)
        batches = list(hb)
        assert len(batches) == len(hb) == 16
        x, y = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
        rows = [int(torch.nonzero((feats == r).all(1))[0]) for r in x[:50]]
        assert y[:50].tolist() == ds.y[rows].tolist()
        assert sorted(y.tolist()) == sorted(ds.y.tolist()) and x.dtype == torch.float32
        epochs.append(rows)
    assert epochs[0] != epochs[1]
    hb.set_epoch(0)
    assert torch.equal(next(iter(hb))[0], torch.cat([b[0] for b in list(hb)[:1]]))  # seeded


def test_head_trains_from_the_store(tmp_path):
    ds = Tiny(2000)
    store = ShardedFeatureStore.open(tmp_path, "k", num_samples=2000, part_size=300, dim=4)
    extract_parts(store, ds, lambda x: x)
    for budget in (1 << 30, 1000):
        torch.manual_seed(0)
        head = torch.nn.Linear(4, 2)
        opt = torch.optim.SGD(head.parameters(), lr=0.5)
        hb = store.batches(100, memory_budget=budget)
        for e in range(3):
            hb.set_epoch(e)
            for x, y in hb:
                opt.zero_grad()
                torch.nn.functional.cross_entropy(head(x), y).backward()
                opt.step()
        acc = (head(ds.x).argmax(1) == ds.y).float().mean().item()
        assert acc > 0.95, (hb.mode, acc)


@pytest.mark.parametrize("budget", [1 << 30, 1000])
@pytest.mark.parametrize("world", [2, 3])
def test_head_batches_under_ddp_give_every_rank_equal_batches_covering_the_epoch(tmp_path, budget, world):
    ds = Tiny(1001)
    store = ShardedFeatureStore.open(tmp_path, "k", num_samples=1001, part_size=128, dim=4)
    extract_parts(store, ds, lambda x: x)
    ranks = [store.batches(50, seed=1, memory_budget=budget, rank=r, world_size=world) for r in range(world)]
    for hb in ranks:
        hb.set_epoch(2)
    got = [list(hb) for hb in ranks]
    assert len({len(b) for b in got}) == 1 and len(got[0]) == len(ranks[0])
    assert all([len(y) for _, y in got[0]] == [len(y) for _, y in b] for b in got)  # the same sizes on every rank
    rows = torch.cat([x for b in got for x, _ in b])
    seen = {tuple(r.tolist()) for r in rows}
    assert seen == {tuple(r.tolist()) for r in ds.x}  # every sample
    assert len(rows) - 1001 == (-1001) % world  # padding only evens the ranks out
    single = store.batches(50 * world, seed=1, memory_budget=budget)
    single.set_epoch(2)
    assert torch.equal(torch.cat([x for x, _ in single]),
                       torch.cat([torch.stack([got[r][i][0] for r in range(world)], 1).reshape(-1, 4)
                                  for i in range(len(got[0]) - 1)] +
                                 [torch.cat([got[r][-1][0][:, None] for r in range(world)], 1).reshape(-1, 4)])[:1001])


KILLER = """
import os, signal, sys
import numpy as np
import torch
sys.path.insert(0, {tests!r})
from test_feature_store import Tiny, _forward
from transferkit.train.feature_store import ShardedFeatureStore, extract_parts

saves = {{"n": 0}}
real_save = np.save
def save(path, arr, *a, **k):
    saves["n"] += 1
    if saves["n"] == 3 * 4 + 2:  # part 4, half written: the process dies without any cleanup
        os.kill(os.getpid(), signal.SIGKILL)
    return real_save(path, arr, *a, **k)
np.save = save
store = ShardedFeatureStore.open({root!r}, "k", num_samples=3000, part_size=256, dim=8)
extract_parts(store, Tiny(3000), _forward(), batch_size=64)
"""


def test_sigkill_mid_part_leaves_no_half_part_and_resume_cleans_up(tmp_path):
    import signal
    import subprocess
    import sys
    from pathlib import Path

    code = KILLER.format(tests=str(Path(__file__).parent), root=str(tmp_path))
    env = {**__import__("os").environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert list((tmp_path / "k").glob(".part-000004.*tmp"))  # the half-written part, under a temporary name
    store = ShardedFeatureStore.open(tmp_path, "k", num_samples=3000, part_size=256, dim=8)
    assert store.missing_parts() == list(range(4, 12))
    extract_parts(store, Tiny(3000), _forward(), batch_size=64)
    rep = store.report()
    assert (rep["computed"], rep["reused"]) == (8, 4)
    assert not list((tmp_path / "k").glob(".*tmp"))  # the dead writer's temporary is gone
    ref = ShardedFeatureStore.open(tmp_path / "ref", "k", num_samples=3000, part_size=256, dim=8)
    extract_parts(ref, Tiny(3000), _forward(), batch_size=64)
    assert torch.equal(store.load()[0], ref.load()[0])


def test_views_draw_the_augmentations_of_their_epoch(tmp_path):
    from transferkit.data.sampling import SeededItems

    class Noisy(Tiny):
        def __getitem__(self, i):
            return self.x[i] + torch.randn(4), int(self.y[i])  # a random augmentation

    ds = Noisy(300)
    store = ShardedFeatureStore.open(tmp_path, "k", num_samples=300, part_size=128, dim=4, views=3)
    extract_parts(store, ds, lambda x: x, seed=5)
    x = store.load()[0]
    assert x.shape == (3, 300, 4) and not torch.equal(x[0], x[1])
    assert torch.equal(x[2, 17], SeededItems(ds, 5)[(17, 2)][0])  # view 2 = epoch 2 of a seeded loader


def test_reopening_trusts_untouched_parts_and_hashes_changed_ones(tmp_path, monkeypatch):
    from pathlib import Path

    import transferkit.train.feature_store as fs

    ds, fwd = Tiny(300), _forward()
    extract_parts(ShardedFeatureStore.open(tmp_path, "k", num_samples=300, part_size=100, dim=8), ds, fwd)
    hashed = []
    real = fs.file_digest
    monkeypatch.setattr(fs, "file_digest", lambda path, **kw: hashed.append(Path(path).name) or real(path, **kw))
    store = ShardedFeatureStore.open(tmp_path, "k", num_samples=300, part_size=100, dim=8)
    assert store.missing_parts(verify=True) == [] and hashed == []  # no part read at start-up
    f = tmp_path / "k" / "part-000002" / "targets.npy"
    data = f.read_bytes()
    f.unlink()
    f.write_bytes(data)  # the same bytes in a new file (a copy): hashed once, then trusted again
    assert store.missing_parts(verify=True) == [] and hashed == ["features.npy", "targets.npy", "mask.npy"]
    hashed.clear()
    assert store.missing_parts(verify=True) == [] and hashed == []
    assert store.report()["masked_samples"] == 0


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_head_batches_by_blocks_leave_out_masked_rows_and_pick_one_view_per_sample(tmp_path, dtype):
    n, dim, views = 300, 4, 2
    store = ShardedFeatureStore.open(tmp_path, "k", num_samples=n, part_size=64, dim=dim, views=views, dtype=dtype)
    for p in store.missing_parts():
        a, b = store.part_range(p)
        idx = torch.arange(a, b, dtype=torch.float32) % 8  # exact in bf16 too
        feats = torch.stack([idx[:, None].expand(-1, dim) + 0.5 * v for v in range(views)])  # row i, view v: i%8 + v/2
        mask = torch.ones(b - a, dtype=torch.bool)
        if p == 1:
            mask[3] = False  # sample 67 could not be read
        store.write_part(p, feats.to(getattr(torch, dtype)), torch.arange(a, b), mask)
    memory, blocks = store.batches(32, seed=5, memory_budget=1 << 30), store.batches(32, seed=5, memory_budget=0)
    assert (memory.mode, blocks.mode) == ("memory", "blocks")
    for hb in (memory, blocks):
        hb.set_epoch(1)
        x, y = map(torch.cat, zip(*list(hb)))
        assert sorted(y.tolist()) == [i for i in range(n) if i != 67]  # each valid sample once
        v = x[:, 0] - (y % 8).float()
        assert set(v.tolist()) == {0.0, 0.5} and (x == x[:, :1]).all()  # one stored view per row, whole rows


FEW_DESCRIPTORS = """
import resource, sys, tempfile
import torch
import transferkit.train.feature_store as fs
from transferkit.train.feature_store import ShardedFeatureStore, extract_parts

resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))  # a limit below one part's samples
fs.decode_then_compute = lambda *a: True  # read ahead in blocks, as where the workers and torch share the cores
tensors = sys.argv[1] == "tensor"  # regression and multilabel targets are tensors


class Images(torch.utils.data.Dataset):
    def __len__(self):
        return 1200

    def __getitem__(self, i):
        return torch.full((3, 8, 8), i / 1200), torch.tensor([i % 2.0]) if tensors else i % 2


store = ShardedFeatureStore.open(tempfile.mkdtemp(), "k", num_samples=1200, part_size=1200, dim=4, dtype="float32")
torch.manual_seed(0)
net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 4))
extract_parts(store, Images(), net, batch_size=16, num_workers=2)
with torch.no_grad():
    expected = net(torch.stack([Images()[i][0] for i in range(1200)]))
feats, targets, mask = store.read_part(0)
assert torch.allclose(store.to_torch(feats).reshape(-1, 1200, 4)[0], expected, atol=1e-6) and mask.all()
assert targets.reshape(-1).tolist() == [i % 2 for i in range(1200)]
print("ok")
"""


@pytest.mark.parametrize("targets", ["int", "tensor"])
def test_a_part_of_more_samples_than_the_descriptor_limit_is_extracted_with_workers(tmp_path, targets):
    """Each sample crossed from a worker as a tensor of its own, a file descriptor each while
    the block read ahead waited: a part of 1200 samples needed about 1200 (ImageNet-1k's parts
    hold 5005), and the run died with torch's "received 0 items of ancdata"."""
    import subprocess
    import sys

    script = tmp_path / "few.py"
    script.write_text(FEW_DESCRIPTORS)
    done = subprocess.run([sys.executable, str(script), targets], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


@pytest.mark.parametrize("limit", [None, 400])
def test_a_read_ahead_block_holds_at_most_read_ahead_batches(monkeypatch, limit):
    """Batches of tiny images fit hundreds of megabytes by the thousand, each holding descriptors."""
    import resource

    from transferkit.data.sampling import READ_AHEAD_BATCHES, in_blocks

    if limit is not None:  # a low `ulimit -n`: an eighth of it
        monkeypatch.setattr(resource, "getrlimit", lambda what: (limit, limit))
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    most = READ_AHEAD_BATCHES if soft == resource.RLIM_INFINITY else min(READ_AHEAD_BATCHES, soft // 8)
    drawn = []

    def batches():
        for i in range(3 * READ_AHEAD_BATCHES):
            drawn.append(i)
            yield torch.zeros(1)

    it = in_blocks(batches())
    next(it)
    assert len(drawn) == most  # the first block, not every batch under the byte budget
    assert len(list(it)) == 3 * READ_AHEAD_BATCHES - 1
    assert limit is None or most == 50
