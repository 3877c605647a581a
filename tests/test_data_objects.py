"""Datasets given as objects (torchvision datasets, `random_split` subsets, tensors, arrays) and
image files of other bit depths: read the way their files and ``predict`` read them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import Subset, TensorDataset
from torchvision.datasets import ImageFolder

from transferkit.backbones import InputSpec
from transferkit.data import eval_transform, prepare_data, train_transform
from transferkit.data.images import load_image
from transferkit.errors import DataError

SPEC = InputSpec(image_size=8, resize_size=None, mean=(0.5,) * 3, std=(0.5,) * 3)


def _folders(root: Path, names: list[str], per_class: int = 2) -> Path:
    for k, name in enumerate(names):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", (8, 8), (20 * k, 10 * i, 0)).save(root / name / f"{i}.png")
    return root


def test_a_subset_of_a_named_dataset_keeps_its_class_names_for_the_validation_data(tmp_path):
    """A `random_split`/`Subset` training set named its classes '0', '1', ... by index: a
    validation folder's class '2' was then read as index 2, which is the class '10'."""
    names = ["0", "1", "10", "2"]  # ImageFolder's sorted order
    train = ImageFolder(_folders(tmp_path / "train", names))
    val = ImageFolder(_folders(tmp_path / "val", ["0", "10", "2"]))
    bundle = prepare_data(Subset(train, range(len(train))), val_data=val)
    assert bundle.classes == names
    seen = {bundle.classes[t] for t in _targets(bundle.val)}
    got = sorted((val.classes[t], bundle.classes[v]) for (_, t), v in zip(val.samples, _targets(bundle.val)))
    assert seen == {"0", "10", "2"} and all(a == b for a, b in got), got


def test_training_data_without_names_read_named_validation_data_by_index_and_say_so(tmp_path):
    x = torch.zeros(4, 3, 8, 8, dtype=torch.uint8)
    val = ImageFolder(_folders(tmp_path / "val", ["cat", "dog"]))
    with pytest.warns(UserWarning, match=r"The training data name no classes .* Give classes=\[\.\.\.\]"):
        bundle = prepare_data(TensorDataset(x, torch.tensor([0, 1, 0, 1])), val_data=val)
    assert bundle.classes == ["0", "1"] and _targets(bundle.val) == [t for _, t in val.samples]


def test_a_target_transform_decides_the_classes(tmp_path):
    """The labels a dataset's items return count, not its ``targets`` attribute."""
    ds = ImageFolder(_folders(tmp_path / "num", ["0", "1", "10", "2"]), target_transform=lambda t: int(t != 0))
    bundle = prepare_data(ds)
    assert bundle.classes == ["0", "1"]
    assert sorted(_targets(bundle.train) + _targets(bundle.val)) == [0] * 2 + [1] * 6


def _targets(ds) -> list[int]:
    from transferkit.data.images import dataset_targets

    return dataset_targets(ds)


@pytest.mark.parametrize("transform", [eval_transform(SPEC), train_transform(SPEC, "none")])
def test_16_bit_float_and_channel_last_images_train_as_predict_reads_them(transform):
    """A uint16 tensor was given to the model unscaled in training (0..65535) but scaled to
    8 bits by predict; arrays HxWx1 and float HxWx3 crashed inside Pillow (read through the
    dataset, as training reads them)."""
    g = torch.Generator().manual_seed(0)
    u8 = torch.randint(0, 256, (3, 8, 8), dtype=torch.uint8, generator=g)
    gray = u8[:1]
    items = [u8, (u8.to(torch.int32) * 257).to(torch.uint16), u8.permute(1, 2, 0).numpy().astype(np.uint16) * 257,
             u8.float() / 255, u8.permute(1, 2, 0).numpy().astype(np.float32) / 255, gray,
             gray.permute(1, 2, 0).numpy()]
    ds = prepare_data([(x, k % 2) for k, x in enumerate(items)], val_split=0).train.view(transform=transform)
    got = [ds[k][0] for k in range(len(items))]
    assert all(torch.equal(x, got[0]) for x in got[1:3])
    assert all(torch.allclose(x.float() * 255, got[0].float(), atol=1e-3) for x in got[3:5])
    assert torch.equal(got[6], got[5])  # HxWx1 as [1,H,W]


