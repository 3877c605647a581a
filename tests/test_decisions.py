"""Config -> facts -> decisions -> run: one validated config, one pure decision record that the
summary, the cache key, the resume check and the metadata derive from, and a dry run."""

from __future__ import annotations

import atexit
import dataclasses
import enum
import functools
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tests.conftest import damaged_png, make_image_folder

import transferkit as tk
from transferkit.backbones.custom import from_module
from transferkit.config import FinetuneConfig, load_config, merge_config
from transferkit.data.late import BadFileError
from transferkit.errors import ConfigError
from transferkit.train.features import data_fingerprint, module_fingerprint

pytestmark = pytest.mark.precision_auto  # the outcome depends on what the CPU's bf16 support decides

KW = dict(weights=None, image_size=16, epochs=2, batch_size=4, device="cpu", num_workers=0, verbose=False)


@pytest.fixture
def split_folders(tmp_path):
    """Separate train/ and val/ folders, so that the seed changes nothing about the data."""
    make_image_folder(tmp_path / "d" / "train", per_class=6, size=20)
    make_image_folder(tmp_path / "d" / "val", per_class=3, size=20, seed=1)
    return tmp_path / "d"


def _backbone():
    torch.manual_seed(0)
    return tk.get_backbone("tk:small_cnn", weights=None, widths=(8, 8, 16))


_CACHE = tempfile.mkdtemp(prefix="tk-decisions-")
atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)  # the suite leaves nothing in the temp folder


def _key(d: tk.Decisions, part: str = "train") -> str:
    return d.feature_key(part)


def _plan(data, **kw):
    """The decisions of a run (facts gathered with the weights, so that they have feature keys)."""
    cfg = FinetuneConfig(backbone=kw.pop("backbone", None) or _backbone(), data=data,
                         **{**KW, "cache_dir": _CACHE, **kw})
    return tk.decide(cfg, tk.look(cfg)[0])


@pytest.mark.parametrize("policy, epochs, said", [
    ("fine_tune:frozen=3", 3, "keeps the backbone frozen for 3 epochs but the run has 3"),
    ("gradual:every=5", 3, "unfreezes its first block at epoch 6 but the run has 3"),
    ("gradual:milestones=4+6", 2, "unfreezes its first block at epoch 5 but the run has 2"),
])
def test_a_policy_that_would_train_the_backbone_after_the_run_ends_says_so(split_folders, policy, epochs, said):
    d = _plan(split_folders, policy=policy, epochs=epochs)
    assert d.frozen and any(said in n and "never trains" in n for n in d.notes), d.notes
    assert not _plan(split_folders, policy=policy, epochs=7).notes  # long enough: it trains, nothing to say


def test_config_is_one_validated_record_for_python_yaml_and_cli(tmp_path):
    cfg = FinetuneConfig(data="x", lr=1e-3)
    assert FinetuneConfig.from_dict(cfg.to_dict()) == cfg.replace(data=str(Path("x").resolve()))  # paths absolute
    assert FinetuneConfig(data="x", weights="w.pt").to_dict()["weights"] == "w.pt"  # compared on resume: as given
    (tmp_path / "a.yaml").write_text("lr: 1e-3\nepochs: 3\n")  # PyYAML reads 1e-3 as a string
    assert load_config(tmp_path / "a.yaml") == {"lr": 0.001, "epochs": 3}
    (tmp_path / "b.yaml").write_text("lr: 0.1\nlr: 0.2\n")
    with pytest.raises(ConfigError, match="duplicate key 'lr'"):
        load_config(tmp_path / "b.yaml")
    for bad, msg in [({"seed": -1}, "seed=-1 is out of range"), ({"seed": "a"}, "seed='a' has type str"),
                     ({"weight_decay": -1}, "weight_decay=-1"), ({"warmup_epochs": 20}, "longer than the run"),
                     ({"top_k": 0}, "top_k=0"), ({"device": "gpu"}, "device='gpu'"),
                     ({"classes": ["a", "b", "a"]}, r"classes= names \['a'\] more than once")]:  # was: the export
        with pytest.raises(ConfigError, match=msg):
            FinetuneConfig(data="x", **bad)
    with pytest.raises(ConfigError, match="Did you mean 'epochs'"):
        tk.finetune("tk:small_cnn", data="x", epoch=2)
    with pytest.raises(ConfigError, match="Did you mean 'epochs'"):
        FinetuneConfig(data="x", epoch=2)
    for schedule, options in [("step", {"gamma": -1}), ("exponential", {"gamma": 5}), ("cosine", {"min_factor": 2})]:
        with pytest.raises(ConfigError, match="schedule_options .* out of range"):
            FinetuneConfig(data="x", schedule=schedule, schedule_options=options)
    assert merge_config({"epochs": 5}, {"epochs": "2"}, source="t") == {"epochs": 2}  # later layers win


def test_finetune_takes_a_config_or_keywords(split_folders):
    cfg = FinetuneConfig(backbone="tk:small_cnn", data=split_folders / "train", val_data=split_folders / "val", **KW)
    a = tk.finetune(cfg)
    b = tk.finetune("tk:small_cnn", data=split_folders / "train", val_data=split_folders / "val", **KW)
    assert a.history == [{**r, "time_s": a.history[i]["time_s"]} for i, r in enumerate(b.history)]
    assert tk.finetune(cfg, epochs=1).decisions.config.epochs == 1
    assert "FinetuneResult(tk:small_cnn" in repr(a) and len(repr(a)) < 400


def test_plan_and_lr_find_are_called_as_finetune_is(split_folders):
    data = dict(data=split_folders / "train", val_data=split_folders / "val", **KW)
    assert tk.plan("tk:small_cnn", **data).backbone == "tk:small_cnn"  # the name given first, not the default
    cfg = FinetuneConfig(backbone="tk:small_cnn", **data)
    assert tk.plan(cfg, epochs=3).config.epochs == 3
    with pytest.raises(ConfigError, match="plan\\(\\): backbone given twice"):
        tk.plan("tk:small_cnn", backbone="tv:resnet18", **data)
    with pytest.raises(ConfigError, match="plan\\(\\): unknown key 'epoch'.*'epochs'"):
        tk.plan("tk:small_cnn", epoch=3, **data)


def test_a_frozen_phase_as_long_as_the_run_is_feature_extraction(split_folders):
    """The plan says so; the run made `epochs` passes of the head per epoch instead."""
    kw = dict(weights=None, data=split_folders / "train", epochs=3, verbose=False, num_workers=0,
              precision="fp32")
    a = tk.finetune("tk:small_cnn", policy="fine_tune:frozen=3", **kw)
    b = tk.finetune("tk:small_cnn", policy="feature_extraction", **kw)
    assert "this is feature extraction" in " ".join(a.decisions.notes)
    assert [r["val_loss"] for r in a.history] == [r["val_loss"] for r in b.history]


def test_a_dry_run_refuses_a_weights_file_that_does_not_exist(split_folders, tmp_path):
    """It loads no weights, but the run would stop at once: the plan says so too."""
    with pytest.raises(tk.WeightsError, match="Weights file .*nofile.pt' does not exist"):
        tk.plan("tk:small_cnn", weights=str(tmp_path / "nofile.pt"), data=split_folders / "train")
    assert tk.plan("tk:small_cnn", weights=None, data=split_folders / "train").weights is None
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / "resnet20.th").write_bytes(b"")
    with pytest.raises(tk.WeightsError, match=r"Weights file .*weights' is a folder \(it holds 'resnet20.th'\): "
                                              r"give the weights file in it"):  # was: "does not exist"
        tk.plan("tk:small_cnn", weights=str(tmp_path / "weights") + "/", data=split_folders / "train")


def test_the_plan_gives_each_group_the_rate_of_the_phase_that_trains_it(split_folders):
    """fine_tune trains the blocks in its second phase, at lr x 0.1 (stem: 1e-5, what the
    optimizer holds then); bn=affine trains every block's gamma/beta in the first."""
    kw = dict(weights=None, data=split_folders / "train", epochs=3, verbose=False)
    text = tk.plan("tk:cifar_resnet20", policy="fine_tune", **kw).summary()
    assert "groups:   stem lr 1e-05 wd 0.0001" in text
    assert "(from epoch 2, the rates of the phase that trains them)" in text
    text = tk.plan("tk:cifar_resnet20", policy="fine_tune,bn=affine", **kw).summary()
    assert "epoch 1: head + BatchNorm gamma/beta of every block;" in text and "head only" not in text


def test_the_recorded_group_rates_are_the_rates_the_optimizer_trains_them_at(split_folders, monkeypatch):
    """fine_tune's groups train in its second phase at lr x unfrozen_lr: the record (checkpoint,
    export, ``--dry-run --json``) holds that rate, the one in the optimizer's groups then."""
    from transferkit.train.optim import LRSchedule

    seen: dict[str, float] = {}
    step = LRSchedule.step

    def record(self):
        seen.update({g["name"]: g["lr"] for g in self.optimizer.param_groups})
        step(self)

    monkeypatch.setattr(LRSchedule, "step", record)
    r = tk.finetune("tk:small_cnn", weights=None, data=split_folders / "train", epochs=2, image_size=16,
                    num_workers=0, verbose=False, policy="fine_tune:frozen=1", schedule="constant", lr=0.01)
    recorded = {g["name"]: g["lr"] for g in r.decisions.to_dict()["groups"]}
    assert len(recorded) > 2 and recorded == pytest.approx(seen, rel=1e-12)
    assert recorded["head"] == pytest.approx(0.001)  # the head trained at 0.01 in the first phase


