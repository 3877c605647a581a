"""FinetuneConfig's fields carry real type annotations, and the checks, the CLI flags and the
help read their types and choices from those annotations."""

from __future__ import annotations

import dataclasses
import re
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import pytest

import transferkit
from transferkit import ConfigError, FinetuneConfig
from transferkit.backbones import get_backbone
from transferkit.cli import main
from transferkit.config import (BackboneLike, MapStyleDataset, PolicyLike, config_fields, load_config, merge_config,
                                unknown_key_error)
from transferkit.policies import Policy
from transferkit.train.loop import Loop
from transferkit.train.tasks import make_loss


def test_type_hints_name_real_types():
    hints = typing.get_type_hints(FinetuneConfig)
    assert hints.keys() == {f.name for f in dataclasses.fields(FinetuneConfig)}
    assert hints["epochs"] is int and hints["verbose"] is bool and hints["device"] is str
    assert hints["lr"] == float | None
    assert hints["weights"] == str | Path | None
    assert hints["backbone"] == str | BackboneLike and hints["policy"] == str | PolicyLike
    assert isinstance(get_backbone("tk:small_cnn", weights=None), BackboneLike)
    assert isinstance(Policy.parse("full"), PolicyLike) and not isinstance("full", PolicyLike)
    assert hints["data"] == str | Path | MapStyleDataset | None
    assert hints["precision"] == Literal["auto", "fp32", "bf16", "fp16"]
    assert hints["head_hidden"] == Sequence[int]
    assert all(h is not Any and Any not in typing.get_args(h) for h in hints.values())


def test_checks_and_choices_follow_the_annotations():
    with pytest.raises(ConfigError, match=r"epochs=2\.5 has type float; expected int\."):
        FinetuneConfig(data="x", epochs=2.5)
    assert FinetuneConfig(data="x", lr=1).lr == 1  # a float field takes an int
    with pytest.raises(ConfigError, match=r"unknown precision 'fp64'\. .*Valid values: 'auto', 'fp32', 'bf16', 'fp16'"):
        FinetuneConfig(data="x", precision="fp64")
    with pytest.raises(ConfigError, match="backbone=3 has type int; expected BackboneLike or str"):
        FinetuneConfig(data="x", backbone=3)
    with pytest.raises(ConfigError, match="data=3 has type int; expected MapStyleDataset or None or Path or str"):
        FinetuneConfig(data=3)
    assert FinetuneConfig(data=[("a.png", 0), ("b.png", 1)]).data[1] == ("b.png", 1)  # any indexable with len()
    assert FinetuneConfig(data="x", head_norm=False, class_weights=[1, 2]).class_weights == [1, 2]
    assert config_fields()["monitor"].metadata["choices"] == ("val_loss", "val_acc", "train_loss", "train_acc", None)
    assert merge_config({"lr": "1e-3", "image_size": "64"}) == {"lr": 1e-3, "image_size": 64}
    assert "here: unknown key 'epoch'. Did you mean 'epochs'?" in str(unknown_key_error("epoch", "here"))


def test_recipe_keys_passed_to_finetune_say_where_they_belong():
    # a recipe key is valid in a config file, but finetune() has no use for it: the error says
    # so instead of "unknown key 'limit'. Did you mean 'limit'?"
    for call in (lambda: transferkit.finetune("tk:small_cnn", data="x", limit=None),
                 lambda: FinetuneConfig(data="x", limit=3)):
        with pytest.raises(ConfigError, match=r"'limit' is a recipe setting .*read by the recipe scripts .*not by finetune\(\)") as info:
            call()
        assert "Did you mean" not in str(info.value)
    with pytest.raises(ConfigError, match=r"reads the training data from data="):
        transferkit.finetune("tk:small_cnn", data_dir="x")
    assert merge_config({"limit": 2}, source="recipe") == {"limit": 2}  # still a valid config-file key
    with pytest.raises(ConfigError, match=r"^cifar10\.yaml: 'runs' is a recipe setting .*read by the recipe scripts"):
        FinetuneConfig.from_dict({"backbone": "tk:small_cnn", "runs": {"a": {}}}, source="cifar10.yaml")
    with pytest.raises(ConfigError, match="Valid keys: .*limit"):  # and listed where it is valid
        merge_config({"limt": 2})


