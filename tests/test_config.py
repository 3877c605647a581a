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
from transferkit.config import BackboneLike, MapStyleDataset, PolicyLike, config_fields, merge_config, unknown_key_error
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
    assert info.value.code == 2 and "invalid int value: 'two'" in capsys.readouterr().err


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
    comma = Policy(lora=4, lora_targets=r"blocks\.\d{1,2}\.attn")  # its string does not parse back
    assert FinetuneConfig(data="x", policy=comma).to_dict()["policy"] == "<Policy>"