def test_a_record_of_group_rates_at_the_base_rate_still_resumes(split_folders):
    """Records of format 2 held each group's rate at the base rate (10x fine_tune's second
    phase): read as the rates they stand for, they agree with a record of now."""
    from transferkit.decisions import differences

    import transferkit.decisions as decisions

    for policy, lr in (("fine_tune:frozen=1", 3e-4), ("fine_tune,discriminative=0.3", 1e-2),
                       ("unfreeze:last=2,frozen=1,layer_decay=0.7,unfrozen_lr=0.3", 7e-3)):
        now = _plan(split_folders / "train", policy=policy, epochs=3, lr=lr).to_dict()
        with pytest.MonkeyPatch.context() as mp:  # what format 2 recorded: each group at lr * its scale
            mp.setattr(decisions, "_group_phase_factor", lambda policy, epochs: 1.0)
            old = {**_plan(split_folders / "train", policy=policy, epochs=3, lr=lr).to_dict(), "format": 2}
        assert old["groups"] != now["groups"]
        assert differences(old, now) == {}, policy
        assert set(differences({**old, "format": 3}, now)) == {"groups"}
        assert set(differences({**now, "groups": now["groups"][::-1]}, now)) == {"groups"}


def test_a_backbone_objects_options_are_recorded_and_an_older_record_without_them_resumes(split_folders):
    """A run given a Backbone object records the options get_backbone built it with (what
    rebuilds it from a checkpoint); other options are a difference, and a record written
    before they were recorded still agrees."""
    from transferkit.decisions import differences

    def record(**options):
        bb = tk.get_backbone("tk:small_cnn", weights=None, **options)
        return _plan(split_folders / "train", backbone=bb).to_dict()

    now = record(widths=(8, 8, 8))
    assert now["backbone_options"] == {"widths": [8, 8, 8]}
    named = _plan(split_folders / "train", backbone="tk:small_cnn", weights=None).to_dict()
    assert "backbone_options" not in named  # a name's are in config.backbone_options
    older = {k: v for k, v in now.items() if k not in ("backbone_options", "weights_file")}
    assert differences(older, now) == {}  # records of before either was kept
    assert set(differences({**now, "backbone_options": {"widths": [4, 4, 4]}}, now)) == {"backbone_options"}


def test_summary_and_record_state_every_decision(split_folders):
    p = _plan(split_folders / "train", val_data=split_folders / "val", policy="unfreeze:last=1")
    d = p.to_dict()
    for key in ("device", "precision", "channels_last", "feature_cache", "cache_reason", "head", "lr",
                "groups", "bn", "trainable", "seeds", "augment", "data"):
        assert key in d, key
    assert d["feature_cache"] is False and "trains backbone weights" in d["cache_reason"]
    assert d["head"] == {"kind": "linear", "hidden": [], "norm": False, "target_norm": False, "activation": "relu",
                         "dropout": 0.0}
    assert {g["name"] for g in d["groups"]} >= {"head", "stage3"}
    text = p.summary()
    assert "features: not cached" in text and "base lr 0.001 (default)" in text and "stage3" in text
    assert str(split_folders) not in str(d["data"])  # names and digests, no absolute paths


def _edited_trunk(version: int) -> torch.nn.Module:
    """A trunk class defined anew, its ``forward`` pooling by mean (``version`` 0) or max (1)."""
    pool = "x.mean((2, 3))" if version == 0 else "x.amax((2, 3))"
    scope: dict = {"torch": torch}
    exec(f"class Trunk(torch.nn.Module):\n"
         f"    def __init__(self):\n        super().__init__()\n        self.conv = torch.nn.Conv2d(3, 4, 3)\n"
         f"    def forward(self, x):\n        x = self.conv(x)\n        return {pool}\n", scope)
    torch.manual_seed(0)
    return scope["Trunk"]()


def test_a_trunk_whose_method_has_a_set_default_has_one_fingerprint_in_every_process():
    """A default argument's repr was hashed as it is: a set's order follows the process's string
    hashing, so the key changed with every run and the cache never hit. (The same holds for the
    frozenset that ``x in {...}`` keeps in a function's constants.)"""
    code = ("import torch\nfrom transferkit.data.fingerprint import module_fingerprint\n"
            "class M(torch.nn.Module):\n"
            "    def forward(self, x, skip=frozenset({'alpha', 'beta', 'gamma', 'delta', 'epsilon'})):\n"
            "        return x\n"
            "    def kept(self, name):\n"
            "        return name in {'zeta', 'eta', 'theta', 'iota', 'kappa', 'lambda'}\n"
            "print(module_fingerprint(M()))\n")
    root = str(Path(__file__).resolve().parents[1])
    prints = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120,
                             env={**os.environ, "PYTHONHASHSEED": seed, "PYTHONPATH": root}).stdout
              for seed in ("1", "2")}
    assert len(prints) == 1, prints


class _Pool(enum.Enum):
    AVG = "avg"
    MAX = "max"


class _SetTrunk(torch.nn.Module):
    """A trunk whose forward reads settings kept in a private attribute, a dict, an Enum and a function."""

    def __init__(self, scale: float = 1.0, pool: str = "avg", mode: _Pool = _Pool.AVG, act=F.relu) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)
        self._scale, self.cfg, self.mode, self.act = scale, {"pool": pool}, mode, act

    def forward(self, x):
        x = self.act(self.conv(x)) * self._scale
        return x.mean((2, 3)) if self.cfg["pool"] == "avg" and self.mode is _Pool.AVG else x.amax((2, 3))


@pytest.mark.parametrize("change", [{"scale": 5.0}, {"pool": "max"}, {"mode": _Pool.MAX}, {"act": torch.sigmoid},
                                    {"act": lambda t: t * 100}, {"act": functools.partial(F.leaky_relu,
                                                                                          negative_slope=0.2)}])
def test_a_trunk_whose_private_dict_enum_or_function_setting_differs_is_another_trunk(change):
    """The same weights and code with another setting kept in a private attribute, a dict, an
    Enum or an activation function compute other features: they had one fingerprint, and a
    run read the earlier trunk's features from the cache (and, in one process, its ONNX
    export or compiled module)."""
    def trunk(**kw):
        torch.manual_seed(0)
        return _SetTrunk(**kw)
    assert module_fingerprint(trunk()) == module_fingerprint(trunk())
    assert module_fingerprint(trunk(**change)) != module_fingerprint(trunk())
    assert module_fingerprint(trunk(**change)) == module_fingerprint(trunk(**change))


def test_settings_text_tells_keywords_apart_and_ignores_what_a_forward_keeps():
    """A partial's keyword values were paired with their names sorted apart (a=1, b=2 read as
    b=1, a=2); functions whose closures hold each other recursed without end; a cache a forward
    fills (timm's attention_bias_cache) changed the fingerprint."""
    from transferkit.data.fingerprint import module_settings, setting_text

    def f(x, a=0, b=0):
        return x
    assert setting_text(functools.partial(f, a=1, b=2)) != setting_text(functools.partial(f, b=1, a=2))
    assert setting_text({"a": 1, "b": 2}) != setting_text({"b": 2, "a": 1})  # a forward may walk it in order
    assert setting_text({"pool": "max", "extra": {}}) != setting_text({"pool": "avg", "extra": {}})  # inside: kept

    def outer():
        def even(n):
            return n == 0 or odd(n - 1)

        def odd(n):
            return n != 0 and even(n - 1)
        return even
    m = torch.nn.Identity()
    m.check = outer()
    assert module_settings(m) == module_settings(m)  # no RecursionError
    m.attention_bias_cache = {}
    before = module_settings(m)
    m.attention_bias_cache["cpu"] = torch.zeros(2)  # filled by an eval forward
    assert module_settings(m) == before


