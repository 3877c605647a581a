"""Checkpoints and exact resume: an interrupted-and-resumed CPU run ends bit-identical to an
uninterrupted one (model, optimizer, schedule, RNG states, best epoch, early-stopping state)."""

from __future__ import annotations

import re

import pytest
import torch
from tests.conftest import needs_onnx

import transferkit as tk
from transferkit.config import jsonable
from transferkit.errors import ConfigError
from transferkit.train import load_checkpoint

pytestmark = pytest.mark.precision_auto  # the outcome depends on what the CPU's bf16 support decides


class Interrupt(Exception):
    pass


def _stop_after(k: int):
    def cb(row: dict) -> None:
        if row["epoch"] == k:
            raise Interrupt(f"simulated kill after epoch {k}")
    return cb


# dropout in the head and random crops make the run consume RNG every epoch; gradual unfreezing changes
# what trains at each epoch (the resumed run must pick the policy up at epoch 2); a cosine schedule with
# warmup and AdamW moments must come back too.
RUNS = {
    "images": dict(policy="gradual:every=1", augment="standard", head_hidden=(16,), head_dropout=0.3, epochs=4,
                   schedule="cosine", warmup_epochs=1),
    "cached": dict(policy="feature_extraction", head_hidden=(16,), head_dropout=0.3, epochs=5, schedule="one_cycle",
                   cache_views=2, augment="flip"),
    # L2-SP pulls toward the weights training started from, not toward those the resume loads
    "l2sp": dict(policy="full,l2sp=5", epochs=3),
    # the same from a feature store under cache_dir, read by blocks of parts (the order from seed and epoch)
    "stored": dict(policy="feature_extraction", head_hidden=(16,), head_dropout=0.3, epochs=5, schedule="one_cycle",
                   cache_views=2, augment="flip"),
    # worker processes that persist across epochs: their seeds were drawn from the global generator
    # once per process, so a resume shifted the dropout's random numbers
    "workers": dict(policy="full", head_hidden=(16,), head_dropout=0.3, epochs=4, num_workers=2),
}


@pytest.mark.parametrize("kind", sorted(RUNS))
def test_interrupted_and_resumed_run_is_bit_identical(image_folder, tmp_path, kind, monkeypatch):
    common = {**dict(weights=None, data=image_folder, image_size=32, device="cpu", num_workers=0, seed=3, batch_size=4,
                     lr=3e-3, verbose=False), **RUNS[kind]}
    if kind == "stored":
        import transferkit.steps as steps
        import transferkit.train.feature_store as feature_store

        monkeypatch.setattr(feature_store, "MIN_PART_ROWS", 3)
        monkeypatch.setattr(steps, "STORE_MEMORY_BUDGET", 1000)  # read by blocks, not from memory
        common["cache_dir"] = tmp_path / "cache"
    full = tk.finetune("tk:small_cnn", checkpoint=tmp_path / "full.pt", **common)
    ckpt = tmp_path / "run.pt"
    with pytest.raises(Interrupt):
        tk.finetune("tk:small_cnn", checkpoint=ckpt, callbacks=[_stop_after(2)], **common)
    saved = load_checkpoint(ckpt)
    assert saved["epoch"] == 2 and not saved["complete"]
    resumed = tk.finetune("tk:small_cnn", checkpoint=ckpt, resume=True, **common)
    a, b = full.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after resume"
    strip = lambda h: [{k: v for k, v in r.items() if k != "time_s"} for r in h]  # noqa: E731
    assert strip(full.history) == strip(resumed.history)
    assert full.best == resumed.best
    assert load_checkpoint(ckpt)["complete"]
    if kind == "images":  # resumed after its frozen first epoch: the report of the run that computed the features
        assert full.feature_report is not None and resumed.feature_report == jsonable(full.feature_report)
    if kind == "stored":
        assert resumed.feature_report["head_batches"]["mode"] == "blocks"
        assert resumed.feature_report["computed"] == 0 and resumed.feature_report["shards"] > 4


