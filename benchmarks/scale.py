"""Scale: tar shards in place, the sharded feature store, head training from it.

One command, one table. It synthesizes ``--n`` small JPEGs (default 100,000; 32 px, ten
classes by colour) into uneven tar shards (about ``--shard-size`` samples each, one shard
empty) and measures, each in its own process:

- extraction images/s (``tk:small_cnn``, 32 px, batch 256, fp32) with 1 process and with
  2 processes (ranks 0 and 1 of 2, each computing every other missing part), one torch
  thread and no DataLoader worker each: decoding from the shards + the backbone;
- the store's bytes per sample in fp32 and bf16 (the same features rounded to bf16 and
  stored as raw 16-bit values);
- a kill mid-extraction: a process is killed with SIGKILL once half the parts are
  committed; a new process resumes; the table gives the parts it recomputed, the parts it
  reused and the parts lost (being written at the kill);
- a head epoch (linear head, SGD, batch 256) from the store: loaded into one tensor
  (``memory`` mode) and read from disk in at least 8 blocks of consecutive parts
  (``blocks`` mode), against the same epoch from a plain in-memory tensor (the best of
  ``--repeats``; the store's files are in the page cache after the first), and the same
  for a store of 100,000 random feature rows whatever ``--n``;
- start-up: ``prepare_data`` over 1,000 shards (of 10 samples), with the member indexes
  built (cold) and read back from ``cache_dir`` (warm);
- extraction's peak RSS for ``n / 10`` and ``n`` samples (the store keeps one part in
  memory: it should not grow with the number of samples).

    python benchmarks/scale.py --n 5000      # a quick run (about a minute on 2 cores)
    python benchmarks/scale.py               # 100,000 images
    python benchmarks/scale.py --head-only --repeats 5   # the head epoch alone (seconds)
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))
PART = 512
IMAGE = 32
BATCH = 256


# -- data -----------------------------------------------------------------------------------
def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def synthesize(out: Path, n: int, shard_size: int, seed: int = 0) -> list[str]:
    """``n`` JPEGs of ten colour classes in uneven shards (one empty); returns the shard paths."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    shards = max(2, -(-n // shard_size))
    w = rng.uniform(0.4, 1.6, shards)
    w[1] = 0.0  # an empty shard
    sizes = np.floor(w / w.sum() * n).astype(int)
    sizes[0] += n - sizes.sum()
    colours = rng.integers(0, 255, (10, 3))
    out.mkdir(parents=True, exist_ok=True)
    paths, k = [], 0
    for s, size in enumerate(sizes):
        p = out / f"train-{s:06d}.tar"
        with tarfile.open(p, "w") as tar:
            for _ in range(int(size)):
                c = int(rng.integers(0, 10))
                arr = np.clip(colours[c] + rng.normal(0, 25, (IMAGE, IMAGE, 3)), 0, 255).astype(np.uint8)
                buf = io.BytesIO()
                Image.fromarray(arr).save(buf, "JPEG", quality=90)
                _add(tar, f"{k:08d}.jpg", buf.getvalue())
                _add(tar, f"{k:08d}.cls", str(c).encode())
                k += 1
        paths.append(str(p))
    (out / "_info.json").write_text(json.dumps({"classes": [f"c{i}" for i in range(10)]}))
    return paths


# -- children (each measurement in its own process) --------------------------------------------
def _dataset(shards: str, cache: str, limit: int | None = None):
    import warnings

    from transferkit.data import eval_transform, prepare_data
    from transferkit.backbones import get_backbone

    bb = get_backbone("tk:small_cnn", weights=None)
    spec = bb.input_spec.__class__(**{**bb.input_spec.__dict__, "image_size": IMAGE, "resize_size": None})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = prepare_data(shards, val_split=0, cache_dir=cache, scan="none").train
    if limit is not None:
        ds = ds.view(list(range(min(limit, len(ds)))))
    return bb, spec, ds.view(transform=eval_transform(spec))