def test_cache_key_covers_trunk_not_head(split_folders, tmp_path):
    """Two runs that differ only in seed or head share features; trunk weights change the key."""
    data = dict(val_data=split_folders / "val")
    base = _plan(split_folders / "train", **data)
    assert _key(base) == _key(_plan(split_folders / "train", seed=3, **data))
    assert _key(base) == _key(_plan(split_folders / "train", head_hidden=(8,), **data))
    other = _backbone()
    with torch.no_grad():
        next(m for m in other.trunk.modules() if isinstance(m, torch.nn.BatchNorm2d)).running_mean[0] += 1
    assert _key(base) != _key(_plan(split_folders / "train", backbone=other, **data))
    # the same weights computing differently (another pooling here) are another trunk
    pooled = _backbone()
    pooled.trunk.stage1[1] = torch.nn.AvgPool2d(2)
    assert module_fingerprint(pooled.trunk) != module_fingerprint(_backbone().trunk)
    assert _key(base) != _key(_plan(split_folders / "train", backbone=pooled, **data))
    # so are the same modules and weights under an edited forward (the same class name: a user's edit)
    edited = [_edited_trunk(k) for k in (0, 0, 1)]
    assert repr(edited[0]) == repr(edited[2]) and module_fingerprint(edited[0]) == module_fingerprint(edited[1])
    assert module_fingerprint(edited[0]) != module_fingerprint(edited[2])
    # and so are the same modules and weights with another plain setting that the repr does not show
    pools = [tk.get_backbone("timm:vit_tiny_patch16_224", weights=None, img_size=16, depth=1, global_pool=g)
             for g in ("avg", "max")]
    pools[1].trunk.load_state_dict(pools[0].trunk.state_dict())
    assert repr(pools[0].trunk) == repr(pools[1].trunk)
    assert module_fingerprint(pools[0].trunk) != module_fingerprint(pools[1].trunk)
    before = module_fingerprint(pools[0].trunk)  # switches of how, not what, it computes (TIMM_FUSED_ATTN)
    for m in pools[0].trunk.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = not m.fused_attn
    pools[0].trunk.set_grad_checkpointing(True)
    assert module_fingerprint(pools[0].trunk) == before

    # what forward reads beyond the state dict: a buffer kept out of it, a tensor attribute, a default argument
    def gain_class(default_power: float) -> type:
        class Gain(torch.nn.Module):
            def __init__(self, gain: float) -> None:
                super().__init__()
                self.register_buffer("scale", torch.tensor(gain), persistent=False)
                self.offset = torch.tensor(0.0)

            def forward(self, x, power=default_power):
                return (x * self.scale + self.offset) ** power
        return Gain

    gain = gain_class(1.0)
    assert module_fingerprint(gain(0.5)) == module_fingerprint(gain_class(1.0)(0.5))
    assert module_fingerprint(gain(0.0)) != module_fingerprint(gain(0.5))
    offset = gain(0.5)
    offset.offset = torch.tensor(-1.0)
    assert module_fingerprint(offset) != module_fingerprint(gain(0.5))
    assert module_fingerprint(gain_class(2.0)(0.5)) != module_fingerprint(gain(0.5))
    keys = [_key(_plan(split_folders / "train", backbone=from_module(t, input_spec={"image_size": 16}, name="mine"),
                       **data)) for t in edited]
    assert keys[0] == keys[1] != keys[2]
    # a class read from its source file: the file edited between two runs
    source = tmp_path / "my_trunk.py"
    digests = []
    for pool in ("x.mean((2, 3))", "x.mean((2, 3))", "x.amax(dim=(2, 3))"):
        source.write_text("import torch\n\n\nclass Trunk(torch.nn.Module):\n    def __init__(self):\n"
                          "        super().__init__()\n        self.conv = torch.nn.Conv2d(3, 4, 3)\n\n"
                          f"    def forward(self, x):\n        return {pool}\n")
        spec = importlib.util.spec_from_file_location("my_trunk", source)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        torch.manual_seed(0)
        digests.append(module_fingerprint(mod.Trunk()))
    assert digests[0] == digests[1] != digests[2]
    # and so are TorchScript trunks whose attributes differ: the same code and weights, saved again with
    # another setting (scripted, its attributes live in the compiled object, not in the Python one)
    scripted = []
    for g in ("avg", "avg", "max"):
        pools[0].trunk.global_pool = g
        torch.jit.save(torch.jit.script(pools[0].trunk.eval()), tmp_path / "trunk.pt")
        scripted.append(torch.jit.load(tmp_path / "trunk.pt"))
    assert str(scripted[0].code) == str(scripted[2].code)
    assert module_fingerprint(scripted[0]) == module_fingerprint(scripted[1]) != module_fingerprint(scripted[2])
    scripted[1].train()  # the train/eval flag is not a setting: the frozen pass runs in eval mode
    assert module_fingerprint(scripted[1]) == module_fingerprint(scripted[0])
    # scripted in a process that scripted another configuration of its classes first: the same (TorchScript
    # numbers such types' names per process)
    code = ("import sys, torch; from transferkit.data.fingerprint import module_settings; "
            "net = lambda n: torch.nn.Sequential(torch.nn.Sequential(torch.nn.Linear(n, n)), torch.nn.ReLU()); "
            "[torch.jit.script(net(3)) for _ in range(int(sys.argv[1]))]; "
            "print(module_settings(torch.jit.script(net(2))))")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    settings = [subprocess.run([sys.executable, "-c", code, first], capture_output=True, text=True, env=env,
                               check=True).stdout for first in ("0", "1")]
    assert settings[0] == settings[1] and settings[0].strip()
    assert base.feature_key_parts("train").get("backbone_options") is None  # options, when given, are keyed
    assert _plan(split_folders / "train", backbone="tk:small_cnn", backbone_options={"widths": [8, 8, 16]},
                 **data).feature_key_parts("train")["backbone_options"] == {"widths": [8, 8, 16]}
    # a callable option is keyed by its type, not by its per-process address
    with_callable = dataclasses.replace(base, config=base.config.replace(backbone_options={"act": lambda x: x}))
    assert with_callable.feature_key_parts("train")["backbone_options"] == {"act": "<function>"}


def test_cache_key_covers_precision_layout_and_random_views(split_folders):
    data = dict(val_data=split_folders / "val")
    fp32 = _plan(split_folders / "train", precision="fp32", channels_last=False, **data)
    assert _key(fp32) != _key(_plan(split_folders / "train", precision="bf16", channels_last=False, **data))
    assert _key(fp32) != _key(_plan(split_folders / "train", precision="fp32", channels_last=True, **data))
    auto = _plan(split_folders / "train", **data)  # the default: what this machine does fastest, and so keyed
    assert auto.to_dict()["feature_precision"] in ("fp32", "bf16") and _key(auto) in (
        _key(_plan(split_folders / "train", precision=auto.speed["feature_precision"],
                   channels_last=auto.speed["channels_last"], **data)),)
    flip = [_plan(split_folders / "train", augment="flip", seed=s, **data) for s in (0, 1)]
    assert _key(flip[0]) != _key(flip[1])  # one random view, but drawn from the seed
    assert _key(flip[0], "val") == _key(flip[1], "val")  # the eval view is not random


def test_cache_key_sees_a_file_replaced_with_its_mtime_kept(tmp_path):
    root = make_image_folder(tmp_path / "imgs", per_class=3, size=12)
    ds = tk.data.ImageFolderDataset(root)
    before = data_fingerprint(ds)
    f = Path(ds.samples[0][0])
    st = os.stat(f)
    other = Path(ds.samples[1][0]) if Path(ds.samples[1][0]).stat().st_size == st.st_size else None
    data = f.read_bytes()
    f.write_bytes(bytes([data[0] ^ 1]) + data[1:] if other is None else other.read_bytes())  # same size
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))  # like cp -p / rsync -a / tar x
    assert os.stat(f).st_size == st.st_size and os.stat(f).st_mtime_ns == st.st_mtime_ns
    assert data_fingerprint(ds) != before


def test_damaged_cache_entry_is_recomputed_and_replaced(split_folders, tmp_path):
    kw = dict(data=split_folders / "train", val_data=split_folders / "val", cache_dir=tmp_path / "cache", **KW)
    first = tk.finetune("tk:small_cnn", **kw)
    entries = sorted((tmp_path / "cache").iterdir())
    assert first.feature_report["computed"] == 2
    feats = entries[0] / "part-000000" / "features.npy"
    feats.write_bytes(feats.read_bytes()[:-40])  # truncated
    with pytest.warns(UserWarning, match="damaged"):
        again = tk.finetune("tk:small_cnn", **kw)
    assert again.best == first.best and sorted((tmp_path / "cache").iterdir()) == entries
    assert again.feature_report["computed"] == 1 and again.feature_report["reused"] == 1  # only the damaged part
    raw = bytearray((entries[1] / "part-000000" / "features.npy").read_bytes())
    raw[-5] ^= 0xFF  # a flipped byte inside the array
    (entries[1] / "part-000000" / "features.npy").write_bytes(bytes(raw))
    with pytest.warns(UserWarning, match="damaged"):
        assert tk.finetune("tk:small_cnn", **kw).best == first.best


def _stop_after_first(row):
    if row["epoch"] == 1:
        raise RuntimeError("stop")


