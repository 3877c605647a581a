"""Policy strings, block schedules, optimizer groups and learning rates."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from transferkit.backbones import get_backbone
from transferkit.errors import ConfigError, PolicyError
from transferkit.heads import build_head
from transferkit.model import ImagePreprocess, TransferModel
from transferkit.policies import Policy, apply_policy, lr_multipliers, param_groups, trainable_parameter_names
from transferkit.train.optim import make_optimizer, make_scheduler

BLOCKS = ["stem", "layer1", "layer2", "layer3", "layer4"]


def small_model(seed: int = 0):
    torch.manual_seed(seed)
    bb = get_backbone("tk:small_cnn", weights=None, widths=(8, 8, 16))
    return TransferModel(ImagePreprocess((0.5,) * 3, (0.5,) * 3), bb.trunk, build_head(bb.num_features, 3)), bb


@pytest.mark.parametrize("spec, expected", [
    ("feature_extraction", Policy()),
    ("linear_probe", Policy()),
    ("full", Policy(unfreeze="all")),
    ("finetune,bn=frozen", Policy(unfreeze="all", bn="frozen")),
    ("unfreeze:last=2,bn=affine", Policy(unfreeze=2, bn="affine")),
    ("unfreeze:blocks=layer3+layer4", Policy(unfreeze=("layer3", "layer4"))),
    ("unfreeze:from=layer3", Policy(unfreeze_from="layer3")),
    ("gradual:every=2", Policy(every=2)),
    ("gradual:milestones=1+3+6,start=1,max=4", Policy(milestones=(1, 3, 6), unfreeze=1, max_blocks=4)),
    ("full,discriminative=0.01", Policy(unfreeze="all", discriminative=0.01)),
    ("full,layer_decay=0.75,decay_norm_bias=true", Policy(unfreeze="all", layer_decay=0.75, decay_norm_bias=True)),
    ("full, l2sp=0.1, l2sp_beta=0.001", Policy(unfreeze="all", l2sp=0.1, l2sp_beta=0.001)),
    ("lora:r=4,alpha=8,targets=qkv|fc1,blocks=norm", Policy(lora=4, lora_alpha=8.0, lora_targets="qkv|fc1",
                                                            unfreeze=("norm",))),
])
def test_parse_and_round_trip(spec, expected):
    p = Policy.parse(spec)
    assert p == expected
    assert Policy.parse(str(p)) == p
    assert Policy.parse(p) is p


@pytest.mark.parametrize("spec, fragment", [
    ("unfreez:last=2", "Unknown policy"),
    ("unfreeze", "needs one of last="),
    ("unfreeze:last=two", "non-negative integer"),
    ("unfreeze:last=2,blocks=stem", "conflicts"),
    ("full,every=2", "only applies to gradual"),
    ("gradual:every=2,milestones=3", "not both"),
    ("gradual:every=0", ">= 1"),
    ("gradual:milestones=4+2", "strictly increasing"),
    ("full,bn=sometimes", "Unknown BatchNorm mode bn='sometimes'"),
    ("full,discriminative=3", "(0, 1]"),
    ("full,discriminative=0.1,layer_decay=0.9", "not both"),
    ("lora:r=0", ">= 1"),
    ("lora:r=2,targets=(", "regular expression"),
    ("full,colour=blue", "valid options"),
    ("", "such as 'feature_extraction'"),
])
def test_bad_policy_strings_say_what_is_wrong(spec, fragment):
    with pytest.raises(PolicyError) as info:
        Policy.parse(spec)
    assert fragment in str(info.value)


def test_bad_fields_are_rejected():
    with pytest.raises(PolicyError, match="not both"):
        Policy(unfreeze=2, unfreeze_from="layer3")
    with pytest.raises(PolicyError, match="max_blocks only applies"):
        Policy(unfreeze=2, max_blocks=3)
    with pytest.raises(PolicyError, match="Gradual unfreezing starts"):
        Policy(unfreeze="all", every=2)
    with pytest.raises(PolicyError, match="not with full fine-tuning"):
        Policy(lora=4, unfreeze="all")


@given(start=st.integers(0, 5), every=st.one_of(st.none(), st.integers(1, 4)),
       milestones=st.lists(st.integers(0, 20), unique=True, max_size=4),
       bn=st.sampled_from(["train", "affine", "frozen"]),
       rate=st.one_of(st.none(), st.floats(0.01, 1.0)), decay=st.booleans())
@settings(max_examples=60, deadline=None)
def test_every_gradual_policy_round_trips_through_its_string(start, every, milestones, bn, rate, decay):
    ms = tuple(sorted(milestones)) if every is None else ()
    if every is None and not ms:
        every = 1
    p = Policy(unfreeze=start, every=every, milestones=ms, bn=bn, discriminative=rate, decay_norm_bias=decay)
    assert Policy.parse(str(p)) == p
    # the schedule only ever adds blocks, from the top, one at a time at most per epoch
    sched = p.schedule(BLOCKS, 25)
    assert len(sched[0]) >= start and sched[0] == BLOCKS[len(BLOCKS) - len(sched[0]):]
    for a, b in zip(sched, sched[1:]):
        assert b[len(b) - len(a):] == a and len(b) - len(a) in (0, 1)


def test_schedules_name_the_right_blocks_at_the_right_epochs():
    assert Policy.parse("gradual:every=2").schedule(BLOCKS, 7) == [
        [], [], ["layer4"], ["layer4"], ["layer3", "layer4"], ["layer3", "layer4"], ["layer2", "layer3", "layer4"]]
    assert Policy.parse("gradual:milestones=1+4,start=1").schedule(BLOCKS, 5) == [
        ["layer4"], ["layer3", "layer4"], ["layer3", "layer4"], ["layer3", "layer4"], ["layer2", "layer3", "layer4"]]
    assert Policy.parse("gradual:every=1,max=2").schedule(BLOCKS, 5)[-1] == ["layer3", "layer4"]
    assert Policy.parse("gradual:every=1").schedule(BLOCKS, 9)[-1] == BLOCKS
    assert Policy.parse("unfreeze:from=layer2").trainable_blocks(BLOCKS) == ["layer2", "layer3", "layer4"]
    assert Policy.parse("unfreeze:blocks=layer4+stem").trainable_blocks(BLOCKS) == ["stem", "layer4"]
    assert Policy.parse("unfreeze:last=0").trainable_blocks(BLOCKS) == []
    with pytest.raises(PolicyError, match="has 5"):
        Policy.parse("unfreeze:last=6").trainable_blocks(BLOCKS)
    with pytest.raises(PolicyError, match="Did you mean 'layer3'"):
        Policy.parse("unfreeze:from=layer_3").trainable_blocks(BLOCKS)


def test_frozen_throughout_decides_feature_caching():
    assert Policy.parse("feature_extraction").frozen_throughout(BLOCKS, 10)
    assert Policy.parse("gradual:every=5").frozen_throughout(BLOCKS, 5)
    assert not Policy.parse("gradual:every=5").frozen_throughout(BLOCKS, 6)
    assert not Policy.parse("feature_extraction,bn=affine").frozen_throughout(BLOCKS, 1)  # gamma/beta train
    assert not Policy.parse("lora:r=2").frozen_throughout(BLOCKS, 1)
    assert not Policy.parse("unfreeze:last=1").frozen_throughout(BLOCKS, 1)


def test_lr_multipliers_are_geometric_from_head_to_stem():
    disc = lr_multipliers(BLOCKS, Policy(unfreeze="all", discriminative=0.01))
    assert disc["head"] == 1.0 and disc["stem"] == pytest.approx(0.01)  # fastai slice(lr/100, lr)
    ratios = [disc[b] / disc[a] for a, b in zip(BLOCKS, BLOCKS[1:] + ["head"])]
    assert ratios == pytest.approx([0.01 ** -0.2] * 5)
    ld = lr_multipliers(BLOCKS, Policy(unfreeze="all", layer_decay=0.5))
    assert [ld[b] for b in BLOCKS + ["head"]] == pytest.approx([1 / 32, 1 / 16, 1 / 8, 1 / 4, 1 / 2, 1])
    assert set(lr_multipliers(BLOCKS, Policy()).values()) == {1.0}


@pytest.mark.parametrize("spec", ["unfreeze:last=2,discriminative=0.1", "full,layer_decay=0.6", "feature_extraction",
                                  "gradual:every=1", "unfreeze:blocks=stem+stage3,bn=affine", "full,bn=frozen"])
def test_optimizer_holds_exactly_the_trainable_parameters_once_with_the_policy_lr(spec):
    model, bb = small_model()
    policy = Policy.parse(spec)
    epochs = 4
    groups = param_groups(model, lr=1e-3, weight_decay=0.05, backbone=bb, policy=policy, epochs=epochs)
    opt = make_optimizer("adamw", groups, lr=1e-3)
    held = [p for g in opt.param_groups for p in g["params"]]
    assert len(held) == len({id(p) for p in held}), "a parameter is in two groups"
    ever = set()
    for e in range(epochs):
        apply_policy(model, bb, policy, epoch=e)
        ever |= trainable_parameter_names(model)
    by_id = {id(p): n for n, p in model.named_parameters()}
    assert {by_id[id(p)] for p in held} == ever
    mult = lr_multipliers(bb.block_names, policy)
    for g in opt.param_groups:
        for p in g["params"]:
            name = by_id[id(p)]
            block = "head" if name.startswith("head.") else bb.block_of(name[len("trunk."):])
            assert g["lr"] == pytest.approx(1e-3 * mult[block]), name
            assert (g["weight_decay"] == 0.0) == (p.ndim <= 1), name  # small_cnn: 1-d = BN and biases


@pytest.mark.parametrize("schedule", ["cosine", "one_cycle"])
def test_schedules_keep_the_per_block_lr_ratios(schedule):
    model, bb = small_model()
    policy = Policy.parse("full,layer_decay=0.5")
    opt = make_optimizer("adamw", param_groups(model, lr=1e-2, weight_decay=0.0, backbone=bb, policy=policy), lr=1e-2)
    sched = make_scheduler(schedule, opt, total_steps=10, steps_per_epoch=5)
    for _ in range(7):
        sched.step()
        lrs = {g["name"].split("/")[0]: g["lr"] for g in opt.param_groups}
        assert lrs["stem"] / lrs["head"] == pytest.approx(0.5 ** 4)


def test_weight_decay_options():
    model, bb = small_model()
    on = param_groups(model, lr=1e-3, weight_decay=0.1, backbone=bb, policy=Policy.parse("full,decay_norm_bias=true"))
    assert all(g["weight_decay"] == 0.1 for g in on)
    sp = param_groups(model, lr=1e-3, weight_decay=0.1, backbone=bb, policy=Policy.parse("full,l2sp=0.1"))
    assert all(g["weight_decay"] == 0.0 for g in sp)  # L2-SP replaces weight decay


def test_plain_param_groups_follow_requires_grad():
    model, bb = small_model()
    apply_policy(model, bb, Policy.parse("unfreeze:last=1"))
    groups = param_groups(model, lr=1e-3, weight_decay=0.1)
    held = {id(p) for g in groups for p in g["params"]}
    assert held == {id(p) for p in model.parameters() if p.requires_grad}
    assert [g["name"] for g in groups] == ["decay", "no_decay"]
    with pytest.raises(ConfigError, match="lr must be"):
        param_groups(model, lr=0, weight_decay=0.1)