def child_extract(args: argparse.Namespace) -> dict:
    import torch

    from transferkit.model import build_model
    from transferkit.train.feature_store import ShardedFeatureStore, extract_parts

    torch.set_num_threads(1)
    bb, spec, ds = _dataset(args.shards, args.cache, args.limit)
    torch.manual_seed(0)
    model = build_model(bb, 10, spec=spec).eval()
    store = ShardedFeatureStore.open(args.store, args.key, num_samples=len(ds), part_size=PART,
                                     dim=bb.num_features, dtype="float32")
    t0 = time.perf_counter()
    extract_parts(store, ds, model.features, batch_size=BATCH, rank=args.rank, world_size=args.world)
    dt = time.perf_counter() - t0
    rep = store.report()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"seconds": dt, "samples": len(ds), "computed": rep["computed"], "reused": rep["reused"],
            "shards": rep["shards"], "rss_mb": rss, "t0": time.time() - dt}


def child_startup(args: argparse.Namespace) -> dict:
    import warnings

    from transferkit.data import prepare_data

    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        b = prepare_data(args.shards, val_split=0.1, cache_dir=args.cache, scan=args.scan)
    return {"seconds": time.perf_counter() - t0, "samples": len(b.train) + len(b.val)}


def child_head(args: argparse.Namespace) -> dict:
    import torch

    from transferkit.train.feature_store import ShardedFeatureStore

    torch.set_num_threads(1)
    meta = json.loads((Path(args.store) / args.key / "store.json").read_text())
    store = ShardedFeatureStore.open(args.store, args.key, num_samples=meta["num_samples"],
                                     part_size=meta["part_size"], dim=meta["dim"], dtype=meta["dtype"])
    x, y, _ = store.load()
    x = x[0].float()
    block = max(store.part_size * store.dim * 4, store.num_samples * store.dim * 4 // 8)  # 8+ blocks

    def epoch(batches) -> float:
        torch.manual_seed(0)
        head = torch.nn.Linear(store.dim, 10)
        opt = torch.optim.SGD(head.parameters(), lr=0.1)
        t0 = time.perf_counter()
        for xb, yb in batches:
            opt.zero_grad()
            torch.nn.functional.cross_entropy(head(xb), yb).backward()
            opt.step()
        return time.perf_counter() - t0

    def plain():
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
        for s in range(0, len(order), BATCH):
            idx = order[s:s + BATCH]
            yield x[idx], y[idx]

    out = {}
    for name, make in (("tensor", plain), ("memory", lambda: store.batches(BATCH, memory_budget=1 << 40)),
                       ("blocks", lambda: store.batches(BATCH, memory_budget=0, block_bytes=block))):
        times = []
        for _ in range(args.repeats):
            batches = make()
            times.append(epoch(batches))
        out[name] = min(times)
    return out


CHILDREN = {"extract": child_extract, "startup": child_startup, "head": child_head}


# -- the parent ----------------------------------------------------------------------------------
def _cmd(kind: str, **kw) -> list[str]:
    argv = [sys.executable, __file__, "--child", kind]
    for k, v in kw.items():
        argv += [f"--{k.replace('_', '-')}", str(v)]
    return argv


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _run(kind: str, **kw) -> dict:
    out = subprocess.run(_cmd(kind, **kw), capture_output=True, text=True, env=_env(), check=False)
    if out.returncode != 0:
        raise SystemExit(f"{kind} failed:\n{out.stderr[-3000:]}")
    res = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"  {kind} {kw.get('key', '')}: {json.dumps(res)}", file=sys.stderr, flush=True)
    return res


def _parallel(kind: str, world: int, **kw) -> list[dict]:
    procs = [subprocess.Popen(_cmd(kind, rank=r, world=world, **kw), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=_env()) for r in range(world)]
    res = []
    for p in procs:
        out, err = p.communicate()
        if p.returncode != 0:
            raise SystemExit(f"{kind} rank failed:\n{err[-3000:]}")
        res.append(json.loads(out.strip().splitlines()[-1]))
    return res


