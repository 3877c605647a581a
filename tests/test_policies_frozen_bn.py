"""Frozen stays frozen in the user's hands: the BatchNorm layers a policy freezes keep their
statistics and parameters when a user's own loop calls ``model.train()`` on ``result.model``,
and the swap changes neither the state-dict keys nor the export."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from torch import nn
from timm.layers import BatchNormAct2d
from torch.nn.modules.batchnorm import _BatchNorm

import transferkit as tk
from transferkit.backbones import get_backbone
from transferkit.export import export_torchscript, load_scripted
from transferkit.heads import build_head
from transferkit.model import ImagePreprocess, TransferModel
from transferkit.policies import Policy, apply_policy, set_train_mode
from transferkit.policies.frozen_bn import (
    FrozenBatchNorm2d,
    eval_fingerprint,
    freeze_batchnorm,
    is_frozen_batchnorm,
    thaw_batchnorm,
)

KW = dict(image_size=16, batch_size=8, device="cpu", precision="fp32", num_workers=0, verbose=False,
          restore_best=False)


def _user_loop(model: nn.Module, params, steps: int = 3) -> None:
    """What a user does with result.model: train mode, forward, loss, an optimizer step."""
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.SGD(params, lr=0.5, momentum=0.9, weight_decay=0.1)
    model.train()
    for _ in range(steps):
        x = torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8, generator=g)
        loss = nn.functional.cross_entropy(model(x), torch.randint(0, 2, (8,), generator=g))
        opt.zero_grad()
        loss.backward()
        opt.step()


def _trunk_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.trunk.state_dict().items()}


def test_a_feature_extraction_result_keeps_its_trunk_under_a_user_loop(image_folder):
    result = tk.finetune("tk:small_cnn", weights=None, data=image_folder, policy="feature_extraction", epochs=1, **KW)
    model = result.model
    bns = [m for m in model.trunk.modules() if isinstance(m, _BatchNorm)]
    assert bns and all(is_frozen_batchnorm(m) for m in bns)
    before, head = _trunk_state(model), {k: v.clone() for k, v in model.head.state_dict().items()}
    _user_loop(model, model.parameters())  # even an optimizer over every parameter
    assert model.training and all(not m.training for m in bns)
    after = model.trunk.state_dict()
    assert after.keys() == before.keys() and any(k.endswith("running_mean") for k in after)
    for k, v in after.items():
        assert torch.equal(v, before[k]), f"trunk {k} changed"
    assert any(not torch.equal(v, head[k]) for k, v in model.head.state_dict().items())  # the head did train


def test_the_frozen_blocks_of_unfreeze_last_1_stay_frozen_and_the_last_block_trains(image_folder):
    result = tk.finetune("tk:small_cnn", weights=None, data=image_folder, policy="unfreeze:last=1", epochs=1, **KW)
    model, bb = result.model, result.backbone
    last = bb.blocks[-1]
    before = _trunk_state(model)
    _user_loop(model, [p for p in model.parameters() if p.requires_grad])
    after = model.trunk.state_dict()
    moved = {k for k, v in after.items() if not torch.equal(v, before[k])}
    assert moved and all(last.owns(k.rsplit(".", 1)[0] + ".weight") for k in moved), sorted(moved)
    assert any(k.endswith("running_mean") for k in moved)  # the trained block's statistics follow the data
    frozen = [n for n, m in model.trunk.named_modules() if is_frozen_batchnorm(m)]
    assert frozen and not any(last.owns(f"{n}.weight") for n in frozen)


def test_the_export_is_unchanged_by_the_swap(image_folder, tmp_path):
    result = tk.finetune("tk:small_cnn", weights=None, data=image_folder, policy="feature_extraction", epochs=1, **KW)
    model = result.model.eval()
    x = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    meta = {"labels": result.classes, "input_spec": result.backbone.input_spec.replace(image_size=16).to_dict()}
    report = export_torchscript(model, tmp_path / "frozen.pt", metadata=meta, example_inputs=x)
    scripted, _ = load_scripted(tmp_path / "frozen.pt")
    with torch.no_grad():
        eager = model(x)
        assert torch.equal(scripted(x), eager) and report.max_abs_diff == 0.0
        assert set(scripted.state_dict()) == set(model.state_dict())  # the same keys as the eager model's
        for m in model.trunk.modules():
            thaw_batchnorm(m)  # plain BatchNorm in eval mode: the same function
        assert torch.equal(model.eval()(x), eager)
    export_torchscript(model, tmp_path / "plain.pt", metadata=meta, example_inputs=x)
    plain, _ = load_scripted(tmp_path / "plain.pt")
    with torch.no_grad():
        assert torch.equal(plain(x), scripted(x))


def _small():
    torch.manual_seed(0)
    bb = get_backbone("tk:small_cnn", weights=None, widths=(8, 8, 16))
    return TransferModel(ImagePreprocess((0.5,) * 3, (0.5,) * 3), bb.trunk, build_head(bb.num_features, 2)), bb


def test_affine_trains_gamma_beta_and_keeps_the_statistics():
    model, bb = _small()
    policy = Policy.parse("unfreeze:last=1,bn=affine")
    apply_policy(model, bb, policy)
    bns = {n: m for n, m in model.trunk.named_modules() if isinstance(m, _BatchNorm)}
    assert all(is_frozen_batchnorm(m) for m in bns.values())  # bn=affine: every layer's statistics
    before = _trunk_state(model)
    _user_loop(model, [p for p in model.parameters() if p.requires_grad])
    after = model.trunk.state_dict()
    for n in bns:
        for buf in ("running_mean", "running_var", "num_batches_tracked"):
            assert torch.equal(after[f"{n}.{buf}"], before[f"{n}.{buf}"]), f"{n}.{buf}"
        assert not torch.equal(after[f"{n}.weight"], before[f"{n}.weight"])  # gamma trains everywhere


def test_unfreezing_swaps_back_and_the_statistics_train_again():
    model, bb = _small()
    policy = Policy.parse("gradual:every=1")
    params = {n: p for n, p in model.trunk.named_parameters()}
    apply_policy(model, bb, policy, epoch=0)
    frozen0 = {n for n, m in model.trunk.named_modules() if is_frozen_batchnorm(m)}
    apply_policy(model, bb, policy, epoch=len(bb.block_names))  # everything unfrozen by now
    set_train_mode(model, bb, policy, epoch=len(bb.block_names))
    assert frozen0 and not any(is_frozen_batchnorm(m) for m in model.trunk.modules())
    assert all(p is params[n] for n, p in model.trunk.named_parameters())  # the same parameter objects
    assert all(type(m) is nn.BatchNorm2d for m in model.trunk.modules() if isinstance(m, _BatchNorm))
    before = _trunk_state(model)
    _user_loop(model, model.parameters(), steps=1)
    assert all(not torch.equal(model.trunk.state_dict()[f"{n}.running_mean"], before[f"{n}.running_mean"])
               for n in frozen0)


def test_the_swap_keeps_keys_identity_checkpoints_and_pickles():
    bn = nn.BatchNorm2d(4)
    bn.running_mean.add_(1.0)
    keys, weight = list(bn.state_dict()), bn.weight
    assert freeze_batchnorm(bn) and type(bn).__name__ == "FrozenBatchNorm2d" and isinstance(bn, nn.BatchNorm2d)
    assert list(bn.state_dict()) == keys and bn.weight is weight and isinstance(bn.weight, nn.Parameter)
    plain = nn.BatchNorm2d(4)
    plain.load_state_dict(bn.state_dict())  # a frozen layer's checkpoint loads into a plain one, and back
    bn.load_state_dict(plain.state_dict())
    again = pickle.loads(pickle.dumps(bn))
    assert type(again) is type(bn) and torch.equal(again.running_mean, bn.running_mean)
    buf = io.BytesIO()
    torch.save(nn.Sequential(bn), buf)
    buf.seek(0)
    assert is_frozen_batchnorm(torch.load(buf, weights_only=False)[0])
    no_stats = nn.BatchNorm1d(3, track_running_stats=False)
    assert not freeze_batchnorm(no_stats) and type(no_stats) is nn.BatchNorm1d  # nothing to freeze
    assert not freeze_batchnorm(nn.LayerNorm(3))


def test_a_timm_batchnorm_with_its_activation_keeps_its_forward():
    layers = pytest.importorskip("timm.layers")
    bn = layers.BatchNormAct2d(4, act_layer=nn.ReLU)
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.weight.uniform_(0.5, 1.5)
    x = torch.randn(2, 4, 5, 5)
    reference = bn.eval()(x)
    assert freeze_batchnorm(bn) and isinstance(bn, layers.BatchNormAct2d)
    assert torch.equal(bn.train()(x), reference) and (reference >= 0).all()  # eval statistics, activation kept
    scripted = torch.jit.script(nn.Sequential(bn))
    assert torch.equal(scripted(x), reference)
    assert thaw_batchnorm(bn) and type(bn) is layers.BatchNormAct2d


def test_eval_fingerprint_is_the_same_pass_frozen_or_not_and_leaves_the_classes_as_they_were():
    """Frozen statistics compute in eval mode what the layer computed before: one fingerprint.
    A user's subclass of a frozen class with a forward of its own is another pass."""
    def trunk():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), BatchNormAct2d(4))
    plain, frozen = trunk(), trunk()
    for m in frozen:
        freeze_batchnorm(m)
    kinds = [type(m) for m in frozen]
    assert eval_fingerprint(frozen) == eval_fingerprint(plain)
    assert [type(m) for m in frozen] == kinds and all(is_frozen_batchnorm(m) for m in frozen[1:])

    class Doubled(FrozenBatchNorm2d):
        def forward(self, x):
            return 2 * super().forward(x)
    doubled = trunk()
    doubled[1].__class__ = Doubled
    assert eval_fingerprint(doubled) != eval_fingerprint(plain)