def test_resume_refuses_a_different_plan_and_lists_the_differences(split_folders, tmp_path):
    ckpt = tmp_path / "run.pt"
    kw = dict(data=split_folders / "train", val_data=split_folders / "val", checkpoint=ckpt, **{**KW, "epochs": 3})

    with pytest.raises(RuntimeError, match="stop"):
        tk.finetune("tk:small_cnn", policy="gradual:every=1", callbacks=[_stop_after_first], **kw)
    for change, listed in [({"cache_features": False}, "config.cache_features"),
                           ({"epochs": 5}, "config.epochs"), ({"weight_decay": 0.1}, "config.weight_decay"),
                           ({"augment": "none"}, "augment"), ({"label_smoothing": 0.1}, "label_smoothing"),
                           ({"warmup_epochs": 1}, "warmup_epochs"), ({"momentum": 0.5}, "momentum")]:
        with pytest.raises(ConfigError, match="decisions differ") as exc:
            tk.finetune("tk:small_cnn", policy="gradual:every=1", resume=True, **{**kw, **change})
        assert listed in str(exc.value)
    other = tmp_path / "other"
    shutil.copytree(split_folders, other)
    next((other / "train").rglob("*.png")).unlink()  # the data changed
    for call in (tk.finetune, tk.plan):  # the dry run refuses it too, as the resume will
        with pytest.raises(ConfigError, match=r"decisions differ .*data: "):
            call("tk:small_cnn", policy="gradual:every=1", resume=True,
                 **{**kw, "data": other / "train", "val_data": other / "val"})
    assert tk.plan("tk:small_cnn", policy="gradual:every=1", resume=True, **kw).n_train > 0
    with pytest.raises(ConfigError, match="decisions differ") as exc:
        tk.finetune("tk:small_cnn", policy="gradual:every=2", resume=True, **kw)
    assert "policy: 'gradual:every=1' -> 'gradual:every=2'" in str(exc.value)
    resumed = tk.finetune("tk:small_cnn", policy="gradual: every=1", resume=True, **kw)  # the same policy, spelt so
    straight = tk.finetune("tk:small_cnn", policy="gradual:every=1", **{**kw, "checkpoint": tmp_path / "b.pt"})
    assert [r["train_loss"] for r in resumed.history] == [r["train_loss"] for r in straight.history]
    for k, v in straight.model.state_dict().items():
        assert torch.equal(v, resumed.model.state_dict()[k]), k
    with pytest.raises(ConfigError, match="complete"):  # the final checkpoint holds a finished run
        tk.resume(ckpt)


@pytest.mark.parametrize("saved, now, said", [
    (2, 1, "relaunch with torchrun and 2 processes in all (--nnodes x --nproc_per_node = 2, e.g. --nproc_per_node=2"),
    (1, 4, "run it in one process, without torchrun"),
])
def test_a_resume_under_another_number_of_processes_says_how_to_relaunch(tmp_path, saved, now, said):
    from transferkit.checkpoints import save_checkpoint
    from transferkit.train.loop import TrainState
    from transferkit.train.resume import resume_from, training_state

    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    save_checkpoint(tmp_path / "c.pt", model=model, meta={"decisions": {"world_size": saved}},
                    training=training_state(optimizer=opt, scheduler=None, state=TrainState()))
    with pytest.raises(ConfigError, match="world_size") as exc:
        resume_from(tmp_path / "c.pt", check=lambda meta: {"world_size": (meta["decisions"]["world_size"], now)},
                    model=model, optimizer=opt, scheduler=None)
    assert "The number of processes cannot change" in str(exc.value) and said in str(exc.value)


def test_scaler_state_is_saved_and_restored(tmp_path):
    from transferkit.checkpoints import load_checkpoint, save_checkpoint
    from transferkit.train.loop import TrainState
    from transferkit.train.resume import training_state

    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=123.0)
    scaler.scale(model(torch.ones(1, 2)).sum()).backward()
    save_checkpoint(tmp_path / "c.pt", model=model, meta={},
                    training=training_state(optimizer=opt, scheduler=None, state=TrainState(), scaler=scaler))
    again = torch.amp.GradScaler("cpu")
    again.load_state_dict(load_checkpoint(tmp_path / "c.pt")["training"]["scaler"])
    assert again.get_scale() == 123.0


def test_callers_backbone_is_never_changed(split_folders):
    bb = tk.get_backbone("tk:mlp", weights=None, hidden=(8, 8), image_size=8)
    before = {k: v.clone() for k, v in bb.trunk.state_dict().items()}
    names = {n for n, _ in bb.trunk.named_parameters()}
    tk.lr_find(bb, data=split_folders / "train", policy="lora:r=2,targets=layers", num_steps=4, **KW)
    r = tk.finetune(bb, data=split_folders / "train", policy="full", **KW)
    assert r.model.trunk is not bb.trunk
    assert {n for n, _ in bb.trunk.named_parameters()} == names  # no LoRA left on it
    assert all(torch.equal(before[k], v) for k, v in bb.trunk.state_dict().items())


def test_global_torch_settings_are_restored(split_folders):
    during = []
    seen = [lambda row: during.append((torch.are_deterministic_algorithms_enabled(),
                                       torch.is_deterministic_algorithms_warn_only_enabled()))]
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:  # deterministic=False asks for no determinism: the caller's own stays on during the run
        tk.finetune("tk:small_cnn", data=split_folders / "train", deterministic=False, callbacks=seen, **KW)
        assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()
    finally:
        torch.use_deterministic_algorithms(False)
    assert set(during) == {(True, True)}
    tk.finetune("tk:small_cnn", data=split_folders / "train", deterministic=True, **KW)
    assert not torch.are_deterministic_algorithms_enabled()


def test_the_caller_s_random_states_are_restored(split_folders):
    """A run seeds torch, NumPy and Python for itself; after it, the caller's generators go on
    where they were (they came out of every run in the same state)."""
    import random

    import numpy as np

    def draws():
        return torch.rand(3).tolist(), np.random.rand(3).tolist(), [random.random() for _ in range(3)]

    torch.manual_seed(123), np.random.seed(123), random.seed(123)
    expected = draws()
    torch.manual_seed(123), np.random.seed(123), random.seed(123)
    tk.finetune("tk:small_cnn", data=split_folders / "train", **KW)
    assert torch.initial_seed() == 123 and draws() == expected


def test_class_weights_must_match_the_classes(split_folders):
    with pytest.raises(ConfigError, match="class_weights has 3 values but the data have 2 classes"):
        tk.finetune("tk:small_cnn", data=split_folders / "train", class_weights=[1, 2, 3], **KW)
    assert np.allclose(_plan(split_folders / "train", class_weights=[1, 2]).class_weights, [1.0, 2.0])


@pytest.mark.parametrize("stop", [1, 2])
def test_fine_tune_resumed_in_either_phase_matches_an_uninterrupted_run(split_folders, tmp_path, monkeypatch, stop):
    """fine_tune:frozen=1: epoch 1 on cached features, then end to end; a resume after epoch 1
    (the end of the cached phase) or 2 (inside the end-to-end phase) ends bit-identical."""
    import transferkit.train.features as features

    kw = dict(data=split_folders / "train", val_data=split_folders / "val", policy="fine_tune:frozen=1",
              head_dropout=0.2, **{**KW, "epochs": 3})

    def stop_after(row):
        if row["epoch"] == stop:
            raise RuntimeError("stop")

    full = tk.finetune("tk:small_cnn", **kw)
    with pytest.raises(RuntimeError):
        tk.finetune("tk:small_cnn", checkpoint=tmp_path / "r.pt", callbacks=[stop_after], **kw)
    calls = []
    real = features.extract_features
    monkeypatch.setattr(features, "extract_features", lambda *a, **k: calls.append(1) or real(*a, **k))
    resumed = tk.finetune("tk:small_cnn", checkpoint=tmp_path / "r.pt", resume=True, **kw)
    assert calls == []  # the cached phase was over: no features computed again
    assert [r["train_loss"] for r in resumed.history] == [r["train_loss"] for r in full.history]
    for k, v in full.model.state_dict().items():
        assert torch.equal(v, resumed.model.state_dict()[k]), k


def test_images_are_decoded_once_when_the_backbone_trains(split_folders, monkeypatch):
    from PIL import Image

    opened = []
    real = Image.open
    monkeypatch.setattr(Image, "open", lambda *a, **k: opened.append(1) or real(*a, **k))
    counts = {}
    for epochs in (2, 4):
        opened.clear()
        r = tk.finetune("tk:small_cnn", data=split_folders / "train", val_data=split_folders / "val",
                        policy="full", **{**KW, "epochs": epochs})
        assert r.decisions.decode["train"]["mode"] == "memory" and "decoded once" in r.decisions.summary()
        # augment="standard" (the default here) crops the stored image, of 16 / 0.875 px: said (was: not)
        assert "random crops are cut from the images kept at 18 px on their shorter side" in r.decisions.summary()
        counts[epochs] = len(opened)
    assert counts[2] == counts[4]  # more epochs, no more decoding
    opened.clear()
    tk.finetune("tk:small_cnn", data=split_folders / "train", val_data=split_folders / "val", policy="full",
                decode_once=False, **{**KW, "epochs": 4})
    assert len(opened) > counts[4]


