"""GPU JPEG decoding: the loader (guarded by device type; batching, transforms, seeding, the
rank split and bad files checked with the CPU decoder: no GPU in CI), the input-decode rule,
and the run's passes on device-decoded images."""

from __future__ import annotations

import pytest
import torch

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
    with pytest.warns(UserWarning, match="zz_bad.jpg.*another file of its class takes its place"):
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
