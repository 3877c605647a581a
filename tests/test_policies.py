"""Policy strings, block schedules, optimizer groups and learning rates."""

from __future__ import annotations

import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import transferkit as tk
from transferkit.backbones import get_backbone
from transferkit.errors import ConfigError, PolicyError
from transferkit.heads import build_head
from transferkit.model import ImagePreprocess, TransferModel
from transferkit.policies import Policy, apply_policy, lr_multipliers, lr_scales, param_groups, trainable_parameter_names
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
    ("full,bn=frozen", Policy(unfreeze="all", bn="frozen")),
    ("unfreeze:last=2,bn=affine", Policy(unfreeze=2, bn="affine")),
    ("unfreeze:blocks=layer3+layer4", Policy(unfreeze=("layer3", "layer4"))),
    ("unfreeze:from=layer3", Policy(unfreeze_from="layer3")),
    ("gradual:every=2", Policy(every=2)),
    ("gradual:milestones=1+3+6,start=1,max=4", Policy(milestones=(1, 3, 6), unfreeze=1, max_blocks=4)),
    ("full,discriminative=0.01", Policy(unfreeze="all", discriminative=0.01)),
    ("full,layer_decay=0.75,decay_norm_bias=true", Policy(unfreeze="all", layer_decay=0.75, decay_norm_bias=True)),
    ("full, l2sp=0.1, l2sp_beta=0.001", Policy(unfreeze="all", l2sp=0.1, l2sp_beta=0.001)),
    ("lora:r=8", Policy(lora=8)),
    ("lora:r=8,bn=frozen", Policy(lora=8, bn="frozen")),
    ("lora:r=4,alpha=8,targets=qkv|fc1,blocks=norm", Policy(lora=4, lora_alpha=8.0, lora_targets="qkv|fc1",
                                                            unfreeze=("norm",))),
])
def test_parse_and_round_trip(spec, expected):
    p = Policy.parse(spec)
    assert p == expected
    assert Policy.parse(str(p)) == p
    assert Policy.parse(p) is p


def test_numpy_numbers_are_the_numbers_they_are():
    """np.float32(0.5) and np.int64(2) (a sweep over np.linspace) were refused as not numbers,
    by messages that showed the number."""
    np = pytest.importorskip("numpy")
    assert Policy(unfreeze="all", discriminative=np.float32(0.5)) == Policy(unfreeze="all", discriminative=0.5)
    assert Policy(unfreeze=np.int64(2)) == Policy.parse("unfreeze:last=2")
    assert Policy(unfreeze="none", every=np.int64(2)) == Policy.parse("gradual:every=2")
    assert Policy(unfreeze="none", milestones=[np.int64(1), np.int64(3)]).milestones == (1, 3)
    assert type(Policy(unfreeze="all", l2sp=np.float64(0.1)).l2sp) is float
    assert str(Policy(unfreeze="all", discriminative=np.float32(0.3))) == "full,discriminative=0.3"
    assert Policy(unfreeze="all", l2sp=0.1, decay_norm_bias=np.True_).decay_norm_bias is True


