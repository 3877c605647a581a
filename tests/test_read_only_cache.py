"""A ``cache_dir`` that cannot be written (a read-only mount shared by many jobs) is read,
never written: a run uses the feature store, decoded images and member indexes it finds
there and adds nothing; a store it lacks is said before any feature is computed.

The tests run as root, which writes anywhere: the cache is made read-only by making its
write probe fail (`transferkit._io.probe_writable`, which `read_only_folder` asks), and
"never written" is checked on the folder's own listing (names, sizes, times) before and
after the run.
"""

from __future__ import annotations

import errno
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from tests.conftest import make_image_folder, needs_onnx
from tests.shard_helpers import folder_files, write_shards

import transferkit as tk
from transferkit import _io
from transferkit.data.remote import ShardCache
from transferkit.data.shards import shard_index
from transferkit.errors import OutputError

KW = dict(weights=None, image_size=16, epochs=2, batch_size=4, device="cpu", num_workers=0, verbose=False,
          precision="fp32")


def _listing(folder: Path) -> list[tuple[str, int, int]]:
    return sorted((str(p.relative_to(folder)), p.stat().st_size if p.is_file() else -1, p.stat().st_mtime_ns)
                  for p in folder.rglob("*"))


@pytest.fixture
def read_only(monkeypatch):
    """``read_only(folder)``: from now on ``folder`` (and what is under it) cannot be written."""
    real = _io.probe_writable
    held: list[Path] = []

    def probe(path):
        if any(Path(path).resolve().is_relative_to(h) for h in held):
            raise PermissionError(errno.EROFS, "Read-only file system", str(path))
        return real(path)

    monkeypatch.setattr(_io, "probe_writable", probe)
    return lambda folder: held.append(Path(folder).resolve())


@pytest.fixture
def folder(tmp_path):
    return make_image_folder(tmp_path / "images", per_class=8, size=20)


def test_a_read_only_cache_dir_is_read_and_never_written(folder, tmp_path, read_only):
    cache = tmp_path / "cache"
    kw = dict(KW, data=folder, cache_dir=cache)
    first = tk.finetune("tk:small_cnn", **kw)
    assert first.feature_report["computed"] == 2
    for f in cache.glob("*/part-*/features.npy"):  # copied onto the read-only disk: other times, the same bytes
        os.utime(f, ns=(1, 1))
    before = _listing(cache)
    read_only(cache)
    assert "read-only: read-only file system; read, never written" in tk.plan("tk:small_cnn", **kw).summary()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to say: the plan said it is read-only
        again = tk.finetune("tk:small_cnn", **kw)
    assert again.feature_report["computed"] == 0 and again.feature_report["reused"] == 2
    assert again.decisions.cache_read_only == "read-only file system"
    for k, v in first.model.state_dict().items():
        assert torch.equal(v, again.model.state_dict()[k]), k
    assert _listing(cache) == before


def test_a_store_a_read_only_cache_dir_lacks_is_said_before_any_feature_is_computed(folder, tmp_path, read_only,
                                                                                    monkeypatch):
    import transferkit.train.feature_store as feature_store

    cache = tmp_path / "cache"
    kw = dict(KW, data=folder, cache_dir=cache)
    tk.finetune("tk:small_cnn", **kw)
    read_only(cache)
    before = _listing(cache)
    computed = []
    real = feature_store.extract_parts
    monkeypatch.setattr(feature_store, "extract_parts", lambda *a, **k: computed.extend(k["parts"]) or real(*a, **k))
    with pytest.raises(OutputError, match=r"read-only \(read-only file system\) and holds no store of this run's "
                                          r"features \(it holds 2 stores of other settings.*writable cache_dir"):
        tk.finetune("tk:small_cnn", **{**kw, "image_size": 20})  # other settings: another key
    # a part whose file changed since it was written: named, not removed (and not recomputed)
    store = next(p for p in cache.iterdir() if len(list(p.glob("part-*"))))
    features = next(store.glob("part-*/features.npy"))
    data = bytearray(features.read_bytes())
    data[-1] ^= 0xFF
    features.write_bytes(bytes(data))
    before = _listing(cache)
    with pytest.raises(OutputError, match=r"lacks 1 part of the 1 of this run's store .*do not match their digests"):
        tk.finetune("tk:small_cnn", **kw)
    assert computed == [] and _listing(cache) == before


def test_decode_once_with_a_read_only_cache_dir_decodes_in_memory(folder, tmp_path, read_only):
    cache = tmp_path / "cache"
    cache.mkdir()
    read_only(cache)
    kw = dict(KW, data=folder, cache_dir=cache, policy="full")
    d = tk.plan("tk:small_cnn", **kw)
    assert d.decode["train"]["mode"] == "memory"
    assert d.decode["train"]["reason"].startswith("cache_dir is read-only (read-only file system) and holds no "
                                                  "entry for these images; decoded once: ")
    tk.finetune("tk:small_cnn", **kw)
    assert list(cache.iterdir()) == []


def test_a_damaged_decoded_entry_in_a_read_only_cache_dir_is_decoded_into_memory_not_rewritten(folder, tmp_path,
                                                                                              read_only):
    cache = tmp_path / "cache"
    kw = dict(KW, data=folder, cache_dir=cache, policy="full")
    first = tk.finetune("tk:small_cnn", **kw)
    assert first.decisions.decode["train"]["mode"] == "disk"
    pixels = next(cache.glob("decoded/*/pixels.npy"))
    data = bytearray(pixels.read_bytes())
    data[-1] ^= 0xFF
    pixels.write_bytes(bytes(data))
    read_only(cache)
    before = _listing(cache)
    with pytest.warns(UserWarning, match=r"are damaged .*, and the cache_dir is read-only \(read-only file system\): "
                                         r"decoding them once into memory"):
        tk.finetune("tk:small_cnn", **kw)
    assert _listing(cache) == before