def test_a_resume_keeps_the_feature_norm_its_head_was_trained_with(image_folder, tmp_path, monkeypatch):
    """The resume computed the head's FeatureNorm statistics again and overwrote the
    checkpoint's: a checkpoint written under another rule for them (the std floor) went on with
    statistics its head was not trained with."""
    common = dict(weights=None, data=image_folder, image_size=32, device="cpu", num_workers=0, seed=3, batch_size=4,
                  verbose=False, policy="feature_extraction", epochs=4)
    full = tk.finetune("tk:small_cnn", **common)
    ckpt = tmp_path / "run.pt"
    with pytest.raises(Interrupt):
        tk.finetune("tk:small_cnn", checkpoint=ckpt, callbacks=[_stop_after(2)], **common)
    real = tk.FeatureNorm.set_stats
    monkeypatch.setattr(tk.FeatureNorm, "set_stats", lambda self, mean, std, eps=1e-6: real(self, mean, 2 * std, eps))
    resumed = tk.finetune("tk:small_cnn", checkpoint=ckpt, resume=True, **common)  # another rule now
    for k, v in full.model.state_dict().items():
        assert torch.equal(v, resumed.model.state_dict()[k]), f"{k} differs after resume"


def test_a_checkpoint_whose_run_did_not_try_compile_resumes_where_it_is_tried(image_folder, tmp_path):
    # compile='auto' is a trial where torch.compile can run, plain False where it cannot (or before the trial):
    # where the run runs, not what it computes
    common = dict(weights=None, data=image_folder, image_size=16, device="cpu", num_workers=0, seed=1, batch_size=4,
                  policy="full", epochs=3, verbose=False)
    full = tk.finetune("tk:small_cnn", **common)
    ckpt = tmp_path / "run.pt"
    with pytest.raises(Interrupt):
        tk.finetune("tk:small_cnn", checkpoint=ckpt, callbacks=[_stop_after(1)], compile=False, **common)
    resumed = tk.finetune("tk:small_cnn", checkpoint=ckpt, resume=True, **common)
    assert resumed.decisions.speed["compile"] in ("trial", False)
    for k, v in full.model.state_dict().items():  # too short to compile: the same run
        assert torch.equal(v, resumed.model.state_dict()[k]), k


def test_resume_function_reads_the_stored_settings(image_folder, tmp_path):
    common = dict(weights=None, data=str(image_folder), image_size=32, device="cpu", num_workers=0, seed=1, epochs=3,
                  batch_size=4, verbose=False, policy="feature_extraction")
    full = tk.finetune("tk:small_cnn", **common)
    ckpt = tmp_path / "run.pt"
    with pytest.raises(Interrupt):
        tk.finetune("tk:small_cnn", checkpoint=ckpt, callbacks=[_stop_after(1)], **common)
    resumed = tk.resume(ckpt)
    assert [r["epoch"] for r in resumed.history] == [1, 2, 3]
    for k, v in full.model.state_dict().items():
        assert torch.equal(v, resumed.model.state_dict()[k]), k
    # the data moved after the interruption: data= replaces the stored path (a str as the stored one, or a Path)
    moved = tmp_path / "moved"
    for data in (str(moved), moved):
        with pytest.raises(Interrupt):
            tk.finetune("tk:small_cnn", checkpoint=ckpt, callbacks=[_stop_after(1)], **common)
        image_folder.rename(moved)
        with pytest.raises(tk.DataError, match=r"read its data at '.*', which does not exist now. If the data "
                                               r"moved, resume with their new place: transferkit.resume\("
                                               f"{re.escape(repr(str(ckpt)))}, "
                                               r"data=NEW\) \(--data NEW with --resume\)"):  # the folder is gone
            tk.resume(ckpt)
        again = tk.resume(ckpt, data=data)
        moved.rename(image_folder)
        assert [r["train_loss"] for r in again.history] == [r["train_loss"] for r in full.history]


def test_resume_takes_an_in_memory_dataset_again(image_folder, tmp_path):
    from transferkit.data import ImageFolderDataset

    data = ImageFolderDataset(image_folder)
    common = dict(weights=None, image_size=32, device="cpu", num_workers=0, seed=1, epochs=2, batch_size=4,
                  verbose=False, policy="feature_extraction", classes=data.classes)
    ckpt = tmp_path / "run.pt"
    with pytest.raises(Interrupt):
        tk.finetune("tk:small_cnn", data=data, checkpoint=ckpt, callbacks=[_stop_after(1)], **common)
    with pytest.raises(ConfigError, match=r"pass them again: transferkit.resume\(path, data=...\)"):
        tk.resume(ckpt)
    resumed = tk.resume(ckpt, data=data)
    full = tk.finetune("tk:small_cnn", data=data, **common)
    assert [r["train_loss"] for r in resumed.history] == [r["train_loss"] for r in full.history]


