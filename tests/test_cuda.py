"""On a CUDA device (skipped without one): a frozen trunk stays bit-for-bit unchanged, full
fine-tuning in bf16 moves every trainable weight, an export of a model trained on the GPU
loads and agrees on the CPU, and nvJPEG batches are the images the CPU pipeline makes."""

from __future__ import annotations

import pytest
import torch

import transferkit as tk
from tests.conftest import make_image_folder
from transferkit.backbones._base import InputSpec
from transferkit.data import ImageFolderDataset, eval_transform
from transferkit.data.gpu_jpeg import DeviceDecodedLoader, gpu_jpeg_available

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")
CUDA = torch.device("cuda")


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


@pytest.mark.parametrize("cache", ["auto", False])
def test_frozen_trunk_is_bit_for_bit_unchanged_on_cuda(image_folder, cache):
    bb = tk.get_backbone("tv:resnet18", weights=None)
    before = _state(bb.trunk)
    r = tk.finetune(bb, data=image_folder, policy="feature_extraction", image_size=32, epochs=2, batch_size=8,
                    cache_features=cache, augment="flip", verbose=False, num_workers=0, device="cuda")
    assert r.decisions.device_type == "cuda"
    after = _state(r.model.trunk)
    assert before.keys() == after.keys() and any("running_mean" in k for k in before)
    assert all(torch.equal(before[k], after[k]) for k in before), "a frozen trunk changed on CUDA"
    assert r.used_feature_cache is (cache == "auto")
    assert len(r.history) == 2 and all(torch.isfinite(torch.tensor(h["train_loss"])) for h in r.history)


def test_full_fine_tuning_on_cuda_moves_the_weights_and_exports_for_the_cpu(image_folder, tmp_path):
    bb = tk.get_backbone("tv:resnet18", weights=None)
    before = _state(bb.trunk)
    r = tk.finetune(bb, data=image_folder, policy="full", image_size=32, epochs=2, batch_size=8, verbose=False,
                    num_workers=0, device="cuda", precision="bf16", export=tmp_path / "m.pt")
    after = _state(r.model.trunk)
    weights = [k for k, v in before.items() if v.is_floating_point() and "running" not in k]
    assert all(not torch.equal(before[k], after[k]) for k in weights if k.endswith("weight")), \
        "a trainable weight did not move"
    assert r.export_report is not None and r.export_report.path.exists()
    m = tk.load(r.export_report.path, device="cpu")
    ds = ImageFolderDataset(image_folder)
    images = [ds[i][0] for i in range(4)]
    got = m.predict_proba(images)
    eager = r.model.float().cpu().eval()
    x = torch.stack([eval_transform(m.input_spec)(img) for img in images])
    with torch.no_grad():
        probs = torch.softmax(eager(x), -1)
    torch.testing.assert_close(got, probs, atol=1e-4, rtol=1e-4)


def test_a_hybrid_trunk_trains_on_cuda_with_its_layout_timed_there(image_folder):
    # a ViT's conv stem makes it hybrid: its layout is timed before the run moves the trunk to
    # the device (timing it in place once fed CUDA inputs to CPU weights)
    from tests.test_policies_models import tv_backbone

    bb = tv_backbone("vit")
    r = tk.finetune(bb, data=image_folder, policy="full", image_size=32, epochs=1, batch_size=8, verbose=False,
                    num_workers=0, device="cuda")
    assert "timed on cuda" in r.decisions.speed["reasons"]["channels_last"]
    assert next(bb.trunk.parameters()).device.type == "cpu"  # the caller's trunk is where it was
    assert torch.isfinite(torch.tensor(r.history[-1]["train_loss"]))


def test_nvjpeg_batches_match_the_cpu_pipeline(tmp_path):
    ok, why = gpu_jpeg_available(CUDA)
    if not ok:
        pytest.skip(why)
    folder = make_image_folder(tmp_path / "images", per_class=10, size=40)
    spec = InputSpec(image_size=32, resize_size=36)
    ds = ImageFolderDataset(folder)
    loader = DeviceDecodedLoader(ds, spec, augment="none", batch_size=6, device=CUDA, num_workers=0)
    xs, ys = zip(*loader)
    x, y = torch.cat(xs), torch.cat(ys)
    assert x.device.type == "cuda" and x.dtype == torch.uint8 and x.shape == (len(ds), 3, 32, 32)
    assert y.tolist() == ds.targets
    ref = torch.stack([eval_transform(spec)(ds[i][0]) for i in range(len(ds))])
    # nvJPEG and libjpeg round differently, and the resize runs on tensors: the same images
    assert (x.cpu().float() - ref.float()).abs().mean() < 3.0
