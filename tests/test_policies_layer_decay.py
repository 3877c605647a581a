"""``layer_decay`` is timm's: the lr_scale of every parameter equals
``timm.optim.param_groups_layer_decay``'s on the same architecture."""

from __future__ import annotations

import pytest
import timm
import torch
import torchvision
from timm.optim import param_groups_layer_decay

from transferkit.backbones import Backbone, Block, InputSpec, get_backbone
from transferkit.heads import build_head
from transferkit.model import ImagePreprocess, TransferModel
from transferkit.policies import Policy, apply_policy, layer_ids, lr_scales, param_groups

DECAY = 0.75


def timm_lr_scales(model: torch.nn.Module) -> dict[str, float]:
    """timm's own answer: ``{parameter name: lr_scale}`` of ``param_groups_layer_decay``."""
    by_id = {id(p): n for n, p in model.named_parameters()}
    return {by_id[id(p)]: g["lr_scale"] for g in param_groups_layer_decay(model, layer_decay=DECAY)
            for p in g["params"]}


def transfer_model(bb: Backbone, classes: int = 3) -> TransferModel:
    return TransferModel(ImagePreprocess((0.5,) * 3, (0.5,) * 3), bb.trunk, build_head(bb.num_features, classes))


def compare(bb: Backbone, reference: torch.nn.Module, head: tuple[str, ...]) -> dict[str, float]:
    """transferkit's scale of every parameter == timm's on ``reference`` (same trunk names;
    ``head`` names the reference's classifier parameters, transferkit's head is ``head.*``)."""
    model = transfer_model(bb)
    ours = lr_scales(model, bb, Policy(unfreeze="all", layer_decay=DECAY))
    ref = timm_lr_scales(reference)
    trunk = {n[len("trunk."):]: v for n, v in ours.items() if n.startswith("trunk.")}
    assert set(trunk) | set(head) == set(ref)
    wrong = {n: (v, ref[n]) for n, v in trunk.items() if v != pytest.approx(ref[n], rel=1e-12)}
    assert not wrong, f"{len(wrong)} parameters differ from timm, e.g. {list(wrong.items())[:3]}"
    head_scales = {v for n, v in ours.items() if n.startswith("head.")}
    assert head_scales == {ref[n] for n in head} == {1.0}
    return trunk


def test_timm_vit_tiny_layer_decay_equals_timms():
    bb = get_backbone("timm:vit_tiny_patch16_224", weights=None)
    trunk = compare(bb, timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=3),
                    ("head.weight", "head.bias"))
    assert trunk["blocks.11.mlp.fc1.weight"] == pytest.approx(0.75)  # a reported case (0.5625 before the fix)
    assert trunk["norm.weight"] == pytest.approx(0.75)  # the final norm shares the last block's layer
    assert trunk["blocks.0.attn.qkv.weight"] == pytest.approx(0.75 ** 12)
    assert trunk["cls_token"] == trunk["patch_embed.proj.weight"] == pytest.approx(0.75 ** 13)


def test_timm_resnet_layer_decay_is_per_residual_block_as_timms():
    bb = get_backbone("timm:resnet18", weights=None)
    trunk = compare(bb, timm.create_model("resnet18", pretrained=False, num_classes=3), ("fc.weight", "fc.bias"))
    assert trunk["layer4.1.conv1.weight"] == pytest.approx(0.75)
    assert trunk["layer4.0.conv1.weight"] == pytest.approx(0.75 ** 2)  # per block, not per stage
    assert trunk["conv1.weight"] == pytest.approx(0.75 ** 9)


def test_torchvision_resnet_layer_decay_equals_timms_on_the_same_architecture():
    # torchvision's and timm's ResNet-18 have the same parameter names
    bb = get_backbone("tv:resnet18", weights=None)
    compare(bb, timm.create_model("resnet18", pretrained=False, num_classes=3), ("fc.weight", "fc.bias"))