def test_the_decode_memory_budget_is_one_per_machine_shared_by_its_ranks_and_both_parts(split_folders):
    import dataclasses

    from transferkit.data.decoded import DEFAULT_BUDGET_BYTES

    cfg = FinetuneConfig(backbone=_backbone(), data=split_folders / "train", val_data=split_folders / "val",
                         policy="full", **{**KW, "epochs": 3})
    facts = tk.look(cfg, load_weights=False)[0]
    mb = 2**20

    def decided(train_mb: int, val_mb: int, ranks: int = 1) -> dict:
        census = {part: {**facts.data.decode[part], "need": need * mb}
                  for part, need in (("train", train_mb), ("val", val_mb))}
        moved = dataclasses.replace(facts, data=dataclasses.replace(facts.data, decode=census),
                                    device=dataclasses.replace(facts.device, local_world_size=ranks))
        return tk.decide(cfg, moved).decode

    whole = DEFAULT_BUDGET_BYTES // mb
    assert set(decided(600, 100)) == {"train", "val"}  # 700 MB fit one process's budget
    four = decided(600, 100, ranks=4)  # 4 copies on the machine: a quarter each
    assert set(four) == {"val"}
    assert f"budget {whole // 4} MB of {whole} MB per machine, shared by the 4 ranks on it" in four["val"]["reason"]
    assert set(decided(whole - 50, 100)) == {"train"}  # the parts share it: training's first


def test_bn_affine_on_a_trunk_without_batchnorm_is_frozen(split_folders):
    """A trunk without BatchNorm has no gamma/beta for bn='affine' to train: the run is
    feature extraction (cached, head-only lr), not fine-tuning."""
    bb = tk.get_backbone("tk:mlp", weights=None, hidden=(8,), image_size=8)
    p = _plan(split_folders / "train", backbone=bb, policy="feature_extraction,bn=affine")
    assert p.cache and p.lr == 0.01 and p.to_dict()["bn"] == "none in the trunk"
    cnn = _plan(split_folders / "train", policy="feature_extraction,bn=affine")  # BatchNorm: gamma/beta train
    assert not cnn.cache and cnn.lr == 0.001
    assert "policy feature_extraction,bn=affine trains the backbone's BatchNorm gamma/beta from epoch 1" \
        in cnn.summary()


def test_batchnorm_without_gamma_beta_is_planned_as_it_runs(split_folders):
    """BatchNorm(affine=False) keeps running statistics but has no gamma/beta: the plan said
    "none in the trunk" and recorded no statistics update, while bn=train updated them."""
    from torch import nn

    from transferkit.backbones import Backbone, Block, InputSpec

    def unit(i, o):
        return nn.Sequential(nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o, affine=False), nn.ReLU())

    torch.manual_seed(0)
    trunk = nn.Sequential()
    trunk.add_module("stem", unit(3, 4))
    trunk.add_module("top", nn.Sequential(unit(4, 4), nn.AdaptiveAvgPool2d(1), nn.Flatten(1)))
    bb = Backbone(name="bn-without-affine", trunk=trunk, num_features=4, input_spec=InputSpec(image_size=16),
                  blocks=(Block("stem", ("stem",)), Block("top", ("top",))))
    said = {}
    for policy in ("unfreeze:last=1", "unfreeze:last=1,bn=frozen", "full,bn=affine"):
        d = tk.plan(bb, data=split_folders / "train", policy=policy, **{**KW, "epochs": 1})
        said[policy] = (d.to_dict()["bn"], [r["blocks"] for r in d.to_dict()["bn_statistics_update"]])
    assert said == {"unfreeze:last=1": ("statistics update in training blocks, eval elsewhere", [["top"]]),
                    "unfreeze:last=1,bn=frozen": ("frozen entirely", [[]]),
                    "full,bn=affine": ("statistics frozen (its BatchNorm layers have no gamma/beta to train)", [[]])}
    policy_line = tk.plan(bb, data=split_folders / "train", policy="unfreeze:last=1,bn=affine",
                          **{**KW, "epochs": 1}).summary().splitlines()[2]
    assert policy_line.endswith("head + top for 1 epoch"), policy_line  # no gamma/beta said to train
    before = {k: v.clone() for k, v in trunk.state_dict().items() if "running" in k}
    r = tk.finetune(bb, data=split_folders / "train", policy="unfreeze:last=1", **{**KW, "epochs": 1})
    after = r.model.trunk.state_dict()
    assert sorted({k.split(".")[0] for k in before if not torch.equal(before[k], after[k])}) == ["top"]


def test_a_frozen_run_without_the_cache_says_what_it_does_otherwise(split_folders):
    """cache_features=False on a frozen backbone changed the augmentation, the head's precision
    and its FeatureNorm without a word, where docs called caching a pure speed-up."""
    def note(**kw):
        d = _plan(split_folders / "train", policy="feature_extraction", cache_features=False, **kw)
        return [n for n in d.notes if n.startswith("cache_features=False:")], d

    said, d = note()
    assert d.augment == "standard" and len(said) == 1 and "the training images are augmented (augment='standard'" \
        in said[0], said
    assert ("the head trains in bf16" in said[0]) == (d.speed["precision"] == "bf16")
    assert note(augment="none", precision="fp32", head_norm=False)[0] == []  # the cached run's, but for the time
    assert not [n for n in _plan(split_folders / "train", policy="feature_extraction").notes
                if n.startswith("cache_features")]


def test_decisions_record_which_blocks_update_batchnorm_statistics(split_folders):
    p = _plan(split_folders / "train", policy="fine_tune:frozen=1", epochs=3)
    d = p.to_dict()
    assert d["bn_statistics_update"][0] == {"epochs": [1, 1], "blocks": []}
    assert d["bn_statistics_update"][1]["epochs"] == [2, 3] and "stem" in d["bn_statistics_update"][1]["blocks"]
    assert all(not r["blocks"] for r in _plan(split_folders / "train", policy="full,bn=frozen").to_dict()
               ["bn_statistics_update"])


def test_exports_carry_names_and_digests_not_the_training_machines_paths(split_folders, tmp_path):
    from transferkit.export import read_metadata

    weights = tmp_path / "w.pt"
    torch.save(tk.get_backbone("tk:small_cnn", weights=None).trunk.state_dict(), weights)
    kw = dict(backbone="tk:small_cnn", data=split_folders / "train", **{**KW, "weights": str(weights)})
    tk.finetune(export=tmp_path / "m.pt", checkpoint=tmp_path / "run.ckpt", **kw)
    meta = read_metadata(tmp_path / "m.pt")
    text = str(meta)
    assert str(tmp_path) not in text and str(split_folders) not in text
    assert meta["decisions"]["weights"].startswith("w.pt@blake2b:") and meta["decisions"]["config"]["data"] == "train"
    from transferkit.export.from_checkpoint import export_checkpoint

    export_checkpoint(tmp_path / "run.ckpt", tmp_path / "again.pt")  # transferkit export: the checkpoint's paths
    again = read_metadata(tmp_path / "again.pt")["decisions"]  # were written as they were, absolute
    assert str(tmp_path) not in str(again) and again == meta["decisions"]
    tk.finetune(export=tmp_path / "full.pt", checkpoint=tmp_path / "full.ckpt", portable_metadata=False, **kw)
    assert read_metadata(tmp_path / "full.pt")["decisions"]["weights"] == str(weights)
    export_checkpoint(tmp_path / "full.ckpt", tmp_path / "full_again.pt")
    assert read_metadata(tmp_path / "full_again.pt")["decisions"]["weights"] == str(weights)


def test_paths_inside_backbone_options_are_kept_out_of_a_portable_record():
    """timm's pretrained_cfg_overlay={'file': '/home/ann/...'} (backbones.md's way to give timm a
    local weights file) was written whole into every export, the user's home folder with it."""
    from transferkit.config import portable_decisions

    overlay = {"pretrained_cfg_overlay": {"file": "/home/ann/models/lite0.pth", "url": "https://h/w?sig=c2ln"},
               "drop_rate": 0.1, "img_size": [64, 64]}
    record = portable_decisions({"config": {"backbone_options": overlay, "data": "/home/ann/photos"},
                                 "backbone_options": {"file": "~/w.pth"}})
    assert record["config"]["backbone_options"] == {
        "pretrained_cfg_overlay": {"file": "lite0.pth", "url": "https://h/w?sig=…"}, "drop_rate": 0.1,
        "img_size": [64, 64]}
    assert record["backbone_options"] == {"file": "w.pth"} and "/home/ann" not in str(record)


def test_a_file_that_fails_during_extraction_is_masked_and_reported_by_every_run(tmp_path):
    """The store keeps the entry (its part is reused) but masks the file's row, so later runs
    still see and report the broken file instead of silently training on a replacement."""
    root = make_image_folder(tmp_path / "d", per_class=6)
    damaged_png(root / "dark" / "damaged.png")
    kw = dict(backbone="tk:small_cnn", data=root, cache_dir=tmp_path / "cache", **KW)
    for run in range(2):
        with pytest.warns(UserWarning, match="damaged.png"):
            r = tk.finetune(**kw)
        assert "on_bad_file='skip'" not in r.data_report.bad_files[0][1]  # a skip-mode run's reason, no such advice
        assert r.data_report.bad_at_load == [str(root / "dark" / "damaged.png")]
        assert r.feature_report["masked_samples"] == 1
        assert r.feature_report["computed"] == (r.feature_report["shards"] if run == 0 else 0)
    with pytest.raises(BadFileError, match="damaged.png"):  # on_bad_file="raise": the run stops, nothing masked
        tk.finetune(**{**kw, "cache_dir": tmp_path / "other"}, on_bad_file="raise")
    # and so does a raise-mode run that reuses the store in which the file's row is masked
    with pytest.raises(BadFileError, match=r"damaged.png' failed to load when the features of .* were computed"):
        tk.finetune(**kw, on_bad_file="raise")


