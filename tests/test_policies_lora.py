"""LoRA: which layers get factors, what trains, and the merged export."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_policies_models import build, snapshot, train_steps

from transferkit.errors import PolicyError
from transferkit.export.torchscript import export_torchscript
from transferkit.lora import add_lora, has_lora, merge_lora
from transferkit.policies import Policy, apply_policy, trainable_parameter_names


def _lora_names(model):
    return {n for n, _ in model.named_parameters() if n.endswith((".lora_A", ".lora_B"))}


def _adapted(model):
    """The adapted layers: ``<linear>`` or ``<attention>.in_proj`` for each pair of factors."""
    out = set()
    for n in _lora_names(model):
        owner, _, rest = n.partition(".parametrizations.")
        out.add(owner + (".in_proj" if rest.startswith("in_proj_weight.") else ""))
    return out


@pytest.mark.parametrize("arch, per_layer", [("tv-vit", {"in_proj", "out_proj", "mlp.0", "mlp.3"}),
                                             ("timm-vit", {"qkv", "proj", "fc1", "fc2"})])
def test_lora_trains_only_factors_and_head_and_merges_exactly(arch, per_layer, tmp_path):
    model, bb = build(arch)
    keys_before_lora = set(model.state_dict())
    before = snapshot(model)
    policy = Policy.parse("lora:r=4,alpha=8")
    had_grad = train_steps(model, bb, policy, steps=3, lr=3e-2)
    lora = _lora_names(model)
    head = {n for n, _ in model.named_parameters() if n.startswith("head.")}
    assert trainable_parameter_names(model) == lora | head
    # every attention and MLP projection of every transformer layer got factors
    adapted = _adapted(model)
    assert len(adapted) == 3 * 4  # 3 layers x 4 projections
    for suffix in per_layer:
        assert sum(a.endswith(suffix) for a in adapted) == 3, (suffix, sorted(adapted))
    after = model.state_dict()
    for n, p in model.named_parameters():
        if n in lora or n in head:
            assert had_grad[n], n
        else:
            assert not had_grad[n] and torch.equal(p, before[n.replace(".parametrizations.", ".")
                                                                .replace("weight.original", "weight")
                                                                .replace("in_proj_weight.original", "in_proj_weight")])
    assert any(not torch.equal(after[n], torch.zeros_like(after[n])) for n in lora if n.endswith("lora_B"))

    merged = merge_lora(model)
    assert has_lora(model) and not has_lora(merged)
    assert set(merged.state_dict()) == keys_before_lora  # same layout as the model before LoRA
    x = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8)
    model.eval()
    merged.eval()
    with torch.no_grad():
        ref, out = model(x), merged(x)
        assert (ref - out).abs().max().item() <= 1e-5
        # the merged weights really differ from the pretrained ones
        assert any(not torch.equal(merged.state_dict()[k], before[k]) for k in keys_before_lora if "trunk" in k)
    report = export_torchscript(merged, tmp_path / "lora.pt", metadata={"labels": ["a", "b", "c"],
                                                                        "input_spec": {}}, example_inputs=x)
    assert report.mode == "script"
    scripted = torch.jit.load(str(tmp_path / "lora.pt"))
    with torch.no_grad():
        assert (scripted(x) - ref).abs().max().item() <= 1e-5


def test_lora_with_an_unfrozen_block_and_pattern():
    model, bb = build("timm-vit")
    policy = Policy.parse(f"lora:r=2,targets=qkv,blocks={bb.block_names[-1]}")
    apply_policy(model, bb, policy)
    adapted = _adapted(model)
    assert adapted and all(a.endswith("attn.qkv") for a in adapted)
    last = bb.blocks[-1]
    trunk_trainable = {n for n in trainable_parameter_names(model) if n.startswith("trunk.")}
    # the unfrozen block trains whole (its qkv base weight too), elsewhere only the factors
    in_last = {f"trunk.{n}" for n, _ in bb.trunk.named_parameters()
               if last.owns(n.replace(".parametrizations.weight.original", ".weight"))
               and not n.endswith(("lora_A", "lora_B"))}
    assert "trunk.blocks.2.attn.qkv.parametrizations.weight.original" in in_last
    assert trunk_trainable == _lora_names(model) | in_last
    apply_policy(model, bb, policy, epoch=1)  # idempotent: factors are added once
    assert _adapted(model) == adapted


def test_lora_leaves_the_batchnorm_statistics_of_the_blocks_it_adapts_as_they_were():
    # LeViT's attention and MLP linears carry BatchNorm1d: LoRA factors train there, the base does not
    timm = pytest.importorskip("timm")
    from timm.models import group_parameters
    from transferkit.backbones import Backbone, InputSpec, check_blocks
    from transferkit.backbones._base import blocks_from_members
    from transferkit.heads import build_head
    from transferkit.model import ImagePreprocess, TransferModel
    from transferkit.policies import set_train_mode

    torch.manual_seed(0)
    trunk = timm.create_model("levit_128s", pretrained=False, num_classes=0, img_size=64)
    blocks = blocks_from_members([(f"g{k}", list(v))
                                  for k, v in sorted(group_parameters(trunk, trunk.group_matcher()).items())])
    check_blocks(trunk, blocks)
    bb = Backbone(name="timm:levit_128s", trunk=trunk, num_features=trunk.num_features, blocks=blocks,
                  input_spec=InputSpec(image_size=64))
    model = TransferModel(ImagePreprocess((0.5,) * 3, (0.5,) * 3), trunk, build_head(trunk.num_features, 3))
    statistics = lambda: {n: b.clone() for n, b in model.trunk.named_buffers() if "running_" in n}  # noqa: E731
    last = bb.block_names[-1]
    for spec, moved in (("lora:r=2", set()), (f"lora:r=2,blocks={last}", {last})):
        before = statistics()
        policy = Policy.parse(spec)
        apply_policy(model, bb, policy)
        set_train_mode(model, bb, policy)
        assert _lora_names(model)
        x = torch.randint(0, 256, (4, 3, 64, 64), dtype=torch.uint8)
        F.cross_entropy(model(x), torch.tensor([0, 1, 2, 0])).backward()
        changed = {n for n, b in statistics().items() if not torch.equal(b, before[n])}
        owners = {b.name for n in changed for b in bb.blocks if b.owns(n.replace(".running_mean", ".weight")
                                                                      .replace(".running_var", ".weight"))}
        assert owners == moved, (spec, sorted(changed)[:5])


def test_lora_errors_are_clear():
    model, bb = build("tv-resnet")
    with pytest.raises(PolicyError, match="no linear layer matches"):
        apply_policy(model, bb, Policy.parse("lora:r=2"))
    vit, _ = build("tv-vit")
    add_lora(vit.trunk, rank=2)
    with pytest.raises(PolicyError, match="already has LoRA"):
        add_lora(vit.trunk, rank=2)


def test_finetune_with_lora_exports_the_merged_model(image_folder, tmp_path):
    from transferkit import finetune

    model, bb = build("tv-vit")
    result = finetune(bb, data=image_folder, policy="lora:r=2", epochs=1, batch_size=8, image_size=32,
                      export=tmp_path / "m.pt", verbose=False, num_workers=0)
    assert has_lora(result.model) and result.export_report.mode == "script"
    assert "  policy:   lora:r=2; head + rank-2 LoRA factors only for 1 epoch\n" in result.decisions.summary()
    scripted = torch.jit.load(str(result.export_path))
    x = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    result.model.cpu().eval()
    with torch.no_grad():
        assert (scripted(x) - result.model(x)).abs().max().item() <= 1e-5


def test_param_groups_refuse_a_lora_policy_before_apply_policy_added_the_factors():
    from transferkit.policies import param_groups

    model, bb = build("timm-vit")
    policy = Policy.parse("lora:r=4")
    with pytest.raises(PolicyError, match=r"call apply_policy\(model, backbone, policy\) first"):
        param_groups(model, lr=1e-3, weight_decay=1e-4, backbone=bb, policy=policy)
    apply_policy(model, bb, policy)  # the documented order: the factors first, then the groups
    grouped = {id(p) for g in param_groups(model, lr=1e-3, weight_decay=1e-4, backbone=bb, policy=policy)
               for p in g["params"]}
    assert {id(p) for n, p in model.named_parameters() if n.endswith((".lora_A", ".lora_B"))} <= grouped


def test_the_plan_says_lora_leaves_the_batchnorm_statistics_as_they_were(image_folder):
    from transferkit import get_backbone, plan

    bb = get_backbone("timm:levit_128s", weights=None, img_size=64)  # BatchNorm1d on its attention/MLP linears
    kw = dict(data=image_folder, epochs=1, image_size=64, verbose=False, num_workers=0)
    alone, with_block = plan(bb, policy="lora:r=2", **kw), plan(bb, policy="lora:r=2,last=1", **kw)
    assert alone.bn_updates == ((),)  # no statistic moves (see the BatchNorm test above) ...
    assert "  batchnorm: eval statistics in every block (LoRA factors leave the statistics of the blocks they adapt " \
           "as they were)\n" in alone.summary()  # ... and the plan says so
    assert with_block.bn_updates == ((bb.block_names[-1],),)
    assert "  batchnorm: statistics update in the unfrozen blocks, eval elsewhere (LoRA" in with_block.summary()


@pytest.mark.parametrize("mode", ["auto", "trace"])
def test_export_torchscript_takes_a_model_that_still_holds_its_lora_factors(tmp_path, mode):
    """result.model keeps its factors; exporting it directly failed with torch's 'Parametrization
    is not working with scripting' (and tracing failed too). The export folds them in a copy."""
    model, bb = build("timm-vit")
    apply_policy(model, bb, Policy.parse("lora:r=2"))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith(".lora_B"):
                p.normal_(0, 0.05)  # trained factors: the merge changes what the layers compute
    x = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    report = export_torchscript(model, tmp_path / "m.pt", example_inputs=x, mode=mode,
                                metadata={"labels": ["a", "b", "c"], "input_spec": bb.input_spec.to_dict()})
    assert report.mode == ("script" if mode == "auto" else "trace") and has_lora(model)  # the model keeps them
    with torch.no_grad():
        assert (torch.jit.load(str(tmp_path / "m.pt"))(x) - model.eval()(x)).abs().max().item() <= 1e-5


