"""GPU JPEG decoding: the loader (guarded by device type; batching, transforms, seeding, the
rank split and bad files checked with the CPU decoder: no GPU in CI), the input-decode rule,
and the run's passes on device-decoded images."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import make_image_folder
from transferkit.backbones._base import InputSpec
from transferkit.data import ImageFolderDataset, eval_transform
from transferkit.data.gpu_jpeg import (MIN_SPEEDUP, DeviceDecodedLoader, decide_input_decode, gpu_jpeg_available,
                                      gpu_jpeg_loader, input_decode_facts, jpeg_census, time_decoders)
from transferkit.errors import ConfigError, DataError
from transferkit.train.loaders import make_loader

SPEC = InputSpec(image_size=16, resize_size=20)


def test_refuses_devices_other_than_cuda(image_folder):
    ok, why = gpu_jpeg_available(torch.device("cpu"))
    assert not ok and "CUDA" in why
    with pytest.raises(ConfigError, match="CUDA.*CPU decoder"):
        gpu_jpeg_loader(ImageFolderDataset(image_folder), SPEC, augment="none", batch_size=4,
                        device=torch.device("cpu"))


def test_batches_match_the_cpu_eval_pipeline_for_jpeg_and_png(image_folder):
    ds = ImageFolderDataset(image_folder)  # half JPEG (decoded in batches), half PNG (decoded by Pillow)
    loader = DeviceDecodedLoader(ds, SPEC, augment="none", batch_size=5, device=torch.device("cpu"), num_workers=0)
    xs, ys = zip(*loader)
    x, y = torch.cat(xs), torch.cat(ys)
    assert x.shape == (len(ds), 3, 16, 16) and x.dtype == torch.uint8 and y.tolist() == ds.targets
    ref = torch.stack([eval_transform(SPEC)(ds[i][0]) for i in range(len(ds))])
    # decoders and resampling (tensor vs Pillow) differ slightly; the images are the same
    assert (x.float() - ref.float()).abs().mean() < 3.0


def test_random_crops_are_seeded_by_epoch_and_index(image_folder):
    ds = ImageFolderDataset(image_folder)
    def mk():
        return DeviceDecodedLoader(ds, SPEC, augment="standard", batch_size=6, device=torch.device("cpu"),
                                   shuffle=True, seed=3, num_workers=0)

    a, b = mk(), mk()
    a.set_epoch(1)
    b.set_epoch(1)
    (xa, ya), (xb, yb) = next(iter(a)), next(iter(b))
    assert torch.equal(xa, xb) and torch.equal(ya, yb)
    b.set_epoch(2)
    assert not torch.equal(next(iter(b))[0], xa)


# -- the rule (pure) ------------------------------------------------------------------------------
def _facts(files=100, jpeg=100, ok=True, gpu=3100.0, cpu=1000.0, skipped=None):
    why = "nvJPEG through torchvision.io.decode_jpeg" if ok else \
        "torchvision.io.decode_jpeg(device='cuda') failed: RuntimeError: built without nvJPEG"
    measured = None if gpu is None else {"cpu_images_per_s": cpu, "gpu_images_per_s": gpu, "batches": 4,
                                         "batch_size": 128, "workers": 8}
    return {"census": {"files": files, "jpeg": jpeg}, "available": [ok, why], "measured": measured,
            "skipped": skipped}


def test_auto_decodes_on_the_gpu_only_where_it_was_timed_faster_on_mostly_jpeg_files():
    assert decide_input_decode("auto", device_type="cuda", facts=_facts()) == \
        ("gpu", "nvJPEG decoded 3.10x faster than 8 CPU workers on 4 batches (3100 vs 1000 img/s)")
    where, why = decide_input_decode("auto", device_type="cuda", facts=_facts(gpu=1050.0))
    assert where == "cpu" and "1.05x" in why and f"{MIN_SPEEDUP:g}x faster" in why
    assert decide_input_decode("auto", device_type="cuda", facts=_facts(jpeg=60)) == \
        ("cpu", "40% of the images are not JPEG (GPU decoding needs 90% JPEG)")
    where, why = decide_input_decode("auto", device_type="cuda", facts=_facts(ok=False))
    assert where == "cpu" and "built without nvJPEG" in why
    where, why = decide_input_decode("auto", device_type="cuda", facts=_facts(gpu=None, skipped="too little data"))
    assert (where, why) == ("cpu", "not timed: too little data")
    assert decide_input_decode("auto", device_type="cpu", facts=_facts())[0] == "cpu"
    assert decide_input_decode("auto", device_type="cuda", facts={"census": None})[1] == \
        "the data are not image files on disk"
    assert decide_input_decode("cpu", device_type="cuda", facts=_facts()) == ("cpu", "input_decode='cpu'")


def test_forcing_the_gpu_where_it_cannot_run_says_why():
    assert decide_input_decode("gpu", device_type="cuda", facts=_facts(gpu=None))[0] == "gpu"
    with pytest.raises(ConfigError, match="input_decode='gpu' decodes JPEGs with nvJPEG on a CUDA device; this run "
                                          "is on 'cpu'"):
        decide_input_decode("gpu", device_type="cpu", facts=_facts())
    with pytest.raises(ConfigError, match="not image files on disk"):
        decide_input_decode("gpu", device_type="cuda", facts={"census": None})
    with pytest.raises(ConfigError, match="cannot run here: .*built without nvJPEG"):
        decide_input_decode("gpu", device_type="cuda", facts=_facts(ok=False))
    with pytest.raises(ConfigError, match="input_decode"):
        decide_input_decode("tpu", device_type="cuda", facts=_facts())


def test_census_counts_jpeg_files_and_only_files_on_disk(image_folder):
    ds = ImageFolderDataset(image_folder)  # half .jpg, half .png
    assert jpeg_census(ds) == {"files": len(ds), "jpeg": len(ds) // 2}
    assert jpeg_census(torch.utils.data.TensorDataset(torch.zeros(3, 2))) is None
    on_cpu = input_decode_facts("auto", parts={"train": ds, "val": None}, spec=SPEC, device=torch.device("cpu"),
                                batch_size=4, num_workers=0)
    assert on_cpu == {"census": {"files": len(ds), "jpeg": len(ds) // 2}, "available": None, "measured": None,
                      "skipped": None}  # nothing is timed without CUDA


def test_on_cuda_the_timing_is_kept_under_cache_dir_and_a_failure_is_a_reason(image_folder, tmp_path, monkeypatch):
    from transferkit.data import gpu_jpeg

    # stand-ins for a CUDA machine: the probe succeeds, the timing is counted (the rule is tested above)
    monkeypatch.setattr(gpu_jpeg, "gpu_jpeg_available", lambda device: (True, "nvJPEG (stand-in)"))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "stand-in GPU")
    monkeypatch.setattr(gpu_jpeg, "MIN_JPEG_SHARE", 0.5)
    monkeypatch.setattr(gpu_jpeg, "MIN_IMAGES_TO_TIME", 1)
    timed = []

    def fake_time(dataset, spec, **kw):
        timed.append(len(dataset))
        return {"cpu_images_per_s": 100.0, "gpu_images_per_s": 300.0, "batches": 4, "batch_size": 4, "workers": 0}

    monkeypatch.setattr(gpu_jpeg, "time_decoders", fake_time)
    ds = ImageFolderDataset(image_folder)
    kw = dict(parts={"train": ds, "val": None}, spec=SPEC, device=torch.device("cuda"), batch_size=4, num_workers=0,
              cache_dir=tmp_path / "c")
    first, again = input_decode_facts("auto", **kw), input_decode_facts("auto", **kw)
    assert timed == [len(ds)] and "stored" not in first["measured"] and again["measured"]["stored"] is True
    assert decide_input_decode("auto", device_type="cuda", facts=again)[0] == "gpu"

    def broken(*a, **k):
        raise RuntimeError("CUDA error: out of memory")

    monkeypatch.setattr(gpu_jpeg, "time_decoders", broken)
    failed = input_decode_facts("auto", **{**kw, "cache_dir": None})
    assert failed["skipped"] == "timing failed: RuntimeError: CUDA error: out of memory"
    assert decide_input_decode("auto", device_type="cuda", facts=failed) == \
        ("cpu", "not timed: timing failed: RuntimeError: CUDA error: out of memory")


def test_decoders_are_timed_on_the_runs_own_files(image_folder):
    # the timing itself runs on any device (here: torchvision's CPU decoder against Pillow)
    m = time_decoders(ImageFolderDataset(image_folder), SPEC, device=torch.device("cpu"), batch_size=4,
                      num_workers=0, batches=2)
    assert m["batches"] == 2 and m["cpu_images_per_s"] > 0 and m["gpu_images_per_s"] > 0


# -- the loader's rank split and bad files ---------------------------------------------------------
def _indices(loader):
    return [i for batch in loader for i, *_ in batch]


def test_ranks_split_as_the_cpu_loaders_do_and_see_every_sample_once(image_folder):
    ds = ImageFolderDataset(image_folder)
    cpu = torch.device("cpu")
    seen = []
    for r in range(2):
        dev = DeviceDecodedLoader(ds, SPEC, augment="none", batch_size=5, device=cpu, num_workers=0, rank=r,
                                  world_size=2, pad=False, checked=True)
        ref = make_loader(ds.view(transform=eval_transform(SPEC)), batch_size=5, shuffle=False, device=cpu,
                          num_workers=0, rank=r, world_size=2, pad=False)
        assert list(dev.sampler) == list(ref.sampler)
        seen += _indices(dev)
    assert sorted(seen) == list(range(len(ds)))  # validation: each sample exactly once across the ranks
    train = [DeviceDecodedLoader(ds, SPEC, augment="standard", batch_size=5, device=cpu, num_workers=0, rank=r,
                                 world_size=2, shuffle=True, seed=1, drop_last=True) for r in range(2)]
    assert len(train[0]) == len(train[1]) >= 1  # training: the same number of batches on every rank


def test_a_bad_jpeg_is_replaced_raised_or_masked_as_on_the_cpu(image_folder):
    bad = image_folder / "dark" / "zz_bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff" + b"\x00" * 64)  # a JPEG header, then nothing decodable
    cpu = torch.device("cpu")
    skip = ImageFolderDataset(image_folder, scan="none")
    index = [str(p) for p, _ in skip.samples].index(str(bad))
    with pytest.warns(UserWarning, match="zz_bad.jpg.*the next readable file with its label .or targets. takes its"):
        x, y = zip(*DeviceDecodedLoader(skip, SPEC, augment="none", batch_size=4, device=cpu, num_workers=0))
    assert torch.cat(x).shape[0] == len(skip) and str(bad) in skip.report.bad_at_load  # replaced and reported
    with pytest.raises(DataError, match="zz_bad.jpg"):
        list(DeviceDecodedLoader(ImageFolderDataset(image_folder, scan="none", on_bad_file="raise"), SPEC,
                                 augment="none", batch_size=4, device=cpu, num_workers=0))
    checked = [it for batch in DeviceDecodedLoader(ImageFolderDataset(image_folder, scan="none"), SPEC,
                                                   augment="none", batch_size=4, device=cpu, num_workers=0,
                                                   checked=True) for it in batch]
    masked = [(i, why) for i, img, _, why in checked if img is None]
    assert len(checked) == len(skip) and [i for i, _ in masked] == [index] and "zz_bad.jpg" in masked[0][1]
    with pytest.raises(DataError, match="zz_bad.jpg"):  # on_bad_file="raise": raised, not masked
        list(DeviceDecodedLoader(ImageFolderDataset(image_folder, scan="none", on_bad_file="raise"), SPEC,
                                 augment="none", batch_size=4, device=cpu, num_workers=0, checked=True))


# -- the run's passes on device-decoded images (torchvision's CPU decoder stands in for nvJPEG) ----
FEATURE_TOLERANCE = 0.03  # max |device - Pillow| <= this x max |Pillow| (decoder and resampling differ)


def _run_parts(folder, **kw):
    """The decisions of a frozen run on CPU (Pillow) and the same decisions decoding on the device."""
    import dataclasses

    import transferkit as tk
    from transferkit.config import FinetuneConfig

    torch.manual_seed(0)
    bb = tk.get_backbone("tk:small_cnn", weights=None, widths=(8, 8, 16))
    cfg = FinetuneConfig(**{**dict(backbone=bb, data=folder, weights=None, image_size=16, epochs=2, batch_size=4,
                                   device="cpu", num_workers=0, verbose=False, precision="fp32",
                                   channels_last=False, feature_engine="eager", compile=False), **kw})
    facts, inputs = tk.look(cfg)
    d = tk.decide(cfg, facts)
    passes = d.input_decode["passes"]
    on_device = dataclasses.replace(d, input_decode={"where": "gpu", "reason": "forced in a test", "passes": passes})
    return d, on_device, inputs


def _close(a, b):
    a, b = torch.as_tensor(a).float(), torch.as_tensor(b).float()
    assert a.shape == b.shape
    assert (a - b).abs().max() <= FEATURE_TOLERANCE * a.abs().max()


@pytest.fixture
def jpeg_folder(tmp_path):
    return make_image_folder(tmp_path / "img", per_class=9, size=40)


def _counting(monkeypatch):
    """The indices the device loaders decode, in order."""
    decoded: list[int] = []
    real = DeviceDecodedLoader._decode

    def counting(self, items):
        decoded.extend(k[0] for _, _, k in items)
        return real(self, items)

    monkeypatch.setattr(DeviceDecodedLoader, "_decode", counting)
    return decoded


def test_feature_pass_on_device_decoded_images_matches_pillow(jpeg_folder, monkeypatch):
    from transferkit.run import build
    from transferkit.steps import cached_features

    d, on_device, inputs = _run_parts(jpeg_folder)
    assert on_device.feature_key_parts("train") != d.feature_key_parts("train")
    cpu = cached_features(d, build(d, inputs)).stores
    decoded = _counting(monkeypatch)
    dev = cached_features(on_device, build(on_device, inputs)).stores
    assert len(decoded) == on_device.n_train + on_device.n_val  # the device path ran, once per sample
    for part in ("train", "val"):
        assert (cpu[part].targets == dev[part].targets).all()
        _close(cpu[part].features, dev[part].features)


def test_feature_store_on_device_decoded_images_two_ranks_each_sample_once(jpeg_folder, tmp_path, monkeypatch):
    from transferkit.data import eval_transform as eval_tf
    from transferkit.run import build
    from transferkit.steps import device_item_batches
    from transferkit.train.feature_store import ShardedFeatureStore, extract_parts

    d, on_device, inputs = _run_parts(jpeg_folder)
    run = build(on_device, inputs)
    ds, spec = run.bundle.train, on_device.input_spec
    decoded = _counting(monkeypatch)
    model = run.model.eval()
    fwd = model.features
    kw = dict(num_samples=len(ds), part_size=4, dim=run.backbone.num_features)
    stores = [ShardedFeatureStore.open(tmp_path / "dev", "k", **kw) for _ in range(2)]
    for rank, store in enumerate(stores):  # two ranks, one after the other, on one store
        extract_parts(store, ds.view(transform=eval_tf(spec)), fwd, rank=rank, world_size=2, batch_size=3,
                      batches=device_item_batches(on_device, ds, "val", batch_size=3, device=torch.device("cpu"),
                                                  num_workers=0))
    assert sorted(decoded) == list(range(len(ds)))  # every sample decoded exactly once across the ranks
    whole = ShardedFeatureStore.open(tmp_path / "dev", "k", **kw)
    assert whole.missing_parts() == []
    ref = ShardedFeatureStore.open(tmp_path / "cpu", "k", **kw)
    extract_parts(ref, ds.view(transform=eval_tf(spec)), fwd, batch_size=3)  # the CPU (Pillow) path
    (x_dev, y_dev, _), (x_cpu, y_cpu, _) = whole.load(), ref.load()
    assert torch.equal(y_dev, y_cpu)
    _close(x_cpu, x_dev)


def test_training_epochs_run_on_device_decoded_images(jpeg_folder):
    from transferkit.run import build
    from transferkit.steps import train

    d, on_device, inputs = _run_parts(jpeg_folder, policy="fine_tune:frozen=1", epochs=3, decode_once=False,
                                      augment="standard")
    assert on_device.input_decode["passes"] == ["feature pass", "train epochs", "val epochs"]
    outcome = train(on_device, build(on_device, inputs))
    assert isinstance(outcome.data.train_loader, DeviceDecodedLoader)
    assert isinstance(outcome.data.val_loader, DeviceDecodedLoader)
    assert len(outcome.history) == 3 and all(torch.isfinite(torch.tensor(h["train_loss"])) for h in outcome.history)