def test_resume_refuses_data_in_memory_with_any_item_changed(tmp_path):
    """The digest of data in memory hashed 16 evenly spaced items: one changed between them was
    resumed without a word, the run trained on a mix of the old data and the new."""
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    images = [Image.fromarray(torch.randint(0, 255, (16, 16, 3), generator=g, dtype=torch.uint8).numpy())
              for _ in range(40)]
    data = [(img, i % 2) for i, img in enumerate(images)]
    common = dict(weights=None, image_size=16, device="cpu", num_workers=0, epochs=2, batch_size=8, verbose=False,
                  policy="full", classes=["a", "b"], val_split=0)
    ckpt = tmp_path / "run.pt"
    with pytest.raises(Interrupt):
        tk.finetune("tk:small_cnn", data=data, checkpoint=ckpt, callbacks=[_stop_after(1)], **common)
    changed = list(data)
    changed[1] = (images[1].rotate(90), 1)  # item 1: between the first and the second of 16 spaced over 40
    with pytest.raises(ConfigError, match=r"Cannot resume .* data: "):
        tk.resume(ckpt, data=changed)
    assert [r["epoch"] for r in tk.resume(ckpt, data=data).history] == [1, 2]


def test_a_resume_on_another_feature_engine_says_it_is_not_bit_identical(image_folder, tmp_path):
    import warnings

    needs_onnx()
    common = dict(weights=None, data=image_folder, image_size=32, device="cpu", num_workers=0, epochs=2, batch_size=4,
                  verbose=False, policy="feature_extraction", cache_dir=tmp_path / "cache")
    same, other = tmp_path / "same.pt", tmp_path / "other.pt"
    for ckpt in (same, other):
        with pytest.raises(Interrupt):
            tk.finetune("tk:small_cnn", checkpoint=ckpt, callbacks=[_stop_after(1)], feature_engine="onnxruntime",
                        **common)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # the same engine: no note
        tk.finetune("tk:small_cnn", checkpoint=same, resume=True, feature_engine="onnxruntime", **common)
    with pytest.warns(UserWarning, match=r"Resuming with feature_engine 'onnxruntime' -> 'eager'.*not bit for bit"):
        resumed = tk.finetune("tk:small_cnn", checkpoint=other, resume=True, feature_engine="eager", **common)
    assert [r["epoch"] for r in resumed.history] == [1, 2]


def test_resume_refuses_a_checkpoint_from_other_settings(image_folder, tmp_path):
    common = dict(weights=None, data=image_folder, image_size=32, device="cpu", num_workers=0, epochs=2, batch_size=4,
                  verbose=False)
    ckpt = tmp_path / "run.pt"
    with pytest.raises(Interrupt):
        tk.finetune("tk:small_cnn", checkpoint=ckpt, callbacks=[_stop_after(1)], lr=1e-3, **common)
    with pytest.raises(ConfigError, match="lr") as info:
        tk.finetune("tk:small_cnn", checkpoint=ckpt, resume=True, lr=5e-3, **common)
    assert str(info.value).endswith(f"(weights={str(ckpt)!r} keeps the trained weights).")  # was '<checkpoint>'


def test_resume_takes_a_setting_given_as_the_value_it_was_decided_to_be(image_folder, tmp_path):
    """augment=None decided "standard" and lr=None decided 1e-3: the resume that spells them out
    computes the same and was refused ("config.augment: None -> 'standard'")."""
    common = dict(weights=None, data=image_folder, image_size=16, device="cpu", num_workers=0, epochs=2, batch_size=4,
                  verbose=False, policy="full", checkpoint=tmp_path / "run.pt")
    with pytest.raises(Interrupt):
        tk.finetune("tk:small_cnn", callbacks=[_stop_after(1)], **common)
    decided = tk.plan("tk:small_cnn", resume=True, **common)
    assert (decided.augment, decided.lr) == ("standard", 1e-3)
    with pytest.raises(ConfigError, match=r"config.augment: None -> 'flip'"):
        tk.plan("tk:small_cnn", resume=True, augment="flip", **common)
    resumed = tk.finetune("tk:small_cnn", resume=True, augment="standard", lr=1e-3, **common)
    assert [r["epoch"] for r in resumed.history] == [1, 2]