@pytest.mark.parametrize("key", ["export", "checkpoint", "plots_dir", "cache_dir", "data"])
def test_an_empty_path_is_refused_before_anything_runs(key, capsys):
    with pytest.raises(ConfigError, match=f"{key}='' is an empty path"):
        FinetuneConfig(**{"data": "x", key: " "})
    if key in ("export", "checkpoint", "plots_dir"):  # `--set cache_dir=` is YAML's null; no --data: no data
        code = main(["finetune", "--data", "x", f"--{key.replace('_', '-')}", ""])
        assert code == 2 and f"--{key.replace('_', '-')} '' is an empty path" in capsys.readouterr().err


def test_cli_flags_and_help_read_the_annotations(capsys):
    with pytest.raises(SystemExit):
        main(["finetune", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--precision {auto,fp32,bf16,fp16}" in text and "--epochs EPOCHS" in text
    assert "--optimizer {adamw,adam,sgd}" in text
    with pytest.raises(SystemExit) as info:
        main(["finetune", "--data", "x", "--epochs", "two"])
    assert info.value.code == 2 and "argument --epochs: expects an integer, got 'two'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main(["finetune", "--data", "x", "--epochs", "2.5"])
    assert info.value.code == 2 and "argument --epochs: expects an integer, got '2.5'" in capsys.readouterr().err


def test_a_config_file_names_its_settings_as_it_writes_them(tmp_path, capsys):
    """An error about a value from a YAML file writes it as the file does (``epochs: 2.5``), not as
    a flag the user never typed; a whole float there (``2.0``, ``1e3``) is the integer it stands for,
    as on the command line (``--epochs 2.0``, ``--set epochs=2.0``)."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text("epochs: 2.0\nbatch_size: 1e3\n")
    loaded = load_config(cfg)
    assert loaded["epochs"] == 2 and type(loaded["epochs"]) is int and loaded["batch_size"] == 1000
    for text, said in (("epochs: 2.5", "epochs: 2.5 has type float; expected int."),
                       ("head_hidden: [8, -2]", "head_hidden: [8, -2] is out of range; expected a list of positive"),
                       ("classes: [no, b]", "classes[0]: false has type bool; expected str (YAML reads unquoted"),
                       ("epochs: 3\nruns:\n  a: {epochs: 2.5}", "run 'a': epochs: 2.5 has type float")):
        cfg.write_text(text + "\n")
        with pytest.raises(ConfigError) as info:
            load_config(cfg)
        assert str(info.value).startswith(str(cfg)) and said in str(info.value), info.value
        assert main(["finetune", "--config", str(cfg), "--data", "x", "--dry-run"]) == 2
        err = capsys.readouterr().err
        assert said in err and "--set" not in err and "--epochs" not in err, err
    cfg.write_text("schedule: step\nschedule_options: {gamma: 5e-1}\nclass_weights: [5e-1, 1]\nprobe_Cs: [1e-2]\n"
                   "classes: ['1e3', '2']\n")  # YAML 1.1 reads 5e-1 as text; class names stay names
    loaded = load_config(cfg)
    assert loaded["schedule_options"] == {"gamma": 0.5} and loaded["class_weights"] == [0.5, 1]
    assert loaded["probe_Cs"] == [0.01] and loaded["classes"] == ["1e3", "2"]
    cfg.write_text("backbone_options: {clip_seconds: 8e-1, sample_rate: 8e3, name_like: 1e3x, tag: '12', "
                   "image_options: {drop_rate: 1e-1, widths: [8, 1e1]}}\n")
    assert load_config(cfg)["backbone_options"] == {"clip_seconds": 0.8, "sample_rate": 8000, "name_like": "1e3x",
                                                    "tag": "12", "image_options": {"drop_rate": 0.1, "widths": [8, 10]}}
    # (a number YAML 1.1 read as text, in nested maps and lists too; text stays text)
    with pytest.raises(ConfigError, match=r"schedule_options gamma='half' for schedule 'step' has type str; expected a "
                                          "number"):
        FinetuneConfig(data="x", schedule="step", schedule_options={"gamma": "half"})
    cfg.write_text("head_hidden: [256.0, 1e2]\nlimit: 3.0\n")  # whole floats in a list and in a recipe key too
    assert load_config(cfg)["head_hidden"] == (256, 100) and load_config(cfg)["limit"] == 3
    cfg.write_text("seed: 1e30\n")  # not exact as an int: refused, not read as 1000000000000000019884624838656
    with pytest.raises(ConfigError, match="seed: 1e\\+30 has type float; expected int"):
        load_config(cfg)
    for argv in (["--epochs", "2.0"], ["--set", "epochs=2.0"]):
        assert main(["finetune", "--data", "x", *argv, "--dry-run", "--json"]) == 2  # the data do not exist
        assert "epochs" not in capsys.readouterr().err  # but the value was taken


@pytest.mark.parametrize("task, option, said", [
    ("regression", {"label_smoothing": 0.1}, "label_smoothing applies to task='multiclass' only"),
    ("multilabel", {"label_smoothing": 0.1}, "label_smoothing applies to task='multiclass' only"),
    ("regression", {"class_weights": [1.0, 2.0]}, "class_weights do not apply to task='regression'"),
    ("regression", {"monitor": "val_acc"}, "monitor='val_acc' does not exist for task='regression'; use val_loss"),
    ("multilabel", {"head": "logistic"}, "head='logistic' fits a multiclass classifier"),
    ("regression", {"head": "logistic"}, "head='logistic' fits a multiclass classifier"),
    ("multiclass", {"head": "logistic", "head_dropout": 0.2}, "head_dropout=0.2 would be ignored"),
    ("multiclass", {"head": "logistic", "early_stopping": 2}, "early_stopping=2 would be ignored"),
    ("multiclass", {"probe_Cs": [1.0]}, "probe_Cs are the C values of head='logistic'"),
])
def test_settings_that_do_not_apply_to_the_task_are_refused_before_any_data_is_read(task, option, said):
    """A dry run (plan) refuses what the run refuses: the config itself, before the data are read."""
    with pytest.raises(ConfigError, match=said):
        transferkit.plan("tk:small_cnn", data="no/such/folder", task=task, **option)
    # the same rule where the loss and the loop are built by code that calls them directly
    loss_options = {k: v for k, v in option.items() if k in ("label_smoothing", "class_weights")}
    if loss_options:
        with pytest.raises(ConfigError, match=said):
            make_loss(task, **loss_options)
    if "monitor" in option:
        with pytest.raises(ConfigError, match=said):
            Loop(optimizer=None, loss_fn=None, set_mode=None, task=task, monitor=option["monitor"])
    if task != "multiclass":
        FinetuneConfig(data="x", **option)  # multiclass takes them


@pytest.mark.parametrize("call", [transferkit.plan, transferkit.lr_find, transferkit.linear_probe,
                                  transferkit.finetune])
def test_a_setting_refused_names_the_call_the_user_made(call, image_folder):
    """plan, lr_find and linear_probe share finetune's settings; their errors name the call
    made: the key check, the value checks, and the backbone's, made after the data are read."""
    name = f"{call.__name__}()"
    small = get_backbone("tk:small_cnn", weights=None)
    for backbone, options, said in [
            ("tk:small_cnn", {"epoch": 2}, "unknown key 'epoch'"),
            ("tk:small_cnn", {"epochs": 0}, "epochs=0 is out of range"),
            ("tk:small_cnn", {"task": "regression", "label_smoothing": 0.1}, "label_smoothing applies"),
            (small, {"backbone_options": {"width": 8}}, "backbone_options=.* applies to a backbone given by name")]:
        with pytest.raises(ConfigError, match=f"^{re.escape(name)}: {said}"):
            call(backbone, data=image_folder, weights=None, verbose=False, **options)
    with pytest.raises(ConfigError, match=r"^finetune\(\): epochs=0"):  # the name does not outlive the call
        FinetuneConfig(data="x", epochs=0)


def test_a_policy_object_is_recorded_as_its_string_where_that_reads_back():
    assert FinetuneConfig(data="x", policy=Policy.parse("gradual:every=2")).to_dict()["policy"] == "gradual:every=2"
    comma = Policy(lora=4, lora_targets=r"blocks\.\d{1,2}\.attn")  # a comma inside brackets reads back
    assert FinetuneConfig(data="x", policy=comma).to_dict()["policy"] == r"lora:r=4,targets=blocks\.\d{1,2}\.attn"
    escaped = Policy(lora=4, lora_targets=r"q\,k")  # the same pattern as q,k, which the policy holds
    assert escaped.lora_targets == "q,k"
    assert FinetuneConfig(data="x", policy=escaped).to_dict()["policy"] == r"lora:r=4,targets=q\,k"


def test_none_is_written_none_or_null_in_files_flags_and_set():
    """YAML reads `null` as None but `none`/`None` as text: every setting that takes None reads
    them as None; a setting whose choices hold 'none' (augment) keeps it."""
    got = merge_config({"weights": "None", "lr": "null", "image_size": "none", "max_seconds": "NULL",
                        "export": "none", "augment": "none", "data_dir": "None"}, source="x")
    assert got == {"weights": None, "lr": None, "image_size": None, "max_seconds": None, "export": None,
                   "augment": "none", "data_dir": None}
    with pytest.raises(ConfigError, match=r"lr='abc' has type str; expected .*\(None is written null or none\)"):
        merge_config({"lr": "abc"}, source="x")
    with pytest.raises(ConfigError, match="unknown scan 'None'"):  # scan has no None
        merge_config({"scan": "None"}, source="x")


@pytest.mark.parametrize("values, said", [
    ({"classes": [False, True]}, r"classes\[0\]=False has type bool; expected str \(YAML reads unquoted yes/no.*"
                                 r"quote each name"),
    ({"classes": ["a", 1]}, r"classes\[1\]=1 has type int; expected str\.$"),
    ({"head": "logistic", "probe_Cs": ["a"]}, r"probe_Cs\[0\]='a' has type str; expected a number"),
    ({"head": "logistic", "probe_Cs": [True]}, r"probe_Cs\[0\]=True has type bool; expected a number"),
    ({"head": "logistic", "probe_Cs": [-1]}, r"probe_Cs=\[-1\] is out of range; expected a non-empty list of numbers"),
    ({"head": "logistic", "probe_Cs": [0.1, 0]}, r"probe_Cs=\[0.1, 0\] is out of range"),
    ({"head": "logistic", "probe_Cs": []}, r"probe_Cs=\[\] is out of range; expected a non-empty list"),
    ({"head_hidden": [8, 2.5]}, r"head_hidden\[1\]=2.5 has type float; expected int"),
])
def test_the_elements_of_a_list_setting_are_checked_when_the_config_is_made(values, said):
    """The element type of a ``Sequence[...]`` annotation is checked as the field's own type is:
    in Python, in a file (YAML turns unquoted no/yes into booleans) and on the command line."""
    with pytest.raises(ConfigError, match=f"^finetune\\(\\): {said}"):
        FinetuneConfig(data="x", **values)
    with pytest.raises(ConfigError, match=f"^a.yaml: {said}"):
        merge_config(values, source="a.yaml")
    FinetuneConfig(data="x", classes=("a", "b"), head="logistic", probe_Cs=[0.5, 2])


def test_an_unknown_key_suggests_and_lists_only_the_keys_the_command_takes(capsys, tmp_path):
    def said(*argv):
        assert main(["finetune", "--data", "x", *argv]) == 2 if argv[0] != "lr-find" else main([*argv]) == 2
        return capsys.readouterr().err

    err = said("--set", "outdir=1")  # out_dir is a recipe key, which finetune refuses
    assert "unknown key 'outdir'" in err and "'out_dir'" not in err and "Did you mean 'plots_dir'" in err
    valid = err.split("Valid keys: ")[1]
    assert "callbacks" not in valid and "download" not in valid and "limit" not in valid and "data_dir" in valid
    err = said("--set", "learning_rate=1e-3")  # another tool's name for a setting
    assert "Did you mean 'lr'?" in err
    assert "Did you mean 'epochs'?" in said("--set", "num_epochs=3")
    err = said("lr-find", "--data", "x", "--set", "exprt=m.pt")
    valid = err.split("Valid keys: ")[1]
    assert "'export'" not in err and "export" not in valid and "checkpoint" not in valid and "lr," not in valid
    config = tmp_path / "bad.yaml"
    config.write_text("data: x\nlearning_rate: 0.1\n")
    assert main(["finetune", "--config", str(config), "--dry-run"]) == 2
    valid = capsys.readouterr().err.split("Valid keys: ")[1].rstrip(".\n").split(", ")
    assert len(valid) == len(set(valid)) and "lr" in valid  # each once (14 of them were listed twice)
    with pytest.raises(ConfigError, match=r"unknown key 'learning_rate'\. Did you mean 'lr'\?"):
        FinetuneConfig(data="x", learning_rate=1e-3)
    with pytest.raises(ConfigError, match=r"unknown key 'wd'\. Did you mean 'weight_decay'\?"):
        merge_config({"wd": 0.1})


def test_a_validation_monitor_without_validation_data_is_refused(image_folder):
    """An explicit val_* monitor, as early_stopping, needs validation data; a train_* one does not."""
    kw = dict(weights=None, data=image_folder, val_split=0, image_size=16, num_workers=0, verbose=False)
    with pytest.raises(ConfigError, match=r"^monitor='val_loss' picks the best epoch by a validation "
                                          r"score, but the run has no validation data.*monitor='train_loss'"):
        transferkit.plan("tk:small_cnn", monitor="val_loss", **kw)
    with pytest.raises(ConfigError, match=r"monitor='val_acc' .*monitor='train_acc'"):
        transferkit.plan("tk:small_cnn", monitor="val_acc", **kw)
    assert transferkit.plan("tk:small_cnn", monitor="train_loss", **kw).n_val == 0
    assert transferkit.plan("tk:small_cnn", **kw).n_val == 0  # the default monitor follows the data


def test_relative_paths_in_a_config_file_are_relative_to_its_folder(tmp_path, monkeypatch):
    from transferkit.config import load_config

    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "run.yaml").write_text(
        "data: ../images\nval_data: /abs/val\nexport: out/m.pt\ncache_dir: ~/cache\nlog_dir: ${HOME}/logs\n"
        "weights: DEFAULT\ncheckpoint: s3://bucket/r.ckpt\nplots_dir: plots\nout_dir: runs\n"
        "runs:\n  a: {cache_dir: c}\n")
    monkeypatch.chdir(tmp_path)
    cfg = load_config("cfg/run.yaml")
    assert cfg["data"] == "cfg/../images" and cfg["export"] == "cfg/out/m.pt" and cfg["plots_dir"] == "cfg/plots"
    assert cfg["out_dir"] == "cfg/runs" and cfg["runs"]["a"]["cache_dir"] == "cfg/c"
    assert (cfg["val_data"], cfg["cache_dir"], cfg["log_dir"], cfg["weights"], cfg["checkpoint"]) == \
        ("/abs/val", "~/cache", "${HOME}/logs", "DEFAULT", "s3://bucket/r.ckpt")  # as written
    (tmp_path / "cfg" / "w.yaml").write_text("weights: w/resnet.pth\n")
    assert load_config(tmp_path / "cfg" / "w.yaml")["weights"] == str(tmp_path / "cfg" / "w" / "resnet.pth")
    (tmp_path / "cfg" / "resnet_weights").write_bytes(b"")  # a weights file without a suffix, beside the config
    (tmp_path / "cfg" / "s.yaml").write_text("weights: resnet_weights\n")
    assert load_config(tmp_path / "cfg" / "s.yaml")["weights"] == str(tmp_path / "cfg" / "resnet_weights")
    (tmp_path / "here.yaml").write_text("data: images\n")
    assert load_config("here.yaml")["data"] == "images"  # in the current folder: unchanged
    # a list of shards: each path, as a single pattern is (it was left relative to the working directory)
    (tmp_path / "cfg" / "list.yaml").write_text("data: [s/a.tar, /abs/b.tar, 'pipe:cat c.tar']\n"
                                                "runs:\n  x: {val_data: [v/a.tar]}\n")
    listed = load_config("cfg/list.yaml")
    assert listed["data"] == ["cfg/s/a.tar", "/abs/b.tar", "pipe:cat c.tar"]
    assert listed["runs"]["x"]["val_data"] == ["cfg/v/a.tar"]


@pytest.mark.parametrize("key", ["weights", "name"])
def test_backbone_options_that_finetune_sets_itself_are_refused_in_one_line(key):
    """``backbone_options={weights: DEFAULT}`` reached get_backbone beside weights= and crashed with
    a TypeError traceback."""
    with pytest.raises(ConfigError, match=rf"backbone_options holds {key}, which finetune\(\) sets itself"):
        FinetuneConfig(data="x", backbone="tk:small_cnn", backbone_options={key: "DEFAULT"})


@pytest.mark.parametrize("Cs, said", [(5, r"probe_Cs=5 has type int; expected None or list or tuple"),
                                      ("abc", r"probe_Cs='abc' has type str")])
def test_linear_probe_cs_that_are_no_list_are_refused_as_given(Cs, said):
    """Cs=5 was a raw TypeError ('int' object is not iterable), and Cs="abc" was split into characters."""
    import transferkit as tk

    with pytest.raises(ConfigError, match=said):
        tk.linear_probe("tk:small_cnn", data="images/", Cs=Cs)