def test_timm_efficientnet_layer_decay_equals_timms():
    # the recommended pretrained backbone: timm groups its conv_head with the last stage's
    # last block and numbers the stages' blocks one by one, which blocks alone cannot say
    bb = get_backbone("timm:tf_efficientnet_lite0", weights=None)
    trunk = compare(bb, timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=3),
                    ("classifier.weight", "classifier.bias"))
    assert trunk["conv_head.weight"] == trunk["blocks.6.0.conv_pw.weight"] == pytest.approx(0.75)


def test_torchvision_vit_layers_follow_timms_rules():
    vit = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=3, num_heads=2,
                                               hidden_dim=16, mlp_dim=32)
    vit.heads = torch.nn.Identity()
    blocks = (Block("embed", ("conv_proj", "class_token", "encoder.pos_embedding")),
              *(Block(f"blocks.{i}", (f"encoder.layers.encoder_layer_{i}",)) for i in range(3)),
              Block("norm", ("encoder.ln",)))
    bb = Backbone(name="tiny-vit", trunk=vit, num_features=16, blocks=blocks, input_spec=InputSpec(image_size=32))
    ids, head = layer_ids(transfer_model(bb), bb)
    assert head == 4
    assert ids["class_token"] == ids["conv_proj.weight"] == 0
    assert [ids[f"encoder.layers.encoder_layer_{i}.mlp.0.weight"] for i in range(3)] == [1, 2, 3]
    assert ids["encoder.ln.weight"] == 3  # as timm's ViT: the final norm is in the last block's layer


def test_layer_decay_groups_split_a_stage_into_its_residual_blocks():
    bb = get_backbone("timm:resnet18", weights=None)
    model = transfer_model(bb)
    policy = Policy(unfreeze="all", layer_decay=DECAY)
    groups = param_groups(model, lr=1e-3, weight_decay=0.05, backbone=bb, policy=policy)
    names = [g["name"] for g in groups if not g["name"].endswith("/no_decay")]
    assert names == ["stem", "layer1.0", "layer1.1", "layer2.0", "layer2.1", "layer3.0", "layer3.1",
                     "layer4.0", "layer4.1", "head"]
    scales = lr_scales(model, bb, policy)
    by_id = {id(p): n for n, p in model.named_parameters()}
    held = [by_id[id(p)] for g in groups for p in g["params"]]
    assert sorted(held) == sorted(scales) and len(held) == len(set(held))
    for g in groups:
        assert g["lr"] == pytest.approx(1e-3 * g["lr_scale"])
        assert {scales[by_id[id(p)]] for p in g["params"]} == {g["lr_scale"]}


def test_layer_decay_with_lora_numbers_the_factors_with_their_weight():
    bb = get_backbone("timm:vit_tiny_patch16_224", weights=None, img_size=32, depth=2)
    model = transfer_model(bb)
    policy = Policy.parse("lora:r=2,layer_decay=0.5")
    apply_policy(model, bb, policy)
    ids, head = layer_ids(model, bb)
    factors = [n for n in ids if "lora" in n and n.startswith("blocks.1.")]
    assert factors and {ids[n] for n in factors} == {2} and head == 3
    groups = param_groups(model, lr=1e-3, weight_decay=0.0, backbone=bb, policy=policy)
    assert {g["name"]: g["lr_scale"] for g in groups}["blocks.1"] == pytest.approx(0.5)


