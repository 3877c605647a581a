"""Policies on real architectures: ResNet, ViT and ConvNeXt from torchvision and timm (random
weights, tiny configurations, 32 px inputs). Also holds the model builders the other
policy tests import."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch.nn.modules.batchnorm import _BatchNorm

from transferkit.backbones import Backbone, InputSpec, check_blocks, get_backbone
from transferkit.backbones._base import blocks_from_members
from transferkit.backbones.torchvision_source import strip_classifier, tv_blocks
from transferkit.heads import build_head
from transferkit.model import ImagePreprocess, TransferModel
from transferkit.policies import Policy, apply_policy, param_groups, set_train_mode, trainable_parameter_names

ARCHS = ["tv-resnet18", "tv-vit", "tv-convnext", "timm-resnet", "timm-vit", "timm-convnext"]


def tv_backbone(kind: str) -> Backbone:
    """A torchvision backbone with random weights: resnet18, or a tiny ViT / ConvNeXt built from
    torchvision's own classes and block map."""
    if kind == "resnet18":
        return get_backbone("tv:resnet18", weights=None)
    if kind == "resnet":  # ResNet-10: torchvision's ResNet class with one BasicBlock per stage
        trunk = torchvision.models.resnet.ResNet(torchvision.models.resnet.BasicBlock, [1, 1, 1, 1])
    elif kind == "vit":
        trunk = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=3, num_heads=2,
                                                     hidden_dim=32, mlp_dim=64)
    else:
        from torchvision.models.convnext import CNBlockConfig, ConvNeXt

        trunk = ConvNeXt([CNBlockConfig(16, 32, 1), CNBlockConfig(32, 64, 1), CNBlockConfig(64, None, 1)])
    _, width = strip_classifier(trunk)
    blocks = tv_blocks(trunk)
    check_blocks(trunk, blocks)
    return Backbone(name=f"tv:{kind}-tiny", trunk=trunk, num_features=width, blocks=blocks,
                    input_spec=InputSpec(image_size=32))


def timm_backbone(kind: str) -> Backbone:
    """A timm backbone (random weights) with blocks from timm's own ``group_matcher``."""
    timm = pytest.importorskip("timm")
    from timm.models import group_parameters

    name, kw = {"resnet": ("resnet10t", {}), "convnext": ("convnext_atto", {}),
                "vit": ("vit_tiny_patch16_224", {"img_size": 32, "patch_size": 8, "depth": 3})}[kind]
    trunk = timm.create_model(name, pretrained=False, num_classes=0, **kw)
    groups = group_parameters(trunk, trunk.group_matcher())
    blocks = blocks_from_members([(f"g{k}", list(v)) for k, v in sorted(groups.items())])
    check_blocks(trunk, blocks)
    return Backbone(name=f"timm:{name}", trunk=trunk, num_features=trunk.num_features, blocks=blocks,
                    input_spec=InputSpec(image_size=32))


def build(arch: str, num_classes: int = 3, seed: int = 0) -> tuple[TransferModel, Backbone]:
    torch.manual_seed(seed)
    source, kind = arch.split("-")
    bb = tv_backbone(kind) if source == "tv" else timm_backbone(kind)
    spec = bb.input_spec
    return TransferModel(ImagePreprocess(spec.mean, spec.std), bb.trunk, build_head(bb.num_features, num_classes)), bb


def batches(n: int, *, size: int = 32, batch: int = 4, classes: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, generator=g),
             torch.randint(0, classes, (batch,), generator=g)) for _ in range(n)]


def train_steps(model: TransferModel, bb: Backbone, policy: Policy, *, steps: int = 2, epoch: int = 0,
                lr: float = 1e-2) -> dict[str, bool]:
    """Apply ``policy`` at ``epoch`` and run ``steps`` AdamW steps (weight decay on); return
    ``{parameter name: had a gradient at every step}``."""
    apply_policy(model, bb, policy, epoch=epoch)
    set_train_mode(model, bb, policy, epoch=epoch)
    opt = torch.optim.AdamW(param_groups(model, lr=lr, weight_decay=0.1, backbone=bb, policy=policy,
                                         epochs=epoch + 1))
    had = {n: True for n, _ in model.named_parameters()}
    for x, y in batches(steps):
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        for n, p in model.named_parameters():
            had[n] &= p.grad is not None
        opt.step()
    return had


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def owned(bb: Backbone, block_names: list[str]) -> set[str]:
    """``trunk.<name>`` of every trunk parameter owned by the named blocks (computed from the
    Block records, independently of the policy code)."""
    blocks = [b for b in bb.blocks if b.name in block_names]
    return {f"trunk.{n}" for n, _ in bb.trunk.named_parameters() if any(b.owns(n) for b in blocks)}


def _policies(names: list[str]) -> list[tuple[str, list[str]]]:
    return [("feature_extraction", []), ("unfreeze:last=1", names[-1:]), (f"unfreeze:from={names[1]}", names[1:]),
            (f"unfreeze:blocks={names[0]}+{names[-1]}", [names[0], names[-1]]), ("full", names)]