def test_shard_indexes_and_copies_leave_a_read_only_cache_dir_alone_and_warn_on_a_writable_one(folder, tmp_path,
                                                                                        read_only):
    items = [(f.read_bytes(), f.suffix[1:], c) for f, c in folder_files(folder)]
    shard = str(write_shards(items, tmp_path / "shards", [len(items)])[0])
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "shard-index").write_text("a file where the indexes' folder goes")
    with pytest.warns(UserWarning, match=r"member index of .*train-000000.tar' was not stored .*the next run "
                                         r"indexes the shard again"):
        index, kept = shard_index(shard, cache_dir=cache)
    assert len(index.keys) == len(items) and not kept
    assert ShardCache.for_cache_dir(cache).folder == cache / "shards"  # where remote shards are fetched
    read_only(cache)
    assert not ShardCache.for_cache_dir(cache).folder.is_relative_to(cache)  # a temporary folder
    assert ShardCache.for_cache_dir(cache).kept_in == cache / "shards"  # whose copies are read there
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        index, kept = shard_index(shard, cache_dir=cache)
    assert len(index.keys) == len(items) and not kept
    assert sorted(os.listdir(cache)) == ["shard-index"]


def test_engines_are_timed_on_a_read_only_cache_dir_without_writing_to_it(folder, tmp_path, read_only, monkeypatch):
    needs_onnx()
    from transferkit.config import FinetuneConfig
    from transferkit.train import engines as eng

    monkeypatch.setattr(eng, "MIN_IMAGES_TO_TIME", 1)  # time eager and ONNX Runtime on the tiny folder
    monkeypatch.setattr(eng, "ONNX_SECONDS_BASE", {"cpu": 0.0})
    monkeypatch.setattr(eng, "ONNX_SECONDS_PER_MODULE", {"cpu": 0.0})
    monkeypatch.setattr(eng, "engine_availability", lambda device_type: {
        "eager": None, "onnxruntime": None, "compile": "not timed in this test (compiling takes minutes)"})
    cache = tmp_path / "cache"
    cache.mkdir()
    read_only(cache)
    try:
        facts = tk.look(FinetuneConfig(**KW, backbone="tk:small_cnn", data=folder, cache_dir=cache))[0]
    finally:
        eng.release_engines()
    assert "images_per_s" in facts.engines["measured"]["onnxruntime"]  # exported for this process only
    assert list(cache.iterdir()) == []


def test_a_cache_dir_on_a_read_only_mount_is_read_and_never_written(folder, tmp_path):
    """The same on a real read-only file system (a bind mount remounted read-only in a mount
    namespace of its own, where the machine allows one), with a temporary file that a killed
    run left in the cache: its clean-up stopped the run with a raw EROFS."""
    import json
    import shutil
    import subprocess
    import sys

    if shutil.which("unshare") is None:
        pytest.skip("no unshare here")
    cache = tmp_path / "cache"
    kw = dict(KW, data=str(folder), cache_dir=str(cache))
    first = tk.finetune("tk:small_cnn", **kw)
    code = ("import sys; from pathlib import Path; from transferkit._io import create_temp; "
            "create_temp(Path(sys.argv[1]))")
    subprocess.run([sys.executable, "-c", code, str(cache / "engines.json")], check=True)  # its writer is gone
    assert [p for p in cache.iterdir() if p.name.endswith(".tmp")]
    mount = f"mount --bind {cache} {cache} && mount -o remount,bind,ro {cache}"
    if subprocess.run(["unshare", "-m", "sh", "-c", mount], capture_output=True).returncode != 0:
        pytest.skip("no read-only bind mount here (unshare -m needs privileges)")
    before = _listing(cache)
    script = tmp_path / "run.py"
    script.write_text("import json, sys, torch, transferkit as tk\ntorch.set_num_threads(1)\n"
                      f"r = tk.finetune('tk:small_cnn', **json.loads({json.dumps(json.dumps(kw))}))\n"
                      "print(json.dumps({'computed': r.feature_report['computed'], 'read_only': "
                      "r.decisions.cache_read_only, 'val_loss': r.metrics['val_loss']}))\n")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run(["unshare", "-m", "sh", "-c", f"{mount} && {sys.executable} {script}"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["computed"] == 0 and out["read_only"] == "read-only file system"
    assert out["val_loss"] == pytest.approx(first.metrics["val_loss"], rel=1e-6)
    assert _listing(cache) == before


def test_remote_shards_are_read_from_the_copies_a_read_only_cache_dir_holds(folder, tmp_path, read_only):
    from transferkit.data import prepare_data

    items = [(f.read_bytes(), f.suffix[1:], c) for f, c in folder_files(folder)]
    source = write_shards(items, tmp_path / "shards", [len(items) // 2, len(items) - len(items) // 2])
    urls = [f"pipe:cat {p}" for p in source]
    cache = tmp_path / "cache"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        first = prepare_data(urls, val_split=0, cache_dir=cache, classes=["dark", "light"])
        pixels = [first.train[i][0] for i in range(len(first.train))]  # every shard fetched into cache/shards
    for p in source:
        p.unlink()  # the source is gone: only the copies remain
    read_only(cache)
    before = _listing(cache)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        again = prepare_data(urls, val_split=0, cache_dir=cache, classes=["dark", "light"])
        assert all(np.array_equal(np.asarray(again.train[i][0]), np.asarray(x)) for i, x in enumerate(pixels))
    assert _listing(cache) == before