def test_a_file_that_failed_while_decoded_once_is_masked_by_the_feature_store_and_reported_again(tmp_path):
    """A fine_tune run decodes images once (a file that fails is replaced there, and remembered)
    before its frozen phase fills the store: the store still masks the file's row, so that a
    later run reusing the store reports it."""
    root = make_image_folder(tmp_path / "d", per_class=6)
    damaged = damaged_png(root / "dark" / "damaged.png")
    kw = dict(backbone="tk:small_cnn", data=root, cache_dir=tmp_path / "cache", **{**KW, "epochs": 3})
    with pytest.warns(UserWarning, match="damaged.png"):
        r = tk.finetune(**kw, policy="fine_tune:frozen=1", decode_once=True)
    assert r.feature_report["masked_samples"] == 1
    with pytest.warns(UserWarning, match="damaged.png"):
        again = tk.finetune(**kw, policy="feature_extraction")
    assert again.data_report.bad_at_load == [str(damaged)] and again.feature_report["computed"] == 0


def test_precision_follows_the_cache_decision(split_folders):
    """A frozen policy without the cache: the loop runs the trunk every epoch, and the summary
    tells one story (no 'cached features' anywhere)."""
    d = _plan(split_folders / "train", policy="feature_extraction", cache_features=False)
    text = d.summary()
    assert not d.cache and d.cached_epochs == 0 and d.speed["feature_precision"] is None
    assert "not cached" in text and "cached features" not in text and "features bf16" not in text
    cached = _plan(split_folders / "train", policy="feature_extraction")
    assert cached.cache and cached.speed["precision"] == "fp32"
    assert "the head trains in fp32 on the cached features" in cached.summary()


def test_decide_is_pure_and_the_record_is_plain_json(split_folders):
    import json

    cfg = FinetuneConfig(backbone=_backbone(), data=split_folders / "train", **{**KW, "policy": "unfreeze:last=1"})
    facts = tk.look(cfg)[0]
    with pytest.MonkeyPatch.context() as mp:  # no file is read, listed or stat-ed while deciding
        for mod, name in ((os, "stat"), (os, "listdir"), (os, "scandir"), (Path, "stat"), (Path, "open")):
            mp.setattr(mod, name, lambda *a, **k: pytest.fail("I/O while deciding"))
        mp.setattr("builtins.open", lambda *a, **k: pytest.fail("I/O while deciding"))
        a, b = tk.decide(cfg, facts), tk.decide(cfg, facts)
    assert a == b and json.loads(json.dumps(a.to_dict())) == a.to_dict()
    assert json.loads(json.dumps(facts.to_dict(), default=str))["backbone"]["blocks"] == list(facts.backbone.blocks)


def test_dry_run_loads_no_weights_and_computes_no_features(split_folders, tmp_path, monkeypatch):
    import transferkit.facts as registry
    import transferkit.train.features as features

    weights = tmp_path / "w.pt"
    torch.save(tk.get_backbone("tk:small_cnn", weights=None).trunk.state_dict(), weights)
    asked = []
    real = registry.get_backbone
    monkeypatch.setattr(registry, "get_backbone", lambda name, **kw: asked.append(kw.get("weights")) or real(name, **kw))
    monkeypatch.setattr(features, "extract_features", lambda *a, **k: pytest.fail("features computed"))
    d = tk.plan(backbone="tk:small_cnn", data=split_folders / "train",
                **{**KW, "weights": str(weights), "cache_dir": str(tmp_path / "cache")})
    assert asked and all(w is None for w in asked)  # the structure alone
    assert d.weights == str(weights) and d.cache and "plan: tk:small_cnn" in d.summary()
    with pytest.raises(ConfigError, match="dry run"):
        d.feature_key("train")


def test_export_from_a_checkpoint_reads_the_stored_decisions(split_folders, tmp_path):
    """The head (hidden widths, FeatureNorm) comes from the decisions the run stored, not from
    re-deriving it from the configuration."""
    from transferkit.export.from_checkpoint import model_from_checkpoint

    r = tk.finetune("tk:small_cnn", data=split_folders / "train", head_hidden=(8,), checkpoint=tmp_path / "c.pt",
                    restore_best=False, **KW)  # the checkpoint holds the last epoch's weights, as the model then
    model, meta = model_from_checkpoint(tmp_path / "c.pt")
    assert meta["decisions"]["head"]["norm"] is True and isinstance(model.head[0], tk.FeatureNorm)
    assert "config" not in meta and meta["decisions"]["config"]["head_hidden"] == [8]  # the configuration once
    x = torch.randint(0, 255, (2, 3, 16, 16), dtype=torch.uint8)
    r.model.eval()
    # the same weights; the run's model may hold them channels_last (its layout decision), the rebuilt one
    # contiguous, whose convolutions sum in another order
    torch.testing.assert_close(model(x), r.model(x), rtol=1e-4, atol=1e-4)


def _on_cuda(facts, **decode):
    """``facts`` as a CUDA machine would gather them (the input-decode facts given)."""
    import dataclasses

    device = dataclasses.replace(facts.device, device="cuda:0", type="cuda", bf16=True, bf16_why="test")
    census = {"files": facts.data.n_train + facts.data.n_val, "jpeg": facts.data.n_train + facts.data.n_val}
    base = {"census": census, "available": [True, "nvJPEG"], "skipped": None,
            "measured": {"cpu_images_per_s": 1000.0, "gpu_images_per_s": 3100.0, "batches": 4, "batch_size": 128,
                         "workers": 8}}
    return dataclasses.replace(facts, device=device, input_decode={**base, **decode})


def test_input_decode_is_decided_shown_keyed_and_forced(split_folders):
    from transferkit.decisions import differences

    cfg = FinetuneConfig(backbone=_backbone(), data=split_folders / "train", val_data=split_folders / "val",
                         **{**KW, "cache_dir": _CACHE})
    facts, _ = tk.look(cfg)
    here = tk.decide(cfg, facts)
    assert here.input_decode["where"] == "cpu" and here.input_decode["passes"] == ["feature pass"]
    assert "  decoding: cpu (no CUDA device: the CPU workers decode (Pillow))" in here.summary().splitlines()
    assert "decoder" not in here.feature_key_parts("train")  # the CPU path keeps the keys it had
    gpu = tk.decide(cfg, _on_cuda(facts))
    assert gpu.input_decode["where"] == "gpu"
    assert ("  decoding: gpu (nvJPEG decoded 3.10x faster than 8 CPU workers on 4 batches (3100 vs 1000 img/s); "
            "for the feature pass)") in gpu.summary().splitlines()
    assert gpu.to_dict()["input_decode"] == "gpu" and gpu.feature_key("train") != here.feature_key("train")
    slower = tk.decide(cfg, _on_cuda(facts, measured={**_on_cuda(facts).input_decode["measured"],
                                                       "gpu_images_per_s": 900.0}))
    assert slower.input_decode["where"] == "cpu" and "0.90x" in slower.input_decode["reason"]
    assert slower.feature_key("train") == tk.decide(cfg, _on_cuda(facts, available=[True, "x"],
                                                                  measured=None)).feature_key("train")
    png = tk.decide(cfg, _on_cuda(facts, census={"files": 10, "jpeg": 6}))
    assert png.input_decode["reason"] == "40% of the images are not JPEG (GPU decoding needs 90% JPEG)"
    broken = tk.decide(cfg, _on_cuda(facts, available=[False, "decode_jpeg(device='cuda') failed: no nvJPEG"]))
    assert "no nvJPEG" in broken.input_decode["reason"] and broken.input_decode["where"] == "cpu"
    with pytest.raises(ConfigError, match="input_decode='gpu' decodes JPEGs with nvJPEG on a CUDA device; this run "
                                          "is on 'cpu'"):
        tk.plan(cfg.replace(input_decode="gpu"))
    assert differences(slower.to_dict(), gpu.to_dict()) == {}  # a resume may decode elsewhere
    with pytest.raises(ConfigError, match="unknown input_decode 'tpu'"):
        FinetuneConfig(data="x", input_decode="tpu")


def test_images_decoded_once_leave_nothing_to_decode_on_the_gpu(split_folders):
    cfg = FinetuneConfig(backbone=_backbone(), data=split_folders / "train", val_data=split_folders / "val",
                         policy="full", **{**KW, "epochs": 3})
    facts, _ = tk.look(cfg)
    d = tk.decide(cfg, _on_cuda(facts))
    assert set(d.decode) == {"train", "val"}  # small images: decoded once, in memory
    assert d.input_decode == {"where": "cpu", "reason": "every pass reads images decoded once (decode_once)",
                              "passes": []}
    assert tk.decide(cfg.replace(decode_once=False), _on_cuda(facts)).input_decode["passes"] == \
        ["train epochs", "val epochs"]