def test_a_second_lora_policy_on_one_model_is_refused_and_the_same_one_again_is_taken():
    """apply_policy with another LoRA policy kept the first one's factors (rank 4 on qkv) and
    added none of its own, without a word."""
    model, bb = build("timm-vit")
    first = Policy.parse("lora:r=4,targets=qkv")
    apply_policy(model, bb, first)
    before = _lora_names(model)
    apply_policy(model, bb, first, epoch=1)  # the run applies its policy every epoch
    assert _lora_names(model) == before
    for other in ("lora:r=8,alpha=32,targets=fc1", "lora:r=8,targets=qkv", "lora:r=4,alpha=8,targets=qkv",
                  "lora:r=4,targets=qkv|fc1"):
        with pytest.raises(PolicyError, match=r"already holds LoRA factors \(rank 4 on \d+ layers: .*qkv.*not the "
                                              r"policy's"):
            apply_policy(model, bb, Policy.parse(other))
    assert _lora_names(model) == before


def test_a_rank_that_saves_nothing_is_warned_of_and_a_low_one_is_not():
    import warnings

    import transferkit as tk

    wide = torch.nn.Sequential(torch.nn.Linear(192, 768), torch.nn.Linear(768, 768))
    with pytest.warns(tk.TransferkitWarning, match=r"LoRA rank 154: on 1 of the 2 adapted weights .* 768x192: "
                                                   r"147,840 vs 147,456\), so LoRA saves nothing there\. Its rank"):
        add_lora(wide, rank=154, targets=".*")  # 154 * (192 + 768) >= 192 * 768; not full rank (154 < 192)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        add_lora(torch.nn.Sequential(torch.nn.Linear(192, 768)), rank=153, targets=".*")
    with pytest.warns(tk.TransferkitWarning, match="saves nothing there, and its update can be of full rank"):
        add_lora(torch.nn.Sequential(torch.nn.Linear(192, 768)), rank=500, targets=".*")