@pytest.mark.parametrize("spec, fragment", [
    ("unfreez:last=2", "Unknown policy"),
    ("unfreeze", "needs one of last="),
    ("unfreeze:last=two", "last= needs a whole number >= 0, got 'two'"),
    ("gradual:every=-1", "every= needs a whole number >= 1, got '-1'"),
    ("lora:r=-2", "r= needs a whole number >= 1, got '-2'"),
    ("unfreeze:last=2,blocks=stem", "conflicts"),
    ("full,every=2", "only applies to gradual"),
    ("gradual:every=2,milestones=3", "not both"),
    ("gradual:every=0", ">= 1"),
    ("gradual:milestones=4+2", "strictly increasing"),
    ("full,bn=sometimes", "Unknown BatchNorm mode bn='sometimes'"),
    ("full,discriminative=3", "(0, 1]"),
    ("full,discriminative=0.1,layer_decay=0.9", "not both"),
    ("lora:r=0", ">= 1"),
    ("lora:r=2,alpha=inf", "lora_alpha must be a finite number > 0"),  # 0 x inf: the first step was NaN
    ("lora:r=2,targets=(", "regular expression"),
    ("full,colour=blue", "valid options"),
    ("full,passes=epochs", "passes=epochs sets the head's passes in a frozen phase"),  # as written, not passes=0
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
    for field, message in (("discriminative", r"number in \(0, 1\]"), ("layer_decay", r"number in \(0, 1\]"),
                           ("l2sp", "finite number"), ("lora_alpha", "finite number > 0")):  # True is no rate
        with pytest.raises(PolicyError, match=message):
            Policy(**{field: True}, **({"lora": 4} if field == "lora_alpha" else {"unfreeze": "all"}))


@given(start=st.integers(0, len(BLOCKS) - 1), every=st.one_of(st.none(), st.integers(1, 4)),
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


def test_frozen_phase_decides_feature_caching():
    assert (Policy.parse("feature_extraction").frozen_phase_epochs(BLOCKS, 10) >= 10)
    assert (Policy.parse("gradual:every=5").frozen_phase_epochs(BLOCKS, 5) >= 5)
    assert not (Policy.parse("gradual:every=5").frozen_phase_epochs(BLOCKS, 6) >= 6)
    affine = Policy.parse("feature_extraction,bn=affine")
    assert not (affine.frozen_phase_epochs(BLOCKS, 1, has_batchnorm=True) >= 1)  # gamma/beta train
    assert (affine.frozen_phase_epochs(BLOCKS, 1, has_batchnorm=False) >= 1)  # nothing to train: still frozen
    with pytest.raises(PolicyError, match="pass the Backbone"):
        (affine.frozen_phase_epochs(BLOCKS, 1) >= 1)  # names alone cannot say
    assert not (Policy.parse("lora:r=2").frozen_phase_epochs(BLOCKS, 1) >= 1)
    assert not (Policy.parse("unfreeze:last=1").frozen_phase_epochs(BLOCKS, 1) >= 1)


def test_affine_bn_counts_as_frozen_on_a_trunk_without_batchnorm():
    vit = get_backbone("timm:vit_tiny_patch16_224", weights=None, img_size=32, depth=2)
    cnn = get_backbone("tk:small_cnn", weights=None, widths=(8, 8, 16))
    affine = Policy.parse("feature_extraction,bn=affine")
    assert (affine.frozen_phase_epochs(vit, 3) >= 3)  # a ViT has LayerNorms only: the features can be cached
    assert not (affine.frozen_phase_epochs(cnn, 3) >= 3)  # BatchNorm gamma/beta train
    assert (Policy.parse("feature_extraction").frozen_phase_epochs(cnn, 3) >= 3)
    assert Policy.parse("fine_tune:frozen=2,bn=affine").frozen_phase_epochs(vit, 5) == 2
    assert Policy.parse("fine_tune:frozen=2,bn=affine").frozen_phase_epochs(cnn, 5) == 0
    with pytest.raises(PolicyError, match="contradicts"):
        (affine.frozen_phase_epochs(vit, 3, has_batchnorm=True) >= 3)


@pytest.mark.parametrize("spec, expected", [
    ("fine_tune", Policy(unfreeze="all", frozen_epochs=1, discriminative=0.01, head_passes=0)),
    ("fine_tune:frozen=2", Policy(unfreeze="all", frozen_epochs=2, discriminative=0.01, head_passes=0)),
    ("fine_tune:frozen=1,discriminative=0.1", Policy(unfreeze="all", frozen_epochs=1, discriminative=0.1,
                                                     head_passes=0)),
    ("fine_tune:frozen=1,layer_decay=0.75", Policy(unfreeze="all", frozen_epochs=1, layer_decay=0.75, head_passes=0)),
    ("fine_tune:frozen=0", Policy(unfreeze="all", discriminative=0.01)),
    ("fine_tune,bn=frozen,l2sp=0.1", Policy(unfreeze="all", frozen_epochs=1, discriminative=0.01, bn="frozen", l2sp=0.1,
                                            head_passes=0)),
    ("fine_tune:passes=1", Policy(unfreeze="all", frozen_epochs=1, discriminative=0.01)),
    ("unfreeze:last=2,frozen=1,passes=epochs", Policy(unfreeze=2, frozen_epochs=1, head_passes=0)),
    ("fine_tune:frozen=2,passes=3", Policy(unfreeze="all", frozen_epochs=2, discriminative=0.01, head_passes=3)),
    ("full,frozen=1,passes=5", Policy(unfreeze="all", frozen_epochs=1, head_passes=5)),
    ("full,frozen=2", Policy(unfreeze="all", frozen_epochs=2)),
    ("unfreeze:last=2,frozen=1", Policy(unfreeze=2, frozen_epochs=1)),
    ("unfreeze:from=layer3,frozen=3", Policy(unfreeze_from="layer3", frozen_epochs=3)),
])
def test_fine_tune_policy_strings_round_trip(spec, expected):
    p = Policy.parse(spec)
    assert p == expected
    assert Policy.parse(str(p)) == p


def test_fine_tune_freezes_everything_for_k_epochs_then_trains_all_blocks():
    p = Policy.parse("fine_tune:frozen=2")
    assert p.schedule(BLOCKS, 4) == [[], [], BLOCKS, BLOCKS]
    assert p.frozen_phase_epochs(BLOCKS, 4) == 2
    assert p.frozen_phase_epochs(BLOCKS, 1) == 1 and p.frozen_phase_epochs(BLOCKS, 2) == 2
    assert p.frozen_phase_epochs(BLOCKS, 3) == 2  # the backbone trains in epoch 3
    assert Policy.parse("full").frozen_phase_epochs(BLOCKS, 4) == 0
    assert Policy.parse("gradual:every=3").frozen_phase_epochs(BLOCKS, 10) == 3
    assert Policy.parse("feature_extraction").frozen_phase_epochs(BLOCKS, 4) == 4
    assert Policy.parse("lora:r=2").frozen_phase_epochs(BLOCKS, 4) == 0
    with pytest.raises(PolicyError, match="has 5"):
        Policy.parse("unfreeze:last=6,frozen=1").trainable_blocks(BLOCKS, 0)  # checked during the frozen epochs too


def test_fine_tune_is_no_longer_an_alias_of_full():
    assert Policy.parse("fine_tune") != Policy.parse("full")
    with pytest.warns(tk.TransferkitWarning, match="'finetune' is 'full'.*'fine_tune'") as caught:
        assert Policy.parse("finetune") == Policy.parse("full")
    assert issubclass(caught[0].category, FutureWarning)  # a TransferkitWarning, and a FutureWarning


@pytest.mark.parametrize("typo, meant", [("fine-tune", "fine_tune"), ("Fine_Tune", "fine_tune"),
                                         ("fintune", "fine_tune"), ("feature-extraction", "feature_extraction"),
                                         ("unfreez:last=2", "unfreeze"), ("gradul:every=2", "gradual")])
def test_policy_kinds_get_did_you_mean(typo, meant):
    with pytest.raises(PolicyError, match=f"Did you mean '{meant}'\\?"):
        Policy.parse(typo)


@pytest.mark.parametrize("spec, fragment", [
    ("feature_extraction,frozen=1", "only applies to"),
    ("gradual:every=2,frozen=1", "only applies to"),
    ("fine_tune:frozen=1,discriminative=0.1,layer_decay=0.5", "not both"),
    ("fine_tune:frozen=x", "frozen= needs a whole number >= 0"),
])
def test_bad_fine_tune_strings_say_what_is_wrong(spec, fragment):
    with pytest.raises(PolicyError, match=re.escape(fragment)):
        Policy.parse(spec)


@pytest.mark.parametrize("spec, fragment", [
    ("full,l2sp_beta=0.5", "this policy has no L2-SP (add l2sp=alpha"),
    ("feature_extraction,discriminative=0.1", "discriminative=0.1 sets the learning rate of each backbone block; "
                                              "this policy never trains the backbone"),
    ("feature_extraction,bn=frozen,layer_decay=0.5", "layer_decay=0.5 sets the learning rate"),
    ("gradual:every=2,max=0", "at max=0 no block would ever be added"),
    ("gradual:every=2,start=2,max=2", "above the starting blocks (2): at max=2"),
    ("unfreeze:blocks=layer4+layer4", "names ['layer4'] twice"),
    ("full,l2sp=inf", "must be a finite number >= 0, got inf"),
])
def test_options_that_would_do_nothing_are_refused(spec, fragment):
    with pytest.raises(PolicyError, match=re.escape(fragment)):
        Policy.parse(spec)
    # the same options where they act
    Policy.parse("full,l2sp=0.1,l2sp_beta=0.5"), Policy.parse("feature_extraction,bn=affine,discriminative=0.1")


@pytest.mark.parametrize("targets", ["fc{1,2}", "q,k", "(qkv|proj),?", r"a\(,b", "[,x]", "fc{1,}|q,k{2,3}", "q[(]k",
                                     "[],]", "[^],]x,y", "x}|fc{1,2}", "a{|b,c", r"[\]],y"])
def test_lora_target_patterns_with_commas_round_trip_through_the_string_form(targets):
    """A comma inside brackets belongs to its option; one outside them is written \\, ."""
    p = Policy(lora=4, lora_targets=targets, bn="frozen")
    assert Policy.parse(str(p)) == p and str(p).endswith(",bn=frozen")
    assert Policy.parse("lora:r=4,targets=fc{1,2},bn=frozen") == Policy(lora=4, lora_targets="fc{1,2}", bn="frozen")
    # a bracket inside a character class is no bracket: the options after it are read
    assert Policy.parse("lora:r=4,targets=q[(]k,bn=frozen") == Policy(lora=4, lora_targets="q[(]k", bn="frozen")
    with pytest.raises(PolicyError, match="Unknown or empty policy option '2'"):  # unclosed: split at every comma
        Policy.parse("lora:r=4,targets=x{1,2,bn=frozen")


@pytest.mark.parametrize("fields", [{"lora_targets": "qkv"}, {"lora_alpha": 8.0},
                                    {"lora_targets": "qkv", "lora_alpha": 8.0}])
def test_lora_options_without_lora_are_refused_as_objects_as_strings_are(fields):
    with pytest.raises(PolicyError, match="configures? LoRA's factors; this policy has no LoRA"):
        Policy(unfreeze=2, **fields)
    with pytest.raises(PolicyError, match="only applies to lora policies"):
        Policy.parse("unfreeze:last=2," + ",".join(f"{k[5:]}={v}" for k, v in fields.items()))
    p = Policy(unfreeze=2, lora=4, **fields)  # the same options where they act
    assert Policy.parse(str(p)) == p


@pytest.mark.parametrize("targets", ["", " qkv", "qkv ", "a\\\\,b"])
def test_a_lora_pattern_that_a_policy_string_cannot_hold_is_refused(targets):
    """str(policy) is what the record and resume read: an empty pattern wrote 'targets=' (refused
    by parse), spaces at its ends were dropped, and an escaped backslash before a comma read back
    as two options."""
    with pytest.raises(PolicyError, match="cannot be written in a policy string and read back.*'.\\*'.*\\[,\\]"):
        Policy(lora=4, lora_targets=targets)


@pytest.mark.parametrize("targets", ["fc{1,2}", "(q|k),v", "[,;]x", ".*", "blocks\\.1\\..*qkv", "a\\,b"])
def test_lora_patterns_with_commas_read_back_from_their_string(targets):
    p = Policy(lora=4, lora_targets=targets)
    assert Policy.parse(str(p)) == p


def test_a_gradual_start_with_every_block_unfrozen_is_refused_once_the_blocks_are_known():
    names = ["stem", "layer1", "layer2", "layer3"]
    policy = Policy.parse("gradual:every=1,start=4")  # on a deeper trunk it adds blocks
    assert policy.schedule(BLOCKS, 2) == [BLOCKS[1:], BLOCKS]
    with pytest.raises(PolicyError, match=r"this backbone has 4 blocks: .* so no block would ever be added\. Give "
                                          r"start=3 or less, or 'unfreeze:last=4'"):
        policy.schedule(names, 2)
    model, bb = small_model()
    with pytest.raises(PolicyError, match="has 4 blocks"):
        apply_policy(model, bb, Policy.parse("gradual:milestones=2,start=4"))
    assert Policy.parse("gradual:every=1,start=3").schedule(names, 2) == [names[1:], names]


def test_a_gradual_maximum_beyond_the_backbone_is_refused_as_last_is():
    names = ["stem", "layer1", "layer2"]
    with pytest.raises(PolicyError, match=r"unfreezes at most 20 blocks \(max=\) but this backbone has 3.*max=3 or "
                                          r"less"):
        Policy.parse("gradual:every=1,max=20").schedule(names, 4)
    assert Policy.parse("gradual:every=1,max=3").schedule(names, 4)[-1] == names


def test_bad_frozen_epochs_fields_are_rejected():
    with pytest.raises(PolicyError, match="never trains the backbone"):
        Policy(frozen_epochs=1)
    with pytest.raises(PolicyError, match="not with gradual"):
        Policy(every=2, frozen_epochs=1)
    with pytest.raises(PolicyError, match="integer >= 0"):
        Policy(unfreeze="all", frozen_epochs=-1)


def test_lr_multipliers_are_geometric_from_head_to_stem():
    disc = lr_multipliers(BLOCKS, Policy(unfreeze="all", discriminative=0.01))
    assert disc["head"] == 1.0 and disc["stem"] == pytest.approx(0.01)  # fastai slice(lr/100, lr)
    ratios = [disc[b] / disc[a] for a, b in zip(BLOCKS, BLOCKS[1:] + ["head"])]
    assert ratios == pytest.approx([0.01 ** -0.2] * 5)
    assert set(lr_multipliers(BLOCKS, Policy()).values()) == {1.0}
    with pytest.raises(PolicyError, match="lr_scales"):
        lr_multipliers(BLOCKS, Policy(unfreeze="all", layer_decay=0.5))  # layers, not blocks


def test_layer_decay_on_a_cnn_without_residual_units_is_per_block():
    model, bb = small_model()
    ld = lr_scales(model, bb, Policy(unfreeze="all", layer_decay=0.5))
    per_block = {bb.block_of(n[len("trunk."):]) if n.startswith("trunk.") else "head": v for n, v in ld.items()}
    assert [per_block[b] for b in bb.block_names + ["head"]] == pytest.approx([1 / 16, 1 / 8, 1 / 4, 1 / 2, 1])


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
    scales = lr_scales(model, bb, policy)
    for g in opt.param_groups:
        for p in g["params"]:
            name = by_id[id(p)]
            assert g["lr"] == pytest.approx(1e-3 * scales[name]) and g["lr_scale"] == scales[name], name
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


def test_head_only_groups_follow_the_policy():
    """The cached-features path trains the head alone: L2-SP means no weight decay there either."""
    model, _ = small_model()
    head = torch.nn.Sequential(torch.nn.LayerNorm(16), torch.nn.Linear(16, 3))
    plain = param_groups(head, lr=1e-2, weight_decay=0.1)
    assert {g["name"]: g["weight_decay"] for g in plain} == {"decay": 0.1, "no_decay": 0.0}
    sp = param_groups(head, lr=1e-2, weight_decay=0.1, policy=Policy.parse("feature_extraction,l2sp=0.1"))
    assert {g["name"]: g["weight_decay"] for g in sp} == {"head": 0.0, "head/no_decay": 0.0}
    decay_all = param_groups(head, lr=1e-2, weight_decay=0.1, policy=Policy.parse("feature_extraction,decay_norm_bias=true"))
    assert [(g["name"], g["weight_decay"], len(g["params"])) for g in decay_all] == [("head", 0.1, 4)]
    default = param_groups(head, lr=1e-2, weight_decay=0.1, policy=Policy())
    assert {g["name"]: (g["weight_decay"], g["lr"], g["lr_scale"]) for g in default} == {
        "head": (0.1, 1e-2, 1.0), "head/no_decay": (0.0, 1e-2, 1.0)}
    with pytest.raises(ConfigError, match="pass backbone"):
        param_groups(model, lr=1e-3, weight_decay=0.1, policy=Policy.parse("full"))  # a trunk trains here
    with pytest.raises(ConfigError, match="also needs policy"):
        param_groups(model, lr=1e-3, weight_decay=0.1, backbone=get_backbone("tk:small_cnn", weights=None))


def test_fine_tune_groups_hold_the_backbone_only_when_it_trains_in_the_run():
    model, bb = small_model()
    p = Policy.parse("fine_tune:frozen=1")
    assert [g["name"] for g in param_groups(model, lr=1e-3, weight_decay=0.0, backbone=bb, policy=p, epochs=1)] == \
        ["head", "head/no_decay"]
    groups = param_groups(model, lr=1e-3, weight_decay=0.0, backbone=bb, policy=p, epochs=2)
    lrs = {g["name"]: g["lr"] for g in groups}
    assert lrs["stem"] == pytest.approx(1e-5) and lrs["head"] == 1e-3  # fastai's slice(lr / 100, lr)
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


@pytest.mark.parametrize("policy", ["gradual:every=1", "fine_tune:frozen=1"])
def test_groups_of_a_policy_that_unfreezes_later_need_the_run_s_epochs(policy):
    """Groups built without ``epochs`` for a policy whose blocks unfreeze after the first epoch
    left those blocks out of the optimizer: a custom loop trained their statistics, never their
    weights, without a word."""
    model, bb = small_model()
    p = Policy.parse(policy)
    with pytest.raises(ConfigError, match=r"needs epochs= \(the run's number of epochs\): this policy unfreezes "
                                          r"blocks after the first epoch"):
        param_groups(model, lr=1e-3, weight_decay=0.0, backbone=bb, policy=p)
    assert "stage3" in {g["name"] for g in param_groups(model, lr=1e-3, weight_decay=0.0, backbone=bb, policy=p,
                                                        epochs=3)}
    fixed = Policy.parse("unfreeze:last=1")  # the same blocks every epoch: one is enough
    assert {g["name"] for g in param_groups(model, lr=1e-3, weight_decay=0.0, backbone=bb, policy=fixed)} == \
        {"stage3", "stage3/no_decay", "head", "head/no_decay"}


@given(unfreeze=st.sampled_from(["all", 2, ("layer3", "layer4")]), frozen=st.integers(0, 4),
       rate=st.one_of(st.none(), st.sampled_from([0.01, 0.1]), st.floats(0.01, 1.0)),
       kind=st.sampled_from(["discriminative", "layer_decay"]), bn=st.sampled_from(["train", "affine", "frozen"]))
@settings(max_examples=60, deadline=None)
def test_every_frozen_epochs_policy_round_trips_through_its_string(unfreeze, frozen, rate, kind, bn):
    p = Policy(unfreeze=unfreeze, frozen_epochs=frozen, bn=bn, **{kind: rate})
    assert Policy.parse(str(p)) == p
    sched = p.schedule(BLOCKS, 6)
    assert sched[:frozen] == [[]] * min(frozen, 6) and all(s for s in sched[frozen:])


@pytest.mark.parametrize("text", ["unfreeze:last=\u00b2", "gradual:every=\u00b2", "lora:r=\u00b2",
                                  "fine_tune:passes=\u00b2"])
def test_a_superscript_digit_in_a_policy_is_a_policy_error(text):
    """"2" written as a superscript passed str.isdigit() and then failed int() with a bare ValueError."""
    with pytest.raises(PolicyError):
        Policy.parse(text)


def test_a_bad_passes_option_says_what_it_takes():
    with pytest.raises(PolicyError, match=r"passes= needs a number of passes \(e.g. passes=5\) or passes=epochs"):
        Policy.parse("fine_tune:passes=many")
    with pytest.raises(PolicyError, match="passes=epochs"):
        Policy.parse("fine_tune:passes=0")


@pytest.mark.parametrize("epochs", [0, -1, 2.5, True, "3"])
def test_a_schedule_of_no_whole_epochs_is_refused(epochs):
    """A run of 0 or -1 epochs read as one, and 2.5 as 2, without a word."""
    p = Policy.parse("gradual:every=1")
    for read in (lambda: p.schedule(["a", "b"], epochs), lambda: p.lr_phases(epochs),
                 lambda: p.frozen_phase_epochs(["a", "b"], epochs)):
        with pytest.raises(PolicyError, match=r"whole number >= 1, got"):
            read()
    assert p.schedule(["a", "b"], 2) == [[], ["b"]] and p.lr_phases(3) == [(3, 1.0)]


def test_a_parameter_the_backbone_keeps_fixed_is_never_trained(image_folder):
    """A parameter that does not require gradients in the backbone as made (a fixed sin-cos table,
    a constant scale) was switched to trainable, and trained, once a policy unfroze its block."""
    from torch import nn

    from transferkit.backbones.custom import from_module

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
            self.stage = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
            self.scale = nn.Parameter(torch.full((8,), 0.5), requires_grad=False)

        def forward(self, x):
            return (self.stage(self.stem(x)) * self.scale.view(1, -1, 1, 1)).mean((2, 3))

    bb = from_module(Net(), blocks=[("stem", ["stem"]), ("stage", ["stage", "scale"])], input_spec={"image_size": 16})
    model = TransferModel(ImagePreprocess((0.5,) * 3, (0.5,) * 3), bb.trunk, build_head(8, 2))
    for policy in ("full", "unfreeze:last=1", "gradual:every=1"):
        for epoch in range(2):
            apply_policy(model, bb, Policy.parse(policy), epoch=epoch)
            assert not bb.trunk.scale.requires_grad, (policy, epoch)
        groups = param_groups(model, lr=1e-3, weight_decay=0.0, backbone=bb, policy=Policy.parse(policy), epochs=2)
        assert not any(p is bb.trunk.scale for g in groups for p in g["params"]), policy
    result = tk.finetune(bb, data=image_folder, policy="full", epochs=1, batch_size=4, device="cpu", num_workers=0,
                         verbose=False)
    assert torch.equal(result.model.trunk.scale, torch.full((8,), 0.5))
    assert "Parameters of blocks this run trains that did not require gradients when the backbone was made stay " \
        "as they are (1, e.g. 'scale')" in " ".join(result.decisions.notes)