def test_resume_refuses_a_weights_file_whose_content_changed(image_folder, tmp_path, monkeypatch):
    """A weights file rewritten in place between the run and its resume was taken: the resumed
    run stored features of the checkpoint's trunk under the new file's key (a later run read
    them with the new trunk) and anchored L2-SP to the new weights."""
    torch.manual_seed(0)
    torch.save(tk.get_backbone("tk:small_cnn", weights=None).trunk.state_dict(), tmp_path / "w.pt")
    common = dict(weights=tmp_path / "w.pt", data=image_folder, image_size=16, device="cpu", num_workers=0,
                  epochs=3, batch_size=4, verbose=False, policy="feature_extraction", cache_dir=tmp_path / "cache",
                  checkpoint=tmp_path / "run.pt")
    with pytest.raises(Interrupt):
        tk.finetune("tk:small_cnn", callbacks=[_stop_after(1)], **common)
    with pytest.raises(Interrupt):  # the same file resumes
        tk.finetune("tk:small_cnn", resume=True, callbacks=[_stop_after(2)], **common)
    torch.manual_seed(1)
    torch.save(tk.get_backbone("tk:small_cnn", weights=None).trunk.state_dict(), tmp_path / "w.pt")
    with pytest.raises(ConfigError, match=r"weights_file: 'w.pt@blake2b:\w+' -> 'w.pt@blake2b:\w+'.* The weights "
                                          r"file's content changed since the run began"):
        tk.finetune("tk:small_cnn", resume=True, **common)
    # a Backbone object holds its weights: the file it was read from, gone or elsewhere now, is not compared
    monkeypatch.chdir(tmp_path)
    bb = tk.get_backbone("tk:small_cnn", weights="w.pt")
    common = {**{k: v for k, v in common.items() if k != "weights"}, "checkpoint": tmp_path / "object.pt"}
    with pytest.raises(Interrupt):
        tk.finetune(bb, callbacks=[_stop_after(1)], **common)
    (tmp_path / "w.pt").unlink()
    assert [r["epoch"] for r in tk.finetune(bb, resume=True, **common).history] == [1, 2, 3]


def test_checkpoint_write_is_atomic(image_folder, tmp_path, monkeypatch):
    """A crash while writing leaves the previous checkpoint readable."""
    common = dict(weights=None, data=image_folder, image_size=32, device="cpu", num_workers=0, epochs=2, batch_size=4,
                  verbose=False)
    ckpt = tmp_path / "run.pt"
    tk.finetune("tk:small_cnn", checkpoint=ckpt, **common)
    before = ckpt.read_bytes()

    def broken_save(obj, f, *a, **k):  # f: the temporary's file object
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        tk.finetune("tk:small_cnn", checkpoint=ckpt, **common)
    assert ckpt.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == ["run.pt"]  # no temporary left behind


def test_diverged_weights_are_refused_and_a_frozen_trunk_is_not_read():
    import torch.nn as nn

    from transferkit.errors import TrainingError
    from transferkit.train.resume import check_weights_finite

    model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3), nn.Linear(3, 2))
    model[0].requires_grad_(False)
    model[0].eval()
    model[1].eval()
    with torch.no_grad():
        model[0].weight.fill_(float("nan"))  # frozen: training cannot have changed it
        model[1].running_var.fill_(float("inf"))  # a module in eval mode: its statistics do not move
    check_weights_finite(model, 3, 0.1)
    model[1].train()
    with pytest.raises(TrainingError, match=r"during epoch 3 \(e.g. 1.running_var\).*lower it"):
        check_weights_finite(model, 3, 0.1)
    model[1].eval()
    with torch.no_grad():
        model[2].bias.fill_(float("inf"))
    with pytest.raises(TrainingError, match=r"e.g. 2.bias"):
        check_weights_finite(model, 3, 0.1)


