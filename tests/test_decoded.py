"""Decode once: stored uint8 pixels + the per-epoch random part of the training transform."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from transferkit.backbones._base import InputSpec
from transferkit.data import ImageFolderDataset, TransformedDataset, train_transform
from transferkit.data import images as images_mod
from transferkit.data.decoded import DecodedDataset, decoded_dataset, decoded_key, plan_decode
from transferkit.train.loaders import SeededItems

SPEC = InputSpec(image_size=16, resize_size=20)


def _folder(tmp_path, n: int = 6):
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (tmp_path / "img" / c).mkdir(parents=True)
        for i in range(n):
            arr = rng.integers(0, 256, (30 + 3 * i, 40, 3), dtype=np.uint8)
            Image.fromarray(arr).save(tmp_path / "img" / c / f"{i}.{'png' if i % 2 else 'jpg'}")
    return ImageFolderDataset(tmp_path / "img", min_size=SPEC.resize_size)


def _items(ds, epoch: int, seed: int = 0):
    s = SeededItems(ds, seed)
    return [s[(i, epoch)] for i in range(len(ds))]


@pytest.mark.parametrize("augment", ["none", "flip"])
def test_eval_crop_and_flip_items_equal_the_training_transform_bit_for_bit(tmp_path, augment):
    ds = _folder(tmp_path)
    dec, plan = decoded_dataset(ds, SPEC, augment=augment, num_workers=0)
    assert plan.mode == "memory" and isinstance(dec, DecodedDataset)
    ref = ds.view(transform=train_transform(SPEC, augment))
    for epoch in (0, 1):
        for (a, ya), (b, yb) in zip(_items(dec, epoch), _items(ref, epoch)):
            assert torch.equal(a, b) and ya == yb


def test_standard_augmentation_crops_per_epoch_from_the_stored_resize(tmp_path):
    ds = _folder(tmp_path)
    dec, plan = decoded_dataset(ds, SPEC, augment="standard", num_workers=0)
    assert plan.mode == "memory"
    assert min(dec.image(0).shape[1:]) == SPEC.resize_size  # kept at the transform's resize size
    e0, e0_again, e1 = _items(dec, 0), _items(dec, 0), _items(dec, 1)
    assert all(x.shape == (3, 16, 16) and x.dtype == torch.uint8 for x, _ in e0)
    assert all(torch.equal(a, b) for (a, _), (b, _) in zip(e0, e0_again))  # seeded: reproducible
    assert sum(not torch.equal(a, b) for (a, _), (b, _) in zip(e0, e1)) >= len(ds) - 1  # new crops each epoch
    assert [y for _, y in e0] == ds.targets
    # the same distribution as the transform on the original decode: uniform noise images average about 127.5
    means = [x.float().mean().item() for e in range(4) for x, _ in _items(dec, e)]
    ref = [x.float().mean().item() for e in range(4) for x, _ in _items(ds.view(transform=train_transform(SPEC)), e)]
    assert abs(np.mean(means) - np.mean(ref)) < 3.0


def test_disk_entry_is_reused_and_a_changed_file_gets_a_new_one(tmp_path, monkeypatch):
    ds = _folder(tmp_path)
    cache = tmp_path / "cache"
    dec, plan = decoded_dataset(ds, SPEC, augment="standard", cache_dir=cache, num_workers=0)
    assert plan.mode == "disk" and (plan.path / "meta.json").exists()
    assert isinstance(dec.pixels, np.memmap)
    first = [x for x, _ in _items(dec, 3)]

    def no_decoding(*a, **k):
        raise AssertionError("decoded again")

    monkeypatch.setattr(images_mod, "load_image", no_decoding)
    again, plan2 = decoded_dataset(ImageFolderDataset(tmp_path / "img", min_size=20), SPEC, augment="standard",
                                   cache_dir=cache, num_workers=0)
    assert plan2.key == plan.key and "read back" in plan2.reason
    assert all(torch.equal(a, b) for a, (b, _) in zip(first, _items(again, 3)))
    monkeypatch.undo()
    path = ds.samples[0][0]
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert decoded_key(ImageFolderDataset(tmp_path / "img", min_size=20), SPEC, "standard") != plan.key
    assert not [p for p in (cache / "decoded").iterdir() if p.name.startswith(".")]  # no half-written entry


def test_a_damaged_entry_is_decoded_again_and_a_changed_one_is_not_trained_on(tmp_path):
    """A missing, cut or edited file of an entry (flipped targets: silently wrong labels) is
    found by its digest, said, and decoded again; later runs read the new entry. Temporaries
    of killed writers are removed; the entry has the umask's mode (a shared cache_dir)."""
    import warnings

    ds = _folder(tmp_path)
    cache = tmp_path / "cache"
    dec, plan = decoded_dataset(ds, SPEC, augment="none", cache_dir=cache, num_workers=0)
    want = [(x, y) for x, y in _items(dec, 0)]
    assert oct(plan.path.stat().st_mode & 0o777) == oct(0o777 & ~_umask())
    targets = np.load(plan.path / "targets.npy")
    damages = {"targets flipped": lambda p: np.save(p / "targets.npy", 1 - targets),
               "pixels cut": lambda p: os.truncate(p / "pixels.npy", 200),
               "index gone": lambda p: os.remove(p / "index.npy"),
               "meta garbled": lambda p: (p / "meta.json").write_text("{bad")}
    for what, damage in damages.items():
        damage(plan.path)
        with pytest.warns(UserWarning, match="are damaged .*; decoding them again"):
            again, _ = decoded_dataset(ds, SPEC, augment="none", cache_dir=cache, num_workers=0)
        got = _items(again, 0)
        assert all(torch.equal(a, b) and ya == yb for (a, ya), (b, yb) in zip(want, got)), what
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the entry written again is whole
            decoded_dataset(ds, SPEC, augment="none", cache_dir=cache, num_workers=0)
    import subprocess
    import sys

    code = f"from transferkit._io import create_temp; print(create_temp({str(plan.path)!r}, directory=True))"
    stale = Path(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                                env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}).stdout.strip())
    assert stale.is_dir()  # a writer that died while writing this entry
    (plan.path / "meta.json").unlink()
    with pytest.warns(UserWarning, match="are damaged"):
        decoded_dataset(ds, SPEC, augment="none", cache_dir=cache, num_workers=0)
    assert not stale.exists()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_over_the_budget_without_cache_dir_decodes_every_epoch_and_says_so(tmp_path):
    ds = _folder(tmp_path)
    plan = plan_decode(ds, SPEC, augment="standard", budget_bytes=100)
    assert plan.mode == "off" and "budget" in plan.reason and "cache_dir" in plan.reason
    out, plan = decoded_dataset(ds, SPEC, augment="standard", budget_bytes=100)
    assert isinstance(out, ImageFolderDataset) and out.transform is not None
    assert plan.estimate_bytes >= sum(3 * 20 * 20 for _ in range(len(ds)))


