"""Feature cache: keyed by backbone + weights + transform + data; memory or memory-mapped disk;
K augmented views; reuse across runs with cache_dir; the logistic-regression probe."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

import transferkit as tk
from transferkit.backbones import from_module
from transferkit.data import ImageFolderDataset, eval_transform, train_transform
from transferkit.train.features import compute_features, data_fingerprint, feature_loader, load_cached
from transferkit.train.probe import fit_logistic_probe

pytestmark = pytest.mark.precision_auto  # the outcome depends on what the CPU's bf16 support decides


def _model(seed=0):
    torch.manual_seed(seed)
    bb = tk.get_backbone("tk:small_cnn", weights=None, widths=(8, 8, 16))
    return bb, tk.build_model(bb, 2).eval()


def test_fingerprint_changes_with_data(image_folder):
    ds = ImageFolderDataset(image_folder)
    before = data_fingerprint(ds)
    f = ds.samples[0][0]
    st = os.stat(f)
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # the file was rewritten
    assert data_fingerprint(ds) != before
    assert data_fingerprint(ds.view([0, 1, 2])) != data_fingerprint(ds)


def test_in_memory_dataset_fingerprint_follows_content():
    x = torch.randint(0, 255, (6, 3, 8, 8), dtype=torch.uint8)
    a = data_fingerprint(TensorDataset(x, torch.arange(6)))
    x2 = x.clone()
    x2[0, 0, 0, 0] ^= 1
    assert a == data_fingerprint(TensorDataset(x.clone(), torch.arange(6)))
    assert a != data_fingerprint(TensorDataset(x2, torch.arange(6)))


def test_disk_cache_is_memory_mapped_and_reused(image_folder, tmp_path):
    bb, model = _model()
    ds = ImageFolderDataset(image_folder).view(transform=eval_transform(bb.input_spec))
    cache = tmp_path / "cache"
    kw = dict(key="k1", views=1, batch_size=8, device=torch.device("cpu"), num_workers=0, seed=0, cache_dir=cache)
    first = compute_features(model, ds, **kw)
    assert not first.reused and isinstance(first.features, np.memmap)
    assert first.features.shape == (1, len(ds), 16)
    mem = compute_features(model, ds, **{**kw, "cache_dir": None})
    np.testing.assert_array_equal(np.asarray(first.features), mem.features)  # same numbers on disk and in RAM
    again = compute_features(model, ds, **kw)
    assert again.reused
    np.testing.assert_array_equal(np.asarray(again.features), np.asarray(first.features))
    assert [p.name for p in cache.iterdir()] == ["k1"]  # no temporary folder left
    assert load_cached(cache, "absent") is None


def test_augmented_views_differ_and_are_reproducible(image_folder):
    bb, model = _model()
    ds = ImageFolderDataset(image_folder).view(transform=train_transform(bb.input_spec, "standard"))
    kw = dict(key="k", views=3, batch_size=8, device=torch.device("cpu"), num_workers=0, seed=0)
    a = compute_features(model, ds, **kw)
    b = compute_features(model, ds, **kw)
    np.testing.assert_array_equal(a.features, b.features)
    assert not np.allclose(a.features[0], a.features[1])
    dl = feature_loader(a, batch_size=4, shuffle=True, seed=0)
    dl.sampler.set_epoch(0)
    x, y = next(iter(dl))
    assert x.shape == (4, 16) and y.shape == (4,)


def test_finetune_cache_dir_reuses_features_across_runs(image_folder, tmp_path, monkeypatch):
    common = dict(weights=None, data=image_folder, image_size=16, device="cpu", num_workers=0, epochs=2,
                  batch_size=4, verbose=False, cache_dir=tmp_path / "cache", precision="fp32")
    r1 = tk.finetune("tk:small_cnn", **common)
    entries = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert len(entries) == 2  # train and val
    rep = r1.feature_report
    assert rep["computed"] == rep["shards"] == 2 and rep["reused"] == 0 and rep["samples"] == 24
    assert rep["dtype"] == "float32" and rep["bytes"] > 24 * 16 * 4  # 16 float32 features a sample, and targets
    assert rep["splits"]["train"]["samples"] == 20 and rep["splits"]["val"]["samples"] == 4
    import transferkit.train.feature_store as feature_store

    calls = []
    real = feature_store.extract_parts
    monkeypatch.setattr(feature_store, "extract_parts",
                        lambda *a, **k: calls.extend(k["parts"]) or real(*a, **k))
    r2 = tk.finetune("tk:small_cnn", **common)
    assert calls == []  # read back from disk, the backbone did not run
    assert r2.feature_report["computed"] == 0 and r2.feature_report["reused"] == r2.feature_report["shards"] == 2
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == entries
    for k, v in r1.model.state_dict().items():
        assert torch.equal(v, r2.model.state_dict()[k])
    r3 = tk.finetune("tk:small_cnn", **{**common, "seed": 5})  # other weights: new entries
    assert r3.used_feature_cache and len(list((tmp_path / "cache").iterdir())) == 4 and len(calls) == 2
    assert r3.feature_report["computed"] == 2
    assert tk.finetune("tk:small_cnn", **{**common, "cache_dir": None}).feature_report["shards"] == 0  # in memory


def test_a_feature_store_made_under_another_pixel_limit_is_not_reused(tmp_path, monkeypatch):
    """Pillow's pixel limit was not in the store's key: with scan='none' (the listing does not
    change), an image left out under a lowered limit stayed left out once the limit was raised,
    still said as a decompression bomb."""
    from PIL import Image

    from conftest import make_image_folder

    data = make_image_folder(tmp_path / "img", per_class=6, size=16)  # 16 x 16..24 pixels
    Image.new("RGB", (64, 64), (200, 200, 200)).save(data / "light" / "big.png")  # 4,096 pixels
    common = dict(weights=None, data=data, image_size=16, device="cpu", num_workers=0, epochs=1, batch_size=4,
                  verbose=False, cache_dir=tmp_path / "cache", precision="fp32", scan="none", val_split=0)
    with monkeypatch.context() as m:
        m.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # over twice it: refused
        with pytest.warns(UserWarning, match="big.png.*decompression-bomb size") as seen:
            low = tk.finetune("tk:small_cnn", **common)
    said = " ".join(str(w.message) for w in seen if "big.png" in str(w.message))
    assert "Otherwise remove or replace the file" in said and ". Remove or" not in said  # the limit is the first way
    assert low.feature_report["masked_samples"] == 1
    again = tk.finetune("tk:small_cnn", **common)  # Pillow's default limit: the image loads
    assert again.feature_report["computed"] == 1 and again.feature_report["masked_samples"] == 0


def test_a_killed_extraction_resumes_and_reports_the_reused_parts(image_folder, tmp_path, monkeypatch):
    """The forward fails after 3 parts; the next run computes only the parts that are missing."""
    import transferkit.train.feature_store as feature_store

    monkeypatch.setattr(feature_store, "MIN_PART_ROWS", 3)  # 20 training images in 7 parts, 4 validation in 2
    common = dict(weights=None, data=image_folder, image_size=16, device="cpu", num_workers=0, epochs=1,
                  batch_size=4, verbose=False, cache_dir=tmp_path / "cache", precision="fp32")
    done = []
    real = feature_store.extract_parts

    class Killed(Exception):
        pass

    def killed(store, *a, parts, **k):
        for p in parts:
            if len(done) == 3:
                raise Killed("the process dies here")
            real(store, *a, parts=[p], **k)
            done.append(p)

    monkeypatch.setattr(feature_store, "extract_parts", killed)
    with pytest.raises(Killed):
        tk.finetune("tk:small_cnn", **common)
    monkeypatch.setattr(feature_store, "extract_parts", real)
    r = tk.finetune("tk:small_cnn", **common)
    rep = r.feature_report
    assert rep["splits"]["train"]["shards"] == 7 and rep["splits"]["val"]["shards"] == 2
    assert rep["reused"] == 3 and rep["computed"] == 6 and rep["splits"]["train"]["reused"] == 3
    fresh = tk.finetune("tk:small_cnn", **{**common, "cache_dir": tmp_path / "fresh"})
    for k, v in fresh.model.state_dict().items():  # the resumed store trains the same head as an unbroken one
        assert torch.equal(v, r.model.state_dict()[k])


def test_probe_chooses_C_on_validation_and_matches_sklearn():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(-0.5, 1, (40, 5)), rng.normal(0.5, 1, (40, 5)), rng.normal(0, 1, (40, 5)) + 2])
    y = np.repeat([0, 1, 2], 40)
    res, w, b = fit_logistic_probe(x[::2], y[::2], x[1::2], y[1::2], Cs=[1e-4, 1e-2, 1.0])
    assert res.C in (1e-4, 1e-2, 1.0) and res.scores[res.C] == max(res.scores.values())
    probs = torch.softmax(torch.from_numpy(x[1::2]).float() @ torch.from_numpy(w).T + torch.from_numpy(b), 1)
    np.testing.assert_allclose(probs.numpy(), res.classifier.predict_proba((x[1::2] - x[::2].mean(0)) / x[::2].std(0)),
                               atol=1e-4)


def test_probe_breaks_an_accuracy_tie_by_the_log_loss():
    # separable classes: every C classifies the validation set perfectly; the smallest gives near-chance probabilities
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(-3, 0.3, (30, 4)), rng.normal(3, 0.3, (30, 4)), rng.normal(0, 0.3, (30, 4)) + 9])
    y = np.repeat([0, 1, 2], 30)
    res, _, _ = fit_logistic_probe(x[::2], y[::2], x[1::2], y[1::2], Cs=[1e-2, 1e-1, 1.0])
    assert set(res.scores.values()) == {1.0} and res.losses[1e-2] > 0.5 > res.losses[1.0]
    assert res.C == min(res.losses, key=res.losses.get) == 1.0


def test_linear_probe_end_to_end_exports(image_folder, tmp_path, monkeypatch):
    r = tk.linear_probe("tk:small_cnn", weights=None, data=image_folder, image_size=16, device="cpu", num_workers=0,
                        verbose=False, Cs=[0.01, 1.0], export=tmp_path / "probe.pt")
    assert r.used_feature_cache and r.history == []
    assert r.metrics["probe"]["C"] in (0.01, 1.0)
    assert r.metrics["val_acc"] == r.best["val_acc"]  # the head computes what sklearn chose
    assert r.export_path.exists()
    assert set(r.metrics["probe"]["val_loss_by_C"]) == {"0.01", "1.0"}
    # class weights: a list is one weight per class (as for the trained heads); label smoothing has no meaning here
    weighted = tk.linear_probe("tk:small_cnn", weights=None, data=image_folder, image_size=16, device="cpu",
                               num_workers=0, verbose=False, Cs=[1.0], class_weights=[1.0, 50.0])
    plain = tk.linear_probe("tk:small_cnn", weights=None, data=image_folder, image_size=16, device="cpu",
                            num_workers=0, verbose=False, Cs=[1.0])
    heads = weighted.model.head.state_dict(), plain.model.head.state_dict()
    assert any(not torch.equal(heads[0][k], heads[1][k]) for k in heads[1])  # the weights changed the fit
    import transferkit.train.probe as probe

    given, fit = [], probe.fit_logistic_probe  # the weight of each class reaches scikit-learn by its index
    monkeypatch.setattr(probe, "fit_logistic_probe", lambda *a, **k: given.append(k["class_weight"]) or fit(*a, **k))
    for weights in ([1.0, 50.0], "balanced", None):
        tk.linear_probe("tk:small_cnn", weights=None, data=image_folder, image_size=16, device="cpu", num_workers=0,
                        verbose=False, Cs=[1.0], class_weights=weights)
    assert given == [{0: 1.0, 1: 50.0}, "balanced", None] and weighted.classes == ["dark", "light"]
    with pytest.raises(tk.ConfigError, match="no label smoothing"):
        tk.linear_probe("tk:small_cnn", weights=None, data=image_folder, image_size=16, device="cpu",
                        num_workers=0, verbose=False, label_smoothing=0.1)
    with pytest.raises(tk.ConfigError, match=r"linear_probe\(\): probe_Cs=\[\] is out of range; expected a non-empty"):
        tk.linear_probe("tk:small_cnn", weights=None, data=image_folder, image_size=16, device="cpu",
                        num_workers=0, verbose=False, Cs=[])
    # called as finetune is: a config keeps its settings (its Cs among them); another head is refused
    cfg = tk.FinetuneConfig(backbone="tk:small_cnn", weights=None, data=image_folder, image_size=16, device="cpu",
                            num_workers=0, verbose=False, head="logistic", probe_Cs=[0.01, 1.0])
    assert set(tk.linear_probe(cfg).metrics["probe"]["val_acc_by_C"]) == {"0.01", "1.0"}
    with pytest.raises(tk.ConfigError, match="the probe is head='logistic'"):
        tk.linear_probe(cfg, head="mlp")
    with pytest.raises(tk.ConfigError, match="head='linear': the probe is head='logistic'"):
        tk.linear_probe(cfg.replace(head="linear", probe_Cs=None))
    with pytest.raises(tk.ConfigError, match="Cs= and probe_Cs= name the same setting"):
        tk.linear_probe(cfg, Cs=[1.0], probe_Cs=[2.0])
    assert tk.linear_probe(cfg, val_split=0, Cs=[10.0, 0.01]).metrics["probe"]["C"] == 10.0  # no validation: largest


def test_cache_is_faster_than_rerunning_the_backbone(image_folder):
    """Behaviour, not a benchmark: with the cache, later epochs do not touch the backbone."""
    calls = []
    bb = tk.get_backbone("tk:small_cnn", weights=None, widths=(8, 8, 16))
    bb.trunk.register_forward_hook(lambda *a: calls.append(1))
    counts = []
    for epochs in (1, 5):
        calls.clear()
        tk.finetune(bb, data=image_folder, image_size=16, device="cpu", num_workers=0, epochs=epochs, batch_size=4,
                    verbose=False)
        counts.append(len(calls))
    from transferkit.train.speed import SpeedConfig

    fb = SpeedConfig(device=torch.device("cpu")).feature_batch_size(4)  # the extraction pass's batch size
    # one pass over 20 training and 4 validation images, and one image of zeros at image_size=16, a size the trunk
    # was not built at (`check_runs_at`, before the data are read)
    assert counts[0] == counts[1] == -(-20 // fb) + -(-4 // fb) + 1


def test_cache_with_views_needs_augmentation(image_folder):
    with pytest.raises(tk.ConfigError, match="augment"):
        tk.finetune("tk:small_cnn", weights=None, data=image_folder, image_size=16, cache_views=2, augment="none",
                    verbose=False, num_workers=0)


def test_cached_head_trains_on_standardised_features_and_exports_them(image_folder, tmp_path):
    """head_norm="auto": the head starts with a FeatureNorm holding the training features'
    exact mean and std; the checkpoint rebuilds it and the export carries it."""
    from tests.conftest import make_image_folder
    from transferkit.facts import resolve_input_spec
    from transferkit.export.from_checkpoint import model_from_checkpoint

    val = make_image_folder(tmp_path / "val", per_class=4, seed=1)
    r = tk.finetune("tk:small_cnn", weights=None, data=image_folder, val_data=val, image_size=16, epochs=2,
                    batch_size=4, device="cpu", num_workers=0, verbose=False, checkpoint=tmp_path / "run.pt",
                    export=tmp_path / "model.pt", precision="fp32")  # the reference below runs in fp32
    norm = r.model.head[0]
    assert r.used_feature_cache and isinstance(norm, tk.FeatureNorm)
    ds = ImageFolderDataset(image_folder, transform=eval_transform(resolve_input_spec(r.backbone.input_spec, 16)))
    with torch.no_grad():
        feats = r.model.eval().features(torch.stack([ds[i][0] for i in range(len(ds))]))
    torch.testing.assert_close(norm.mean, feats.mean(0), rtol=1e-4, atol=1e-5)
    std = feats.std(0, unbiased=False)
    floor = 0.01 * std[std >= 1e-6].median()  # a feature far quieter than the others: divided by a floor
    torch.testing.assert_close(norm.std, torch.where(std < 1e-6, 1.0, std.clamp_min(floor)), rtol=1e-4, atol=1e-5)
    rebuilt, meta = model_from_checkpoint(tmp_path / "run.pt")
    assert meta["decisions"]["head"]["norm"] is True and isinstance(rebuilt.head[0], tk.FeatureNorm)
    torch.testing.assert_close(rebuilt.head[0].std, norm.std)
    assert r.export_report.max_abs_diff < 1e-4


def test_fine_tune_standardises_the_cached_features_of_pretrained_weights_only(image_folder, tmp_path):
    """fine_tune's head phase trains on cached features: standardised when the trunk starts from
    pretrained weights, raw when it starts from random ones (whose features change scale by
    orders of magnitude once the trunk trains: standardised by their first statistics, the
    losses of the second phase ran into the thousands)."""
    kw = dict(data=image_folder, image_size=16, epochs=3, batch_size=4, device="cpu", num_workers=0, verbose=False,
              policy="fine_tune", precision="fp32")
    random = tk.finetune("tk:small_cnn", weights=None, **kw)
    assert isinstance(random.model.head[0], torch.nn.Linear)
    assert all(h["train_loss"] < 5 and h["val_loss"] < 5 for h in random.history), random.history
    torch.save(random.backbone.trunk.state_dict(), tmp_path / "trunk.pt")
    pretrained = tk.finetune("tk:small_cnn", weights=tmp_path / "trunk.pt", **kw)
    assert isinstance(pretrained.model.head[0], tk.FeatureNorm)
    assert not tk.plan("tk:small_cnn", weights=None, **kw).head_norm
    assert tk.plan("tk:small_cnn", weights=None, **{**kw, "policy": "feature_extraction"}).head_norm
    own = tk.get_backbone("tk:small_cnn", weights=None)  # a Backbone object as built: random, as by name
    assert not tk.plan(own, **kw).head_norm and own.weights_random()
    own.trunk.load_state_dict(torch.load(tmp_path / "trunk.pt"))  # weights loaded by hand: taken as trained
    assert tk.plan(own, **kw).head_norm and not own.weights_random()
    mine = from_module(tk.get_backbone("tk:small_cnn", weights=None).trunk, input_spec={"image_size": 16})
    assert tk.plan(mine, **kw).head_norm  # the caller's own module: its weights are not known, taken as trained
    assert "(its own weights) ->" in tk.plan(mine, **kw).summary()  # it said "(random init)"
    assert "(random init) ->" in tk.plan(tk.get_backbone("tk:small_cnn", weights=None), **kw).summary()
    exploded = tk.finetune(tk.get_backbone("tk:small_cnn", weights=None), **kw)  # the second phase's losses ran
    assert isinstance(exploded.model.head[0], torch.nn.Linear)  # to 49 and 106 with FeatureNorm on random features
    assert all(h["val_loss"] < 5 for h in exploded.history), exploded.history


def test_head_norm_off_and_its_errors(image_folder):
    kw = dict(weights=None, data=image_folder, image_size=16, epochs=1, batch_size=4, device="cpu", num_workers=0,
              verbose=False)
    r = tk.finetune("tk:small_cnn", head_norm=False, **kw)
    assert isinstance(r.model.head[0], torch.nn.Linear) and len(r.model.head) == 1
    full = tk.finetune("tk:small_cnn", policy="full", **kw)  # the backbone trains: features are not fixed
    assert isinstance(full.model.head[0], torch.nn.Linear)
    with pytest.raises(tk.ConfigError, match="head_norm=True"):
        tk.finetune("tk:small_cnn", policy="full", head_norm=True, **kw)
    with pytest.raises(tk.ConfigError, match="head_norm=True .* and cache_features not False"):
        tk.finetune("tk:small_cnn", cache_features=False, head_norm=True, **kw)  # frozen, but nothing is cached
    with pytest.raises(tk.ConfigError, match="unknown head_norm"):
        tk.finetune("tk:small_cnn", head_norm="yes", **kw)


def test_default_lr_depends_on_what_trains(image_folder, tmp_path):
    kw = dict(weights=None, data=image_folder, image_size=16, epochs=1, batch_size=4, device="cpu", num_workers=0,
              verbose=False)
    for policy, lr in (("feature_extraction", 1e-2), ("full", 1e-3)):
        r = tk.finetune("tk:small_cnn", policy=policy, checkpoint=tmp_path / f"{policy}.pt", **kw)
        meta = torch.load(r.checkpoint_path, weights_only=False)["transferkit"]
        assert meta["decisions"]["lr"] == lr and meta["decisions"]["config"]["lr"] is None
    r = tk.finetune("tk:small_cnn", lr=0.05, checkpoint=tmp_path / "given.pt", **kw)
    assert torch.load(r.checkpoint_path, weights_only=False)["transferkit"]["decisions"]["lr"] == 0.05


def test_probe_standardises_float32_features_without_a_float64_copy():
    import tracemalloc

    rng = np.random.default_rng(0)
    x = rng.normal(size=(100000, 64)).astype(np.float32)
    y = (x[:, 0] + x[:, 1] > 0).astype(int)
    ref, w_ref, b_ref = fit_logistic_probe(x, y, Cs=[1.0], max_iter=50)  # a copy standardised, x untouched
    assert np.array_equal(x[:, 0] + x[:, 1] > 0, y.astype(bool))
    tracemalloc.start()
    try:
        res, w, b = fit_logistic_probe(x, y, Cs=[1.0], max_iter=50, overwrite=True)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 0.3 * x.nbytes  # in place: no copy of the features, let alone a float64 one
    assert abs(x.mean()) < 1e-3 and res.classifier.coef_.dtype == np.float32
    np.testing.assert_allclose(w, w_ref, rtol=1e-4, atol=1e-5)


def test_probe_from_the_store_and_its_memory_refusal(image_folder, tmp_path, monkeypatch):
    import transferkit.train.probe as probe

    kw = dict(weights=None, data=image_folder, image_size=16, device="cpu", num_workers=0, verbose=False,
              Cs=[0.01, 1.0], precision="fp32")
    mem = tk.linear_probe("tk:small_cnn", **kw)
    disk = tk.linear_probe("tk:small_cnn", cache_dir=tmp_path / "cache", **kw)
    assert disk.feature_report["shards"] == 2 and disk.metrics["probe"]["C"] == mem.metrics["probe"]["C"]
    for k, v in mem.model.head.state_dict().items():
        torch.testing.assert_close(v, disk.model.head.state_dict()[k], rtol=1e-4, atol=1e-4)
    with pytest.raises(tk.ConfigError, match=r"head='logistic' fits its probe once, on features computed once; "
                                             r"cache_features=False .* does not apply"):
        tk.linear_probe("tk:small_cnn", cache_features=False, **kw)
    monkeypatch.setattr(probe, "available_memory", lambda: 1000)
    with pytest.raises(tk.ConfigError, match="head='logistic' holds the training features in memory as float32"):
        tk.linear_probe("tk:small_cnn", cache_dir=tmp_path / "cache", **kw)


def test_feature_pass_decoding_workers_exit_before_the_block_is_computed(monkeypatch):
    """A pass that decodes a block, then computes it: its loader's workers have exited before
    the last block is computed (workers that live on keep this process's pages shared with
    them, and every page the computation writes is then copied), for each view."""
    import multiprocessing

    from transferkit.data import sampling

    alive = []

    def forward(x):
        alive.append(len(multiprocessing.active_children()))
        return x * 2

    monkeypatch.setattr(sampling, "usable_cpus", lambda: 1)  # 2 workers + torch's threads > 1 CPU: blocks
    ds = torch.utils.data.TensorDataset(torch.arange(24.0).reshape(8, 3), torch.arange(8))
    store = compute_features(torch.nn.Linear(3, 3), ds, key="k", views=2, batch_size=3, device=torch.device("cpu"),
                             num_workers=2, seed=0, forward=forward)
    assert alive == [0] * 6  # 3 batches x 2 views, none computed beside a live worker
    assert np.array_equal(store.features[1], store.features[0]) and store.features[0, 2, 0] == 12.0


def test_cpu_feature_pass_decodes_a_block_before_computing_it(monkeypatch):
    """When the decoding workers would share the CPU's cores with the computation, the pass
    draws a block of batches first, then computes them (no interleaving); on another device,
    or with cores to spare, it computes each batch as it arrives. The features are the same."""
    from transferkit.data import sampling
    from transferkit.train.features import extract_features

    log = []

    class Loader:
        num_workers = 1

        def __iter__(self):
            for i in range(4):
                log.append(f"read {i}")
                yield torch.full((2, 3), float(i)), torch.tensor([i, i])

    def forward(x):
        log.append(f"compute {int(x[0, 0])}")
        return x * 2

    lin = torch.nn.Linear(3, 3)
    monkeypatch.setattr(sampling, "usable_cpus", lambda: 1)  # 1 worker + torch's threads > 1 CPU
    shared, _ = extract_features(lin, Loader(), torch.device("cpu"), forward=forward)
    assert log == [f"read {i}" for i in range(4)] + [f"compute {i}" for i in range(4)]
    log.clear()
    monkeypatch.setattr(sampling, "usable_cpus", lambda: torch.get_num_threads() + 1)  # a core to spare
    spare, _ = extract_features(lin, Loader(), torch.device("cpu"), forward=forward)
    assert log == [s for i in range(4) for s in (f"read {i}", f"compute {i}")]
    assert torch.equal(shared, spare)


def test_a_run_removes_what_killed_runs_left_in_its_cache_and_nothing_live(image_folder, tmp_path):
    """Temporaries of dead writers (a store's half-written part, an export or a timing store
    cut short) go at the next run, even one that never writes those files again; a live
    writer's stay."""
    from transferkit._io import create_temp, owner_tag

    cache = tmp_path / "cache"
    common = dict(weights=None, data=image_folder, image_size=16, device="cpu", num_workers=0, epochs=1,
                  batch_size=4, verbose=False, cache_dir=cache, precision="fp32")
    tk.finetune("tk:small_cnn", **common)
    store = sorted(p for p in cache.iterdir() if p.is_dir())[0]
    host, pid, start = owner_tag().split("-")[1:]
    dead = f"tk-{host}-{pid}-{int(start) + 1}-0123abcd.tmp"  # this pid, another (ended) process
    (cache / "engines" / "onnx").mkdir(parents=True)
    left = [store / f".part-000000.{dead}", cache / "engines" / "onnx" / f".0f1e.onnx.{dead}",
            cache / f".engines.json.{dead}"]
    left[0].mkdir()
    for p in left[1:]:
        p.write_bytes(b"cut short")
    live = create_temp(cache / "engines" / "onnx" / "0f1e.onnx")  # being written by this process
    tk.finetune("tk:small_cnn", **common)  # the features are reused: nothing is written again
    assert [p for p in left if os.path.lexists(p)] == [] and live.exists()


def test_a_store_removed_while_it_is_written_is_a_clear_error(image_folder, tmp_path, monkeypatch):
    import shutil

    import transferkit.train.feature_store as feature_store

    real = feature_store.ShardedFeatureStore.write_part

    def removed_first(store, *a, **k):
        shutil.rmtree(store.path)  # a cleanup job empties cache_dir during the pass
        return real(store, *a, **k)

    monkeypatch.setattr(feature_store.ShardedFeatureStore, "write_part", removed_first)
    with pytest.raises(tk.errors.OutputError, match=r"was removed while this run wrote it .* Run again"):
        tk.finetune("tk:small_cnn", weights=None, data=image_folder, image_size=16, device="cpu", num_workers=0,
                    epochs=1, batch_size=4, verbose=False, cache_dir=tmp_path / "cache", precision="fp32")