def test_resume_continues_a_run_given_a_policy_object_and_refuses_overrides_it_cannot_honour(image_folder, tmp_path):
    from transferkit.policies import Policy

    common = dict(weights=None, data=image_folder, image_size=16, device="cpu", num_workers=0, batch_size=4,
                  epochs=2, verbose=False)
    ckpt = tmp_path / "run.pt"
    with pytest.raises(Interrupt):
        tk.finetune("tk:small_cnn", policy=Policy.parse("full"), checkpoint=ckpt, callbacks=[_stop_after(1)], **common)
    assert len(tk.resume(ckpt).history) == 2  # the policy is stored as its string: nothing to pass again
    for given, said in (({"checkpoint": tmp_path / "b.pt"}, "resume\\(\\): checkpoint= cannot change"),
                        ({"resume": False}, "resume\\(\\): resume= cannot change"),
                        ({"epoch": 4}, "resume\\(\\): unknown key 'epoch'. Did you mean 'epochs'")):
        with pytest.raises(ConfigError, match=said):
            tk.resume(ckpt, **given)


def test_the_unfinished_checkpoint_of_a_lora_run_exports_and_starts_a_new_run(image_folder, tmp_path):
    """It holds the model with its LoRA factors (to resume exactly); exported or read as
    weights=, the factors are folded into the weights as the finished run's are."""
    from transferkit.export.from_checkpoint import export_checkpoint, model_from_checkpoint
    from transferkit.lora import add_lora, fold_lora_state, merge_lora

    ckpt = tmp_path / "run.pt"

    def stop(row):
        if row["epoch"] == 1:
            raise RuntimeError("stop")

    kw = dict(weights=None, data=image_folder, image_size=32, num_workers=0, verbose=False, device="cpu",
              backbone_options={"img_size": 32})
    with pytest.raises(RuntimeError, match="stop"):
        tk.finetune("timm:vit_tiny_patch16_224", policy="lora:r=2,alpha=4", epochs=2, checkpoint=ckpt,
                    callbacks=[stop], **kw)
    assert any(k.endswith("lora_scale") for k in load_checkpoint(ckpt)["model"])
    with pytest.warns(UserWarning, match="unfinished run"):  # what `transferkit export run.pt` does
        (report,), _ = export_checkpoint(ckpt, tmp_path / "m.pt")
    assert report.max_abs_diff <= report.tolerance
    model, _ = model_from_checkpoint(ckpt)
    assert not any("lora" in k or "parametrizations" in k for k in model.state_dict())
    again = tk.finetune("timm:vit_tiny_patch16_224", policy="feature_extraction", epochs=1,
                        **{**kw, "weights": str(ckpt)})
    trunk = {k: v for k, v in model.state_dict().items() if k.startswith("trunk.")}
    assert all(torch.equal(v, again.model.state_dict()[k]) for k, v in trunk.items())
    layer = torch.nn.Sequential(torch.nn.Linear(3, 2))
    add_lora(layer, rank=2, alpha=3.0, targets="0")
    torch.nn.init.normal_(layer[0].parametrizations.weight[0].lora_B)
    assert torch.equal(fold_lora_state(layer.state_dict())["0.weight"], merge_lora(layer).state_dict()["0.weight"])


def test_the_dry_run_of_a_resume_refuses_changed_settings_as_the_resume_does(image_folder, tmp_path):
    """``--resume --dry-run --batch-size 8`` was approved, then the resume refused it. The dry run
    compares the configuration and the policy with the checkpoint's; long values are cut."""
    common = dict(weights=None, data=image_folder, image_size=32, device="cpu", num_workers=0, batch_size=4,
                  verbose=False, policy="full", epochs=3)
    ckpt = tmp_path / "run.pt"
    with pytest.raises(Interrupt):
        tk.finetune("tk:small_cnn", checkpoint=ckpt, callbacks=[_stop_after(1)], **common)
    assert tk.plan("tk:small_cnn", checkpoint=ckpt, resume=True, **common).config.resume
    for change, said in (({"batch_size": 8}, "config.batch_size: 4 -> 8"), ({"epochs": 5}, "config.epochs: 3 -> 5"),
                         ({"policy": "fine_tune"}, "policy: 'full' -> 'fine_tune"),
                         ({"seed": 3}, "config.seed: 0 -> 3")):
        with pytest.raises(tk.ConfigError, match=r"Cannot resume from .*run.pt.*decisions differ from the checkpoint's "
                                                 r"\(checkpoint -> now\): " + re.escape(said)) as plan_error:
            tk.plan("tk:small_cnn", checkpoint=ckpt, resume=True, **{**common, **change})
        with pytest.raises(tk.ConfigError, match=re.escape(said)) as run_error:
            tk.finetune("tk:small_cnn", checkpoint=ckpt, resume=True, **{**common, **change})
        assert len(str(run_error.value)) < 3000 and said in str(plan_error.value)