def test_a_saved_model_with_frozen_layers_of_another_library_loads_in_a_new_process(tmp_path):
    """The frozen kind of timm's BatchNormAct2d is made at run time: torch.save(model) named it,
    and a new process, where it had not been made yet, could not load the file."""
    import subprocess
    import sys

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), BatchNormAct2d(4), torch.nn.BatchNorm2d(4))
    for layer in (model[1], model[2]):
        freeze_batchnorm(layer)
    with torch.no_grad():
        model[1].running_mean += 1
    torch.save(model, tmp_path / "m.pt")
    code = ("import torch, transferkit; m = torch.load(r'%s', weights_only=False).train(); "
            "print(type(m[1]).__name__, type(m[2]).__name__, m[1].training, m[1].running_mean.tolist())")
    out = subprocess.run([sys.executable, "-c", code % (tmp_path / "m.pt")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["FrozenBatchNormAct2d", "FrozenBatchNorm2d", "False", "[1.0,", "1.0,", "1.0,", "1.0]"]
    copied = copy.deepcopy(model).train()
    assert type(copied[1]) is type(model[1]) and not copied[1].training


class _InstanceNormNet(nn.Module):
    """A trunk whose normalisation is InstanceNorm with running statistics."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3), nn.InstanceNorm2d(4, affine=True, track_running_stats=True))
        self.top = nn.Sequential(nn.Conv2d(4, 8, 3), nn.InstanceNorm2d(8, affine=True, track_running_stats=True),
                                 nn.AdaptiveAvgPool2d(1), nn.Flatten())

    def forward(self, x):
        return self.top(torch.relu(self.stem(x)))


@pytest.mark.parametrize("bn", ["train", "frozen"])
def test_instance_norm_with_running_statistics_is_frozen_as_batchnorm_is(image_folder, bn):
    """Only BatchNorm was swapped: the trainable block's InstanceNorm statistics moved under
    bn=frozen, and a user's model.train() moved the frozen stem's."""
    from transferkit.backbones import from_module

    torch.manual_seed(0)
    bb = from_module(_InstanceNormNet(), input_spec={"image_size": 16}, blocks=["stem", "top"])
    before = _trunk_state_of(bb.trunk)
    result = tk.finetune(bb, data=image_folder, policy=f"unfreeze:last=1,bn={bn}", epochs=1, lr=0.05, **KW)
    model = result.model
    after = model.trunk.state_dict()
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert not {k for k in moved if k.startswith("stem.")}
    assert {k.rpartition(".")[2] for k in moved if k.startswith("top.1.")} == (  # bn=frozen: gamma/beta too
        {"weight", "bias", "running_mean", "running_var"} if bn == "train" else set())
    kept = _trunk_state_of(model.trunk)
    _user_loop(model, model.head.parameters())
    assert all(torch.equal(kept[k], v) for k, v in model.trunk.state_dict().items() if k.startswith("stem."))


def _trunk_state_of(trunk: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trunk.state_dict().items()}