def _committed(store: Path) -> int:
    return sum(1 for _ in store.glob("part-*/part.json"))


def _synthetic_head(stores: Path, dim: int, repeats: int) -> list[tuple[str, str, str]]:
    """The head epoch over a store of 100,000 random feature rows, whatever ``--n``: tensor,
    store loaded in memory, store read by blocks."""
    import torch

    from transferkit.train.feature_store import ShardedFeatureStore

    syn = ShardedFeatureStore.open(stores, "synthetic", num_samples=100_000, part_size=PART, dim=dim)
    g = torch.Generator().manual_seed(0)
    for p in syn.missing_parts():
        a, b = syn.part_range(p)
        syn.write_part(p, torch.randn(b - a, syn.dim, generator=g), torch.randint(0, 10, (b - a,), generator=g))
    big = _run("head", store=stores, key="synthetic", repeats=repeats)
    return [("head epoch, 100k random features, tensor", f"{big['tensor'] * 1000:.0f} ms", ""),
            ("head epoch, 100k random features, store in memory", f"{big['memory'] * 1000:.0f} ms",
             f"{big['memory'] / big['tensor']:.2f}x tensor"),
            ("head epoch, 100k random features, store by blocks", f"{big['blocks'] * 1000:.0f} ms",
             f"{big['blocks'] / big['tensor']:.2f}x tensor (goal <= 1.2x)")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--shard-size", type=int, default=1000)
    ap.add_argument("--work", default=None, help="folder for the shards and stores (default: a temporary one)")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--head-only", action="store_true",
                    help="only the head epoch over a store of 100,000 random feature rows (seconds)")
    # child options
    ap.add_argument("--child", default=None)
    for k in ("shards", "cache", "store", "key", "scan"):
        ap.add_argument(f"--{k}", default=None)
    for k in ("rank", "world", "limit"):
        ap.add_argument(f"--{k}", type=int, default=None)
    args = ap.parse_args()
    if args.child:
        args.rank = args.rank or 0
        args.world = args.world or 1
        print(json.dumps(CHILDREN[args.child](args)))
        return

    from _machine import machine_line

    print(machine_line(1))
    work = Path(args.work or tempfile.mkdtemp(prefix="tk-scale-"))
    if args.head_only:
        for name, value, note in _synthetic_head(work / "stores", 128, args.repeats):
            print(f"{name:<55} {value:>8}  {note}")
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        return
    shards_dir, cache, stores = work / "shards", work / "cache", work / "stores"
    t0 = time.perf_counter()
    paths = synthesize(shards_dir, args.n, args.shard_size)
    print(f"synthesized {args.n} images into {len(paths)} shards in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    pattern = str(shards_dir / f"train-{{000000..{len(paths) - 1:06d}}}.tar")
    _run("startup", shards=pattern, cache=cache, scan="none")  # build the member indexes once
    rows = []

    one = _run("extract", shards=pattern, cache=cache, store=stores, key="one")
    rows.append(("extraction, 1 process x 1 thread", f"{one['samples'] / one['seconds']:.0f} images/s", ""))
    two = _parallel("extract", 2, shards=pattern, cache=cache, store=stores, key="two")
    span = max(r["t0"] + r["seconds"] for r in two) - min(r["t0"] for r in two)
    ips2 = args.n / span
    rows.append(("extraction, 2 processes x 1 thread", f"{ips2:.0f} images/s",
                 f"{ips2 / (one['samples'] / one['seconds']):.2f}x one process (goal >= 1.7x)"))

    # bytes per sample: fp32 as extracted, bf16 as the same features rounded
    import torch

    from transferkit.train.feature_store import ShardedFeatureStore

    s32 = ShardedFeatureStore.open(stores, "one", num_samples=args.n, part_size=PART, dim=one_dim(stores))
    s16 = ShardedFeatureStore.open(stores, "one-bf16", num_samples=args.n, part_size=PART, dim=s32.dim,
                                   dtype="bfloat16")
    for p in s16.missing_parts():
        f, t, m = s32.read_part(p)
        s16.write_part(p, torch.from_numpy(np.array(f)).to(torch.bfloat16), torch.from_numpy(t), m)
    r32, r16 = s32.report(), s16.report()
    rows.append(("store bytes per sample, fp32", f"{r32['bytes_per_sample']:.0f} B", f"{s32.dim} features"))
    rows.append(("store bytes per sample, bf16", f"{r16['bytes_per_sample']:.0f} B",
                 f"{r16['bytes'] / r32['bytes']:.2f}x fp32"))

    # a kill mid-extraction, then a resume
    proc = subprocess.Popen(_cmd("extract", shards=pattern, cache=cache, store=stores, key="killed"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env())
    total = -(-args.n // PART)
    while _committed(stores / "killed") < total // 2 and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    at_kill = _committed(stores / "killed")
    res = _run("extract", shards=pattern, cache=cache, store=stores, key="killed")
    lost = res["computed"] - (total - at_kill)
    rows.append(("kill mid-extraction, then resume",
                 f"{res['computed']} of {total} parts recomputed",
                 f"{res['reused']} reused; {max(lost, 0)} lost beyond the uncommitted part"))

    # head epoch: store vs tensor
    head = _run("head", store=stores, key="one", repeats=args.repeats)
    rows.append(("head epoch, in-memory tensor", f"{head['tensor'] * 1000:.0f} ms", "linear head, batch 256"))
    rows.append(("head epoch, store loaded in memory", f"{head['memory'] * 1000:.0f} ms",
                 f"{head['memory'] / head['tensor']:.2f}x tensor"))
    rows.append(("head epoch, store read by blocks", f"{head['blocks'] * 1000:.0f} ms",
                 f"{head['blocks'] / head['tensor']:.2f}x tensor (goal <= 1.2x)"))

    rows += _synthetic_head(stores, s32.dim, args.repeats)

    # start-up for 1,000 shards
    many = work / "many"
    synthesize(many, 10_000, 10, seed=1)
    mpat = str(many / "train-{000000..000999}.tar")
    cold = _run("startup", shards=mpat, cache=work / "cache-many", scan="quick")
    warm = _run("startup", shards=mpat, cache=work / "cache-many", scan="quick")
    rows.append(("start-up, 1,000 shards (10k samples), indexes built", f"{cold['seconds']:.2f} s", "scan='quick'"))
    rows.append(("start-up, 1,000 shards, indexes cached", f"{warm['seconds']:.2f} s", ""))

    # peak RSS of extraction at n/10 vs n
    small = _run("extract", shards=pattern, cache=cache, store=stores, key="rss-small", limit=args.n // 10)
    large = _run("extract", shards=pattern, cache=cache, store=stores, key="rss-large", limit=args.n)
    rows.append((f"extraction peak RSS, {args.n // 10} samples", f"{small['rss_mb']:.0f} MB", ""))
    rows.append((f"extraction peak RSS, {args.n} samples", f"{large['rss_mb']:.0f} MB",
                 f"{large['rss_mb'] - small['rss_mb']:+.0f} MB for {args.n - args.n // 10} more samples"))

    w = max(len(r[0]) for r in rows)
    v = max(len(r[1]) for r in rows)
    print(f"\n{args.n} images of {IMAGE} px in {len(paths)} uneven shards (one empty), parts of {PART}\n")
    print(f"{'measure':<{w}}  {'value':>{v}}  note")
    for name, value, note in rows:
        print(f"{name:<{w}}  {value:>{v}}  {note}")
    if not args.keep and args.work is None:
        shutil.rmtree(work, ignore_errors=True)


def one_dim(stores: Path) -> int:
    return int(json.loads((stores / "one" / "store.json").read_text())["dim"])


if __name__ == "__main__":
    main()