@pytest.mark.parametrize("arch", ARCHS)
def test_policies_freeze_exactly_the_named_blocks(arch):
    model, bb = build(arch)
    head = {n for n, _ in model.named_parameters() if n.startswith("head.")}
    for spec, blocks in _policies(bb.block_names):
        policy = Policy.parse(spec)
        apply_policy(model, bb, policy)
        assert trainable_parameter_names(model) == owned(bb, blocks) | head, (arch, spec)
        # frozen blocks run in eval mode, trainable ones in train mode
        set_train_mode(model, bb, policy)
        checked = 0
        for n, m in model.trunk.named_modules():
            owners = {b.name for pn, _ in m.named_parameters(prefix=n) for b in bb.blocks if b.owns(pn)}
            if len(owners) == 1:  # a module within one block runs in train mode iff that block trains
                assert m.training == (owners.pop() in blocks), (arch, spec, n)
                checked += 1
        assert checked >= len(bb.blocks)


@pytest.mark.parametrize("arch", ["tv-resnet"] + ARCHS[1:])
def test_frozen_parameters_get_no_gradient_and_stay_bit_for_bit_equal(arch):
    model, bb = build(arch)
    before = snapshot(model)
    policy = Policy.parse("unfreeze:last=1")
    had_grad = train_steps(model, bb, policy, steps=2)
    after = model.state_dict()
    trainable = trainable_parameter_names(model)
    frozen_params = {n for n, _ in model.named_parameters()} - trainable
    assert frozen_params and trainable
    for n in frozen_params:
        assert not had_grad[n], n
        assert torch.equal(before[n], after[n]), f"frozen {n} changed"
    for n in trainable:
        assert had_grad[n], n
    assert not torch.equal(before["head.0.weight"], after["head.0.weight"])
    # BatchNorm statistics of frozen blocks do not move either
    last = bb.blocks[-1]
    for n, m in model.trunk.named_modules():
        if isinstance(m, _BatchNorm) and not last.owns(f"{n}.weight"):
            for buf in ("running_mean", "running_var", "num_batches_tracked"):
                assert torch.equal(before[f"trunk.{n}.{buf}"], after[f"trunk.{n}.{buf}"]), n


@pytest.mark.parametrize("arch", ["tv-vit", "timm-vit"])
def test_vit_token_and_position_embeddings_get_no_weight_decay(arch):
    model, bb = build(arch)
    groups = param_groups(model, lr=1e-3, weight_decay=0.1, backbone=bb, policy=Policy.parse("full"))
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    assert not any(("token" in n or "pos_emb" in n or "norm" in n or "ln" in n.split(".")[-2]) for n in decayed), decayed
    assert all(p.ndim >= 2 for g in groups if g["weight_decay"] > 0 for p in g["params"])
    assert any("qkv" in n or "in_proj" in n for n in decayed)


@pytest.mark.parametrize("mode", ["train", "affine", "frozen"])
def test_batchnorm_modes_on_resnet(mode):
    model, bb = build("tv-resnet")
    before = snapshot(model)
    policy = Policy.parse(f"unfreeze:last=1,bn={mode}")
    train_steps(model, bb, policy, steps=2)
    after = model.state_dict()
    layer4 = next(b for b in bb.blocks if b.name == "layer4")
    bns = [(n, m) for n, m in model.trunk.named_modules() if isinstance(m, _BatchNorm)]
    for n, m in bns:
        stats_moved = not torch.equal(before[f"trunk.{n}.running_mean"], after[f"trunk.{n}.running_mean"])
        affine_moved = not torch.equal(before[f"trunk.{n}.weight"], after[f"trunk.{n}.weight"])
        in_last = layer4.owns(n)
        assert stats_moved == (mode == "train" and in_last), (mode, n)
        assert affine_moved == (mode == "affine" or (mode == "train" and in_last)), (mode, n)
        assert m.weight.requires_grad == affine_moved
        assert m.training == (mode == "train" and in_last)
    # convolutions follow the blocks whatever the BN mode
    assert not torch.equal(before["trunk.layer4.0.conv1.weight"], after["trunk.layer4.0.conv1.weight"])
    assert torch.equal(before["trunk.layer1.0.conv1.weight"], after["trunk.layer1.0.conv1.weight"])


@pytest.mark.parametrize("blocks, said", [
    ((("a", ("0", "1")), ("b", ("3", "4")), ("c", ())), r"block \['c'\] hold no parameter"),
    ((("a", ("0", "1")), ("b", ("3", "4")), ("c", ("7",))), r"block \['c'\] hold no parameter"),
    ((("a", ("0", "1", "3")), ("b", ("3", "4"))), r"in several blocks: \[\"3.weight -> \['a', 'b'\]\""),
    ((("a", ("0", "1")), ("b", ("3", "4")), ("a", ("3",))), r"duplicate block names"),
])
def test_a_backbone_built_by_hand_has_its_blocks_checked_before_a_policy_counts_them(tmp_path, blocks, said):
    """A Backbone object built by hand had its block map taken as it was: unfreeze:last=1 on a
    block without parameters trained no trunk weight, and a module in two blocks stayed frozen
    in the one a policy trains, while the plan said otherwise."""
    import transferkit as tk
    from conftest import make_image_folder
    from transferkit.backbones import Block

    trunk = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                                torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                                torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    bb = Backbone(name="c", trunk=trunk, num_features=8, input_spec=InputSpec(image_size=16),
                  blocks=tuple(Block(n, m) for n, m in blocks))
    with pytest.raises(tk.BackboneError, match=r"Backbone 'c': .*" + said):
        tk.plan(bb, data=make_image_folder(tmp_path / "img", per_class=2), policy="unfreeze:last=1")