def test_in_memory_datasets_and_float_targets(tmp_path):
    from transferkit.train.tasks import TargetDataset

    imgs = torch.randint(0, 256, (5, 3, 24, 28), dtype=torch.uint8)
    base = [(imgs[i], [float(i), 1.0]) for i in range(5)]
    ds = TargetDataset(base)
    for cache_dir in (None, tmp_path / "c"):
        dec, plan = decoded_dataset(ds, SPEC, augment="flip", cache_dir=cache_dir, num_workers=0)
        assert plan.mode == ("memory" if cache_dir is None else "disk")
        ref = ds.view(transform=train_transform(SPEC, "flip"))
        for (a, ya), (b, yb) in zip(_items(dec, 2), _items(ref, 2)):
            assert torch.equal(a, b) and torch.equal(ya, yb)
    plain = TransformedDataset(torch.utils.data.TensorDataset(imgs, torch.arange(5)))
    dec, _ = decoded_dataset(plain, SPEC, augment="standard", num_workers=0)
    assert min(dec.image(4).shape[1:]) == 20 and dec[4][1] == 4


def test_audio_specs_are_not_decoded_once(tmp_path):
    plan = plan_decode([], InputSpec(kind="audio", sample_rate=8000), augment="none")
    assert plan.mode == "off" and "audio" in plan.reason


@pytest.mark.parametrize("kind", ["folder", "shards"])
def test_an_unscanned_unreadable_image_is_replaced_when_decoded_once(tmp_path, kind):
    """With ``scan="none"`` an image that cannot be read reaches decode-once: its size is not
    known ahead (it will be replaced by another of its class when loaded, and is budgeted as
    the largest), and decoding once goes on and reports it, as a loader does."""
    import warnings

    from shard_helpers import folder_items, write_shards

    from transferkit.data import prepare_data

    _folder(tmp_path)
    (tmp_path / "img" / "a" / "9.png").write_bytes(b"not an image" * 10)
    if kind == "folder":
        ds = ImageFolderDataset(tmp_path / "img", min_size=SPEC.resize_size, scan="none")
    else:
        write_shards(folder_items(tmp_path / "img"), tmp_path / "s", [7, 6])
        ds = prepare_data(str(tmp_path / "s"), val_split=0, scan="none", min_size=SPEC.resize_size).train
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dec, plan = decoded_dataset(ds, SPEC, augment="none", num_workers=0)
        items = _items(dec, 0)
    assert plan.mode == "memory" and len(items) == 13
    assert all(x.shape == (3, 16, 16) for x, _ in items)
    assert [y for _, y in items] == ds.targets
    assert len(ds.report.bad_at_load) == 1