@pytest.mark.parametrize("edit", ["epoch", "history"])
def test_a_checkpoint_whose_epoch_and_history_disagree_is_refused(image_folder, tmp_path, edit):
    """A checkpoint edited by hand (its digest removed, so it loads with a warning) whose epoch
    disagrees with its history resumed with a hole in the history, or with epochs run twice."""
    from transferkit._integrity import INTEGRITY_KEY

    common = dict(weights=None, data=image_folder, image_size=32, device="cpu", num_workers=0, epochs=3, batch_size=4,
                  verbose=False)
    ckpt = tmp_path / "run.pt"
    with pytest.raises(Interrupt):
        tk.finetune("tk:small_cnn", checkpoint=ckpt, callbacks=[_stop_after(2)], **common)
    raw = torch.load(ckpt, weights_only=False)
    raw.pop(INTEGRITY_KEY)
    state = raw["training"]["state"]
    if edit == "epoch":  # the epoch set back by hand: epoch 2 would be trained again on epoch 2's weights
        raw["epoch"] = state["epoch"] = 1
    else:  # a row taken out of the history
        raw["history"] = state["history"] = state["history"][1:]
    torch.save(raw, ckpt)
    held = "[1, 2]" if edit == "epoch" else "[2]"
    with pytest.warns(UserWarning, match="no content digest"), \
            pytest.raises(ConfigError, match=re.escape(f"history of epochs {held}") + r".*edited or damaged"):
        tk.finetune("tk:small_cnn", checkpoint=ckpt, resume=True, **common)


def test_a_resume_refused_for_its_data_says_which_classes_gained_or_lost_files(tmp_path):
    """The refusal showed two records of digests: a user could not tell a file deleted from a
    folder touched, nor where."""
    from tests.conftest import make_image_folder

    for seed, split in enumerate(("train", "val")):
        make_image_folder(tmp_path / "d" / split, per_class=4, seed=seed)
    common = dict(weights=None, data=tmp_path / "d", image_size=32, device="cpu", num_workers=0, epochs=2,
                  batch_size=4, verbose=False, checkpoint=tmp_path / "run.pt")
    with pytest.raises(Interrupt):
        tk.finetune("tk:small_cnn", callbacks=[_stop_after(1)], **common)
    (tmp_path / "d" / "train" / "dark" / "dark_0.jpg").unlink()
    (tmp_path / "d" / "val" / "light" / "light_1.png").chmod(0o600)  # the same files; one change time differs
    with pytest.raises(ConfigError) as info:
        tk.finetune("tk:small_cnn", resume=True, **common)
    assert "data: train: 8 items -> 7 (per class: 'dark' 4 -> 3); val: the same 8 items, as many per class, other " \
        "file names, sizes or times. The data's digest covers" in str(info.value), str(info.value)


def test_a_resume_given_a_backbone_of_other_weights_is_refused_under_l2sp(image_folder, tmp_path):
    """L2-SP pulls toward the weights training started from: a resume given a Backbone object of
    other weights took its anchor from them without a word (the resumed run was another run)."""
    def backbone(noise: float = 0.0):
        torch.manual_seed(1)
        bb = tk.get_backbone("tk:small_cnn", weights=None)
        with torch.no_grad():
            for p in bb.trunk.parameters():
                p.add_(noise)
        return bb

    common = dict(data=image_folder, image_size=32, device="cpu", num_workers=0, epochs=2, batch_size=4,
                  verbose=False, policy="full,l2sp=0.1", checkpoint=tmp_path / "run.pt")
    with pytest.raises(Interrupt):
        tk.finetune(backbone(), callbacks=[_stop_after(1)], **common)
    with pytest.raises(ConfigError, match=r"l2sp_anchor: .*The backbone's weights differ from those the "
                                          r"checkpoint's run started from"):
        tk.finetune(backbone(0.05), resume=True, **common)
    resumed = tk.finetune(backbone(), resume=True, **common)
    assert len(resumed.history) == 2  # the same weights: resumed
    from transferkit.data.fingerprint import parameters_digest

    # the parameters alone (no code: a new torch or Python does not refuse the resume)
    assert resumed.decisions.to_dict()["l2sp_anchor"] == parameters_digest(backbone().trunk)