def test_a_record_written_before_target_norm_existed_resumes_unless_its_head_differs(split_folders):
    from transferkit.decisions import differences

    now = _plan(split_folders / "train").to_dict()
    old = {k: dict(v) if isinstance(v, dict) else v for k, v in now.items()}
    del old["config"]["target_norm"], old["head"]["target_norm"]
    assert differences(old, now) == {}  # a classifier of then is one of now
    regression = {**now, "head": {**now["head"], "target_norm": True}}  # a regression run of now standardises
    assert differences(old, regression) == {"head": (old["head"] | {"target_norm": False}, regression["head"])}


def test_a_backbone_object_refuses_weights_it_was_not_built_with_and_plans_as_it_trains(split_folders):
    """A Backbone object carries its weights: weights= and backbone_options= (which apply to a
    name) are refused rather than ignored, and the plan names the object's weights as the run does."""
    bb = _backbone()
    kw = {**KW, "data": split_folders / "train", "epochs": 1}
    assert tk.plan(bb, **kw).summary().splitlines()[0] == tk.finetune(bb, **kw).decisions.summary().splitlines()[0]
    assert "(random init)" in tk.plan(bb, **{**kw, "weights": "DEFAULT"}).summary().splitlines()[0]
    named = tk.get_backbone("tk:small_cnn", weights=None)
    named.weights = str(split_folders / "w.pt")
    assert tk.plan(named, **{**kw, "weights": split_folders / "w.pt"}).weights == named.weights  # a Path is its str
    for given in ({"weights": "source.pt"}, {"backbone_options": {"widths": (4, 4, 8)}}):
        with pytest.raises(ConfigError, match="applies to a backbone given by name, but backbone is a Backbone obj"):
            tk.plan(bb, **{**kw, **given})


def test_a_resume_may_move_the_feature_cache(split_folders, tmp_path):
    """cache_dir is where features are kept, not what is computed: the cache decision's words
    named its folder and a resume with another cache_dir (or none) was refused."""
    ckpt = tmp_path / "run.pt"
    kw = dict(data=split_folders / "train", val_data=split_folders / "val", checkpoint=ckpt, **{**KW, "epochs": 3})

    with pytest.raises(RuntimeError, match="stop"):
        tk.finetune("tk:small_cnn", cache_dir=tmp_path / "a", callbacks=[_stop_after_first], **kw)
    resumed = tk.finetune("tk:small_cnn", resume=True, **kw)  # features in memory now
    straight = tk.finetune("tk:small_cnn", cache_dir=tmp_path / "b", **{**kw, "checkpoint": tmp_path / "s.pt"})
    assert [r["train_loss"] for r in resumed.history] == [r["train_loss"] for r in straight.history]


def test_policy_options_that_do_nothing_are_noted(image_folder, tmp_path):
    """The head's passes without cached features, L2-SP on a frozen backbone or from random
    weights, and decay_norm_bias under L2-SP were taken without a word."""
    torch.save(tk.get_backbone("tk:small_cnn", weights=None).trunk.state_dict(), tmp_path / "trunk.pt")
    kw = dict(weights=tmp_path / "trunk.pt", data=image_folder, image_size=16, num_workers=0, verbose=False, epochs=3)

    def notes(policy, **extra):
        return " ".join(tk.plan("tk:small_cnn", **{**kw, **extra}, policy=policy).notes)

    assert "The frozen epochs of policy fine_tune:frozen=1,passes=3 make several passes of the head (passes=3) " \
           "over cached features, and this run caches none (cache_features=False" in notes(
               "fine_tune:frozen=1,passes=3", cache_features=False)
    assert "policy fine_tune:frozen=1 make several passes of the head (passes=epochs)" in notes(
        "fine_tune", cache_features=False)
    assert "l2sp=0.1 is not used: no backbone weight trains in this run" in notes("feature_extraction,l2sp=0.1")
    assert "this run starts from random ones (weights=None)" in notes("full,l2sp=0.1", weights=None)
    assert "decay_norm_bias=true is not used: L2-SP replaces weight decay" in notes("full,l2sp=0.1,"
                                                                                   "decay_norm_bias=true")
    for quiet in ("fine_tune", "fine_tune:frozen=1,passes=1", "full,l2sp=0.1", "full,decay_norm_bias=true",
                  "feature_extraction,bn=affine,layer_decay=0.5"):  # tk:small_cnn's BatchNorm gamma/beta train
        assert notes(quiet, **({"cache_features": False} if quiet.endswith("passes=1") else {})) == "", quiet
    from transferkit.backbones.custom import from_module

    no_bn = from_module(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1),
                                            torch.nn.Flatten()), input_spec={"image_size": 16})
    for option in ("discriminative=0.5", "layer_decay=0.5"):  # nothing of a trunk without BatchNorm trains
        policy = f"feature_extraction,bn=affine,{option}"
        said = " ".join(tk.plan(no_bn, **{**kw, "weights": None}, policy=policy).notes)
        assert f"{option} is not used: no backbone parameter trains" in said
    for policy in ("full,bn=frozen", "feature_extraction,bn=affine", "full, bn = train"):  # no BatchNorm: nothing
        said = tk.plan(no_bn, **{**kw, "weights": None}, policy=policy).notes  # for bn= to do, the default written
        bn = [n for n in said if n.startswith("bn=")]  # out too
        assert bn == [f"bn={policy.split('=')[-1].strip()} is not used: the trunk holds no BatchNorm layer (other "
                      "norms, such as LayerNorm, train with their blocks)."], said
    assert "bn=train is not used: the backbone is frozen for every epoch, its BatchNorm layers in eval mode" in \
        notes("feature_extraction,bn=train")  # statistics of a frozen backbone are not updated
    assert "bn=" not in notes("fine_tune,bn=train")
    plain_bn = from_module(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4, affine=False),
                                               torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()),
                           input_spec={"image_size": 16})  # statistics without gamma/beta: bn=frozen freezes them
    assert not [n for n in tk.plan(plain_bn, **{**kw, "weights": None}, policy="full,bn=frozen").notes
                if n.startswith("bn=")]
    assert "discriminative" not in notes("fine_tune", epochs=1)  # its own default: the frozen run is said already


def test_l2sp_under_lora_without_blocks_pulls_no_weight_and_says_so(image_folder):
    """Under LoRA no pretrained weight trains, so l2sp's alpha pulled nothing, without a word
    (l2sp=0.1 and l2sp=1000 ended with the same weights); with blocks named it pulls them."""
    kw = dict(backbone="timm:vit_tiny_patch16_224", weights=None, data=image_folder, image_size=32, epochs=2,
              backbone_options={"img_size": 32, "patch_size": 8, "depth": 2}, verbose=False)
    said = [n for n in tk.plan(**kw, policy="lora:r=4,l2sp=0.1").notes if n.startswith("l2sp=")]
    assert len(said) == 1 and said[0].startswith("l2sp=0.1 pulls no weight: under LoRA no pretrained weight trains")
    assert not [n for n in tk.plan(**kw, policy="lora:r=4,last=1,l2sp=0.1").notes if "under LoRA" in n]
    for policy, what in (("lora:r=4", "LoRA factors in the backbone"), ("lora:r=4,last=1", "backbone weights")):
        assert f"policy {policy} trains {what} from epoch 1" in tk.plan(**kw, policy=policy).summary()


