"""GPU JPEG decoding loader: guarded by device type; batching, transforms and seeding checked
with the CPU decoder (no GPU in CI)."""

from __future__ import annotations

import pytest
import torch

from transferkit.backbones._base import InputSpec
from transferkit.data import ImageFolderDataset, eval_transform
from transferkit.data.gpu_jpeg import DeviceDecodedLoader, gpu_jpeg_available, gpu_jpeg_loader
from transferkit.errors import ConfigError

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