class _Unit(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = torch.nn.Conv2d(4, 4, 3), torch.nn.BatchNorm2d(4)


def test_a_stage_with_its_downsampling_counts_one_layer_per_unit():
    """As timm groups ConvNeXt/Swin stages: the downsampling joins the stage's first block."""
    trunk = torch.nn.Module()
    trunk.stem = torch.nn.Conv2d(3, 4, 3)
    trunk.down = torch.nn.Sequential(torch.nn.GroupNorm(1, 4), torch.nn.Conv2d(4, 4, 2, stride=2))
    trunk.stage = torch.nn.Sequential(_Unit(), _Unit(), torch.nn.ReLU())
    trunk.flat = torch.nn.Sequential(torch.nn.Conv2d(4, 4, 1), torch.nn.BatchNorm2d(4))  # single layers: one layer
    trunk.norm = torch.nn.LayerNorm(4)
    blocks = (Block("stem", ("stem",)), Block("stage1", ("down", "stage")), Block("stage2", ("flat",)),
              Block("norm", ("norm",)))
    bb = Backbone(name="toy", trunk=trunk, num_features=4, blocks=blocks, input_spec=InputSpec(image_size=8))
    ids, head = layer_ids(transfer_model(bb), bb)
    assert {n: ids[n] for n in ("stem.weight", "down.1.weight", "stage.0.conv.weight", "stage.1.bn.weight",
                                "flat.0.weight", "flat.1.weight", "norm.weight")} == {
        "stem.weight": 0, "down.1.weight": 1, "stage.0.conv.weight": 1, "stage.1.bn.weight": 2,
        "flat.0.weight": 3, "flat.1.weight": 3, "norm.weight": 3}
    assert head == 4


def test_a_trunk_block_of_timms_head_module_is_not_merged_with_the_new_head():
    """timm's MetaFormers (PoolFormer, CAFormer, MambaOut ...) keep a final norm in a module named
    ``head``: its block was named ``head`` too, so layer_decay failed ("different lr multipliers
    ... a bug in transferkit's grouping"), discriminative rates gave it the head's 1.0, and the
    plan folded it into the new head's group."""
    from transferkit.policies import lr_multipliers

    bb = get_backbone("timm:poolformerv2_s12", weights=None)
    assert bb.block_names[-1] == "trunk.head"
    scales = lr_scales(transfer_model(bb), bb, Policy(unfreeze="all", layer_decay=DECAY))  # (no group_matcher:
    trunk = [v for n, v in scales.items() if n.startswith("trunk.")]  # numbered by blocks and residual units)
    assert scales["trunk.head.norm.weight"] == max(trunk) == pytest.approx(DECAY) and scales["head.0.weight"] == 1
    mult = lr_multipliers(bb.block_names, Policy(unfreeze="all", discriminative=0.5))
    assert mult["trunk.head"] == pytest.approx(0.5 ** (1 / 6)) and mult["head"] == 1.0
    groups = {g["name"] for g in param_groups(transfer_model(bb), backbone=bb, lr=1e-3, weight_decay=1e-4,
                                              policy=Policy(unfreeze="all", layer_decay=DECAY))}
    assert {"trunk.head/no_decay", "head", "head/no_decay"} <= groups


def test_a_block_named_as_the_new_head_is_refused(tmp_path):
    from conftest import make_image_folder

    import transferkit as tk
    from transferkit.backbones.custom import from_module
    from transferkit.errors import BackboneError

    net = torch.nn.Sequential()
    net.add_module("body", torch.nn.Conv2d(3, 4, 3))
    net.add_module("head", torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                               torch.nn.Linear(4, 4)))
    assert from_module(net, input_spec={"image_size": 16}).block_names == ["body", "trunk.head"]  # named here
    assert from_module(net, input_spec={"image_size": 16}, blocks=["body", "head"]).block_names == ["body",
                                                                                                   "trunk.head"]
    with pytest.raises(BackboneError, match="a block is named 'head', the name of the new head in parameter groups"):
        from_module(net, input_spec={"image_size": 16}, blocks={"body": ["body"], "head": ["head"]})
    torch.manual_seed(0)  # a TorchScript trunk with blocks to train: refused, with the way to use it frozen
    scripted = Backbone(name="ts", trunk=torch.jit.script(net), num_features=4, input_spec=InputSpec(image_size=16),
                        blocks=(Block("body", ("body",)), Block("trunk.head", ("head",))))
    with pytest.raises(BackboneError, match=r"a TorchScript trunk cannot train.*from_torchscript"):
        tk.plan(scripted, data=str(make_image_folder(tmp_path / "d", per_class=3, size=16)), policy="full")