def test_settings_that_do_nothing_are_noted_and_a_warmup_past_its_phase_is_refused(image_folder):
    """momentum with Adam(W), warmup_epochs with one_cycle and weight_decay under L2-SP were
    taken without a word; a warmup longer than fine_tune's first phase was cut where the phase
    ended (the head never reached lr); l2sp=0,l2sp_beta=0 turned weight decay off and penalised
    nothing."""
    kw = dict(weights=None, data=image_folder, image_size=16, num_workers=0, verbose=False, epochs=3)
    for extra, said in (({"optimizer": "adamw", "momentum": 0.5}, "momentum=0.5 is not used: it is SGD's"),
                        ({"schedule": "one_cycle", "warmup_epochs": 1}, "warmup_epochs=1 is not used: the one_cycle"),
                        ({"policy": "full,l2sp=0.01", "weight_decay": 0.05}, "weight_decay=0.05 is not used: L2-SP"),
                        ({"policy": "full,l2sp=0"}, "l2sp=0 pulls no backbone weight toward its starting weights"),
                        ({"policy": "full,discriminative=1"}, "discriminative=1 lowers no rate: every block trains"),
                        ({"policy": "full,layer_decay=1"}, "layer_decay=1 lowers no rate: every block trains"),
                        ({"policy": "full,l2sp=0.1"}, "l2sp=0.1 pulls the backbone toward its starting weights, and "
                                                      "this run starts from random ones"),
                        ({"head_activation": "gelu"}, "head_activation='gelu' is not used: a linear head has no "),
                        ({"decode_once": True, "policy": "feature_extraction"}, "decode_once=True is not used"),
                        ({"decode_once": True, "policy": "full", "epochs": 1}, "decode_once=True is not used"),
                        ({"max_seconds": 5.0}, "max_seconds=5.0 is not used: it crops audio clips"),
                        ({"cache_views": 2, "policy": "full", "augment": "flip"}, "cache_views=2 is not used"),
                        ({"val_data": image_folder, "val_split": 0.5}, "val_split=0.5 is not used: val_data= gives"),
                        ({"schedule": "plateau", "val_split": 0}, "schedule='plateau' steps on the training loss"),
                        ({"policy": "feature_extraction,bn=frozen"}, "bn=frozen is not used: the backbone is frozen"),
                        ({"policy": "unfreeze:last=0"}, "policy 'unfreeze:last=0' unfreezes no block: this run is "
                                                        "feature_extraction"),
                        ({"head": "logistic", "lr": 0.5, "schedule": "step"},
                         "epochs=3, lr=0.5, schedule='step' are not used: head='logistic' is fitted once by ")):
        assert any(n.startswith(said) for n in tk.plan("tk:small_cnn", **{**kw, **extra}).notes), extra
    notes = tk.plan("tk:small_cnn", **{**kw, "policy": "full,l2sp=0"}).notes  # alpha 0 pulls nothing: one note
    assert len(notes) == 1 and notes[0].startswith("l2sp=0 pulls no backbone weight"), notes
    for extra in ({"head": "mlp", "head_activation": "gelu"}, {"decode_once": True, "policy": "full"},
                  {"schedule": "plateau"}, {"policy": "full,bn=frozen"}):  # each used
        assert not tk.plan("tk:small_cnn", **{**kw, **extra}).notes, extra
    assert not tk.plan("tk:small_cnn", **kw, optimizer="sgd", momentum=0.5, weight_decay=0.05).notes
    with pytest.raises(ConfigError, match=r"warmup_epochs=2 is longer than the first phase of policy "
                                          r"fine_tune:frozen=1,passes=1 \(1 epoch\).* Use warmup_epochs < 1, e.g. "
                                          r"0.5\.$"):
        tk.plan("tk:small_cnn", **kw, policy="fine_tune:frozen=1,passes=1", warmup_epochs=2)
    tk.plan("tk:small_cnn", **kw, policy="fine_tune:frozen=1,passes=3", warmup_epochs=2)  # 3 passes: 3 epochs of it
    with pytest.raises(ConfigError, match=r"\(1 epoch of 3 passes each, 3 epochs of the schedule\).* < 3, e.g. 1\.$"):
        tk.plan("tk:small_cnn", **{**kw, "epochs": 5}, policy="fine_tune:frozen=1,passes=3", warmup_epochs=3.5)
    for extra, said in (({"early_stopping": 2}, "early_stopping=2 cannot shorten this run: its earliest stop is "
                                                "after epoch 3 (2 without improvement after epoch 1, the first, always "
                                                "the best so far), and the run has 3 epochs; use early_stopping=1."),
                        ({"early_stopping": 2, "policy": "fine_tune:frozen=2", "epochs": 4},
                         "early_stopping=2 cannot shorten this run: its earliest stop is after epoch 4 (2 without "
                         "improvement after epoch 2, the last of the head-only phase, whose epochs do not count), and "
                         "the run has 4 epochs; use early_stopping=1."),
                        ({"early_stopping": 1, "epochs": 2}, "early_stopping=1 cannot shorten this run: its earliest "
                                                             "stop is after epoch 2 (1 without improvement after epoch "
                                                             "1, the first, always the best so far), and the run has 2 "
                                                             "epochs; train longer."),
                        ({"top_k": 2}, "top_k=2 is not used: a top-k accuracy is computed for k from 2 to one less "
                                       "than the classes, and this run has 2.")):
        assert said in tk.plan("tk:small_cnn", **{**kw, **extra}).notes, extra
    assert not tk.plan("tk:small_cnn", **kw, early_stopping=1).notes  # 3 epochs: may stop after the second
    # as long as the run or the phase: the warmup's last step is still below lr (said, not refused: a recipe's
    # warmup on a one-epoch trial run)
    for extra, said in (({"policy": "fine_tune:frozen=1,passes=1", "warmup_epochs": 1},
                         "warmup_epochs=1 is as long as the first phase of policy fine_tune:frozen=1,passes=1 (1 "
                         "epoch): the rate climbs to its end and never reaches lr"),
                        ({"policy": "full", "warmup_epochs": 3}, "warmup_epochs=3 is as long as the run (3 epochs): "
                                                                 "the rate climbs to its end and never reaches lr")):
        assert [n for n in tk.plan("tk:small_cnn", **kw, **extra).notes if n.startswith(said)], extra
    shown = tk.plan("tk:small_cnn", **{**kw, "epochs": 3}, policy="full", warmup_epochs=0.5).summary()
    assert "cosine schedule after a warmup of 0.5 epochs, 3 epochs x batch" in shown
    shown = tk.plan("tk:small_cnn", **kw, policy="fine_tune:frozen=1,passes=3", warmup_epochs=2).summary()
    assert "cosine schedule after a warmup of 2 passes, 3 epochs x batch" in shown  # a pass: an epoch of the schedule
    assert any("warmup_epochs=2 is not used" in n for n in tk.plan(  # one_cycle warms up itself: a note
        "tk:small_cnn", **kw, policy="fine_tune:frozen=1,passes=1", warmup_epochs=2, schedule="one_cycle").notes)
    with pytest.raises(tk.PolicyError, match="l2sp=0,l2sp_beta=0 penalises nothing"):
        tk.plan("tk:small_cnn", **kw, policy="full,l2sp=0,l2sp_beta=0")


def test_a_records_per_class_counts_describe_its_data_and_an_older_record_without_them_resumes(split_folders, tmp_path):
    """A run with a checkpoint records items per class of listed files (what a refused resume
    names); they are not compared: the digest says whether the data differ, and a checkpoint
    written before they were recorded resumes."""
    from transferkit.decisions import differences

    now = _plan(split_folders / "train", checkpoint=tmp_path / "run.pt").to_dict()
    counts = now["data"]["train"]["per_class"]
    assert set(counts) == set(now["classes"]) and sum(counts.values()) == now["data"]["train"]["items"]
    older = {**now, "data": {k: {n: v for n, v in part.items() if n != "per_class"} if isinstance(part, dict) else part
                             for k, part in now["data"].items()}}
    assert differences(older, now) == {}
    assert "per_class" not in _plan(split_folders / "train").to_dict()["data"]["train"]  # no checkpoint: not recorded


def test_the_plan_lists_as_updating_statistics_only_the_training_blocks_that_hold_them(split_folders):
    """The record's bn_statistics_update listed every training block, a MobileNet's pre_logits
    (Linear layers alone) among them; the blocks whose statistics a run updates are those that
    hold BatchNorm layers, as measured on the run's buffers."""
    from torch import nn

    from transferkit.backbones import Backbone, Block, InputSpec

    torch.manual_seed(0)
    trunk = nn.Sequential()
    trunk.add_module("stem", nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU()))
    trunk.add_module("mid", nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                                          nn.AdaptiveAvgPool2d(1), nn.Flatten(1)))
    trunk.add_module("fc", nn.Linear(4, 4))
    bb = Backbone(name="linear-last", trunk=trunk, num_features=4, input_spec=InputSpec(image_size=16),
                  blocks=(Block("stem", ("stem",)), Block("mid", ("mid",)), Block("fc", ("fc",))))
    d = tk.plan(bb, data=split_folders / "train", policy="gradual:every=1", **{**KW, "epochs": 3})
    assert [r["blocks"] for r in d.to_dict()["trainable"]] == [[], ["fc"], ["mid", "fc"]]
    assert d.to_dict()["bn_statistics_update"] == [{"epochs": [1, 2], "blocks": []}, {"epochs": [3, 3],
                                                                                     "blocks": ["mid"]}]
    before = {k: v.clone() for k, v in trunk.state_dict().items() if "running" in k}
    r = tk.finetune(bb, data=split_folders / "train", policy="unfreeze:last=2", **{**KW, "epochs": 1})
    after = r.model.trunk.state_dict()
    assert sorted({k.split(".")[0] for k in before if not torch.equal(before[k], after[k])}) == ["mid"]
    assert [r["blocks"] for r in r.decisions.to_dict()["bn_statistics_update"]] == [["mid"]]
    from transferkit.decisions import differences

    now = r.decisions.to_dict()  # a checkpoint that listed every training block (or said BatchNorm otherwise) resumes
    assert differences({**now, "bn_statistics_update": [{"epochs": [1, 1], "blocks": ["mid", "fc"]}],
                        "bn": "none in the trunk"}, now) == {}


def test_groups_whose_rate_changes_no_float32_weight_are_noted(image_folder):
    """`discriminative=1e-300` (accepted: a ratio in (0, 1]) gave the first blocks a rate of
    1e-303, which changes no float32 weight, while the plan counted them as trained."""
    said = "parameter groups train at a learning rate below 1e-10 (the smallest, 'stem', at 1e-303)"
    assert any(said in n for n in _plan(image_folder, policy="full,discriminative=1e-300", lr=1e-3).notes)
    for policy in ("full,discriminative=0.01", "fine_tune", "feature_extraction"):
        assert not any("learning rate below" in n for n in _plan(image_folder, policy=policy, lr=1e-3).notes), policy