def test_a_float_image_a_little_outside_0_1_is_clipped_and_the_callers_tensor_kept():
    """A bicubic resize overshoots [0, 1]; refused, it stopped a run in the middle of an epoch."""
    from transferkit.data.images import check_image_tensor

    t = torch.tensor([[[-0.15, 0.5], [1.14, 1.0]]])
    assert check_image_tensor(t, "train on").tolist() == [[[0.0, 0.5], [1.0, 1.0]]]
    assert t[0, 0, 0].item() == pytest.approx(-0.15)


@pytest.mark.parametrize("image, said", [
    (torch.full((3, 8, 8), 200.0), r"item 0: A float image must hold values in \[0, 1\], got \[200, 200\]"),
    (torch.linspace(-2.1, 2.6, 192).reshape(3, 8, 8), r"got \[-2.1, 2.6\]; it looks normalised with a mean and std: "
                                                      r"give the images before that"),
    (np.zeros((3, 8, 8), np.uint8), r"item 0: A numpy image must be HxWxC \(channels last\)"),
    (torch.zeros(8, 8, 3), r"item 0: An image tensor must be \[C,H,W\].*channels last \(\[H,W,C\]\) is "
                           r"\.permute\(2, 0, 1\)"),
    (torch.zeros(3, 8, 8, dtype=torch.int64), r"got torch.int64; integer pixels in 0..255 are .to\(torch.uint8\) \(a "
                                              r"numpy array: .astype\(np.uint8\)\)"),
])
def test_a_dataset_of_images_the_model_cannot_take_is_refused_before_training(image, said):
    with pytest.raises(DataError, match=said):
        prepare_data([(image, 0), (image, 1)] * 2)


def test_a_16_bit_file_opened_as_32_bit_is_scaled_by_its_depth_not_its_pixels(tmp_path):
    """A 16-bit PGM opens as Pillow mode "I": 255 read as white and 256 as black, by each
    image's own maximum; the file's 16 bits decide now."""
    got = []
    for value in (255, 256, 65535):
        path = tmp_path / f"{value}.pgm"
        path.write_bytes(b"P5 4 4 65535\n" + np.full(16, value, dtype=">u2").tobytes())
        got.append(int(np.asarray(load_image(path))[0, 0, 0]))
    assert got == [1, 1, 255]


@pytest.mark.parametrize("data, said", [
    ([("images/a/0.png", 0), ("images/b/1.png", 1)], r"item 0 holds the file path str 'images/a/0.png', where an image "
                                                     r"held in memory goes\. For \(path, label\) pairs write a CSV"),
    ([1, 2], r"item 0 is int 1: a dataset item is a pair \(image, label\)"),
    (["../imgs"], r"The training data are a list of 1 path \('../imgs', ...\): a list of paths names tar shards or "
                  r"Parquet files\. Give a folder or a CSV file alone"),  # `data: [../imgs]` in a config
    ([(np.zeros((8, 8, 3), np.uint8),)] * 2, r"item 0 is a tuple of 1 item: a dataset item is a pair \(image, "
                                             r"label\)"),
    ([(b"\x89PNG...", 0)] * 2, r"item 0 holds 7 bytes, where a decoded image goes: decode encoded image bytes first"),
    ({"train": [1]}, r"The training data is a dict \(keys \['train'\]\).*splits go to data= \(training\) and "
                     r"val_data="),
    (b"images/", r"The training data is bytes; give a path as text"),
])
def test_containers_that_are_no_dataset_of_images_are_said_before_training(data, said):
    """A list of (path, label) pairs, of numbers, a dict or a path as bytes gave a raw TypeError,
    KeyError or IndexError from inside the transforms."""
    with pytest.raises(DataError, match=said):
        prepare_data(data, val_split=0)


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L"])
def test_a_uint8_tensor_is_resized_as_its_file_is(tmp_path, mode):
    """A tensor went through torch's resize and a file through PIL's: the same pixels read with
    torchvision.io.read_image gave other model inputs (off by 1 in many pixels) and other
    probabilities than the file."""
    from torchvision.io import read_image

    rng = np.random.default_rng(0)
    arr = rng.integers(0, 255, (40, 40) if mode == "L" else (40, 40, len(mode)), dtype=np.uint8)
    Image.fromarray(arr, mode).save(tmp_path / "x.png")
    tf = eval_transform(InputSpec(image_size=32))
    from_file = tf(load_image(tmp_path / "x.png"))
    assert torch.equal(tf(read_image(str(tmp_path / "x.png"))), from_file)
    assert torch.equal(tf(arr), from_file)
