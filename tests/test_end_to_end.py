"""The whole journey: finetune() -> export -> load().predict(), with its guarantees."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import transferkit as tk

pytestmark = pytest.mark.precision_auto  # the outcome depends on what the CPU's bf16 support decides


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}  # on the CPU wherever it ran


@pytest.mark.parametrize("cache", ["auto", False])
def test_feature_extraction_leaves_backbone_bit_for_bit_unchanged(image_folder, cache):
    bb = tk.get_backbone("tv:resnet18", weights=None)
    before = _state(bb.trunk)
    assert any("running_mean" in k for k in before)  # the check covers BatchNorm statistics
    head_probe = tk.finetune(bb, data=image_folder, policy="feature_extraction", image_size=32, epochs=2,
                             batch_size=8, cache_features=cache, augment="flip", verbose=False, num_workers=0)
    after = _state(head_probe.model.trunk)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before), "a frozen backbone changed"
    assert head_probe.used_feature_cache is (cache == "auto")
    fresh_head = tk.build_head(bb.num_features, 2)
    assert head_probe.model.head[-1].weight.shape == fresh_head[-1].weight.shape
    assert len(head_probe.history) == 2


def test_feature_extraction_trains_the_head(image_folder):
    tk.seed_everything(0)
    bb = tk.get_backbone("tk:small_cnn", weights=None)
    r = tk.finetune(bb, data=image_folder, policy="feature_extraction", epochs=1, batch_size=8, verbose=False,
                    restore_best=False, num_workers=0)
    tk.seed_everything(0)
    untouched = tk.build_head(bb.num_features, 2)  # the same initial head: seeded identically
    assert not torch.equal(r.model.head[-1].weight.cpu(), untouched[-1].weight)


def test_finetune_changes_backbone_weights(image_folder):
    bb = tk.get_backbone("tk:small_cnn", weights=None)
    before = _state(bb.trunk)
    r = tk.finetune(bb, data=image_folder, policy="full", epochs=1, batch_size=8, verbose=False,
                    restore_best=False, num_workers=0)
    after = _state(r.model.trunk)
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert any(k.endswith("weight") and "stem" in k for k in changed)
    assert any(k.endswith("running_mean") for k in changed)
    assert not r.used_feature_cache


def test_export_parity_and_predict_right_labels(image_folder, tmp_path):
    out = tmp_path / "model.pt"
    r = tk.finetune("tk:small_cnn", weights=None, data=image_folder, policy="full", epochs=6, batch_size=8,
                    lr=3e-3, verbose=False, export=out, num_workers=0, augment="none")
    assert r.export_path == out and out.is_file()
    assert r.export_report.max_abs_diff <= 1e-5
    predictor = tk.load(out)
    assert predictor.labels == ["dark", "light"]
    files = sorted(str(p) for p in image_folder.rglob("*.*"))
    preds = predictor.predict(files, top_k=2)
    truth = [Path(f).parent.name for f in files]
    accuracy = sum(p.label == t for p, t in zip(preds, truth)) / len(files)
    assert accuracy >= 0.9, accuracy
    assert all(len(p.top_k) == 2 and abs(sum(q for _, q in p.top_k) - 1) < 1e-4 for p in preds)
    # the exported file gives the same logits as the eager model on the same uint8 batch
    batch = torch.stack([tk.data.eval_transform(r.decisions.input_spec)(
        tk.data.load_image(f)) for f in files[:4]])
    scripted = torch.jit.load(str(out))
    with torch.no_grad():
        assert torch.allclose(scripted(batch), r.model.cpu().eval()(batch), atol=1e-5)


def test_dataset_of_image_label_pairs(tmp_path):
    # any torch Dataset of (image, label): tensors in [0, 1] here
    g = torch.Generator().manual_seed(0)
    xs = torch.cat([torch.rand(10, 3, 20, 20, generator=g) * 0.3, 0.7 + torch.rand(10, 3, 20, 20, generator=g) * 0.3])
    ys = [0] * 10 + [1] * 10
    ds = torch.utils.data.TensorDataset(xs, torch.tensor(ys))
    r = tk.finetune("tk:small_cnn", weights=None, data=ds, classes=["low", "high"], policy="full",
                    epochs=3, batch_size=4, verbose=False, augment="none", image_size=16)
    assert r.classes == ["low", "high"]
    assert len(r.history) == 3 and "val_acc" in r.history[-1]


def test_stratified_split_keeps_classes_in_both_parts(image_folder):
    bundle = tk.data.prepare_data(image_folder, val_split=0.25)
    tr, va = tk.data.dataset_targets(bundle.train), tk.data.dataset_targets(bundle.val)
    assert sorted(set(tr)) == sorted(set(va)) == [0, 1]
    assert len(tr) + len(va) == 24 and len(va) == 6


def test_unknown_backbone_suggests_names():
    with pytest.raises(tk.UnknownBackboneError, match=r"tv:resnet50.*list_backbones"):
        tk.get_backbone("tv:resnet5", weights=None)


def test_folder_without_images_is_a_clear_error(tmp_path):
    (tmp_path / "cats").mkdir()
    (tmp_path / "dogs").mkdir()
    (tmp_path / "dogs" / "notes.txt").write_text("not an image")
    with pytest.raises(tk.DataError, match="No images found"):
        tk.finetune("tk:small_cnn", weights=None, data=tmp_path, epochs=1, verbose=False)
    with pytest.raises(tk.DataError, match="does not exist"):
        tk.finetune("tk:small_cnn", weights=None, data=tmp_path / "missing", epochs=1, verbose=False)


def test_pretrained_weights_without_internet_never_fall_back_to_random(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty cache: the download is attempted and fails here
    import urllib.request

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(tk.WeightsError, match="put it at"):
        tk.get_backbone("tv:resnet18", weights="DEFAULT")


@pytest.mark.data
def test_hymenoptera_feature_extraction_export_and_predict(shared_data, tmp_path):
    """The same journey on the real ants/bees JPEGs."""
    root = shared_data / "hymenoptera"
    bb = tk.get_backbone("tv:resnet18", weights=None)
    before = _state(bb.trunk)
    r = tk.finetune(bb, data=root / "train", val_data=root / "val", policy="feature_extraction", image_size=64,
                    epochs=3, verbose=False, export=tmp_path / "ants_bees.pt")
    assert all(torch.equal(before[k], v) for k, v in _state(r.model.trunk).items())
    assert r.export_report.max_abs_diff <= 1e-5
    files = sorted((root / "val" / "bees").glob("*.jpg"))[:4] + sorted((root / "val" / "ants").glob("*.jpg"))[:4]
    preds = tk.load(tmp_path / "ants_bees.pt").predict(files)
    assert len(preds) == 8 and {p.label for p in preds} <= {"ants", "bees"}
