"""Policies during training: gradual unfreezing with schedules and resume, L2-SP, and finetune()."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import transferkit as tk

from transferkit.backbones import get_backbone
from transferkit.heads import build_head
from transferkit.model import ImagePreprocess, TransferModel
from transferkit.policies import L2SP, Policy, apply_policy, param_groups, policy_penalty, set_train_mode
from transferkit.train.loop import Loop, TrainState, fit
from transferkit.train.optim import make_optimizer, make_scheduler

pytestmark = pytest.mark.precision_auto  # the outcome depends on what the CPU's bf16 support decides

EPOCHS = 6


def small(seed: int = 0):
    torch.manual_seed(seed)
    bb = get_backbone("tk:small_cnn", weights=None, widths=(8, 8, 16))
    return TransferModel(ImagePreprocess((0.5,) * 3, (0.5,) * 3), bb.trunk, build_head(bb.num_features, 3)), bb


def loader() -> DataLoader:
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 256, (16, 3, 16, 16), dtype=torch.uint8, generator=g)
    return DataLoader(TensorDataset(x, torch.randint(0, 3, (16,), generator=g)), batch_size=8, shuffle=False)


def setup(spec: str, schedule: str, seed: int = 0):
    """Model, optimizer and schedule built the way finetune() builds them: groups for the whole run."""
    model, bb = small(seed)
    policy = Policy.parse(spec)
    apply_policy(model, bb, policy, epoch=0)
    opt = make_optimizer("adamw", param_groups(model, lr=1e-2, weight_decay=0.05, backbone=bb, policy=policy,
                                               epochs=EPOCHS), lr=1e-2)
    sched = make_scheduler(schedule, opt, total_steps=EPOCHS * 2, steps_per_epoch=2)

    def set_mode(epoch: int) -> None:
        apply_policy(model, bb, policy, epoch=epoch)
        set_train_mode(model, bb, policy, epoch=epoch)

    return model, bb, policy, opt, sched, set_mode


def run(model, opt, sched, set_mode, *, until: int, state: TrainState | None = None):
    """fit() up to epoch ``until``; return the trunk parameters that changed in each epoch."""
    changed: list[set[str]] = []
    prev = {n: p.detach().clone() for n, p in model.trunk.named_parameters()}

    def on_end(_state):
        changed.append({n for n, p in model.trunk.named_parameters() if not torch.equal(prev[n], p)})
        prev.update({n: p.detach().clone() for n, p in model.trunk.named_parameters()})

    fit(model, loader(), None, Loop(optimizer=opt, scheduler=sched, loss_fn=nn.CrossEntropyLoss(), set_mode=set_mode,
                                    on_epoch_end=on_end, verbose=False), epochs=until, state=state)
    return changed


CASES = [("gradual:every=2", "cosine"), ("gradual:milestones=1+4,discriminative=0.1", "one_cycle"),
         ("gradual:every=2,layer_decay=0.5", "one_cycle"), ("fine_tune:frozen=2", "cosine"),
         ("fine_tune:frozen=3,layer_decay=0.5", "one_cycle")]
RESUMED = [CASES[0], CASES[1], CASES[3], CASES[4]]  # fine_tune: resumed after, and right at the end of, its frozen phase


@pytest.mark.parametrize("spec, schedule", CASES)
def test_gradual_unfreezing_trains_exactly_the_scheduled_blocks_each_epoch(spec, schedule):
    model, bb, policy, opt, sched, set_mode = setup(spec, schedule)
    changed = run(model, opt, sched, set_mode, until=EPOCHS)
    for epoch, names in enumerate(changed):
        blocks = [b for b in bb.blocks if b.name in policy.trainable_blocks(bb.block_names, epoch)]
        expected = {n for n, _ in model.trunk.named_parameters() if any(b.owns(n) for b in blocks)}
        assert names == expected, f"epoch {epoch}: trained {sorted(names)}, expected {sorted(expected)}"
    assert changed[0] == set() or policy.milestones and 0 in policy.milestones
    assert changed[-1]  # something did unfreeze


@pytest.mark.parametrize("spec, schedule", RESUMED)
def test_gradual_unfreezing_resumed_mid_schedule_matches_an_uninterrupted_run(spec, schedule):
    model, _, _, opt, sched, set_mode = setup(spec, schedule)
    full_changes = run(model, opt, sched, set_mode, until=EPOCHS)
    reference = {k: v.clone() for k, v in model.state_dict().items()}

    model, _, _, opt, sched, set_mode = setup(spec, schedule)
    first = run(model, opt, sched, set_mode, until=3)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)

    model, _, _, opt, sched, set_mode = setup(spec, schedule, seed=123)  # other init: everything comes from the file
    model.load_state_dict(saved["model"])
    opt.load_state_dict(saved["opt"])
    sched.load_state_dict(saved["sched"])
    rest = run(model, opt, sched, set_mode, until=EPOCHS, state=TrainState(epoch=3))
    assert first + rest == full_changes
    for k, v in model.state_dict().items():
        assert torch.allclose(v, reference[k], atol=1e-6, rtol=0), k


def test_l2sp_is_zero_at_start_and_pulls_toward_the_pretrained_weights():
    model, bb = small()
    policy = Policy.parse("unfreeze:last=2,l2sp=0.5,l2sp_beta=0.0")
    apply_policy(model, bb, policy)
    reg = policy_penalty(model, bb, policy)
    assert reg() == 0.0
    w0 = {n: p.detach().clone() for n, p in model.trunk.named_parameters()}
    with torch.no_grad():
        for p in model.trunk.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    model.zero_grad(set_to_none=True)
    value = reg()
    value.backward()
    sq = sum(((p - w0[n]) ** 2).sum() for n, p in model.trunk.named_parameters() if p.requires_grad)
    assert value.item() == pytest.approx(0.25 * sq.item(), rel=1e-5)
    for n, p in model.trunk.named_parameters():
        if not p.requires_grad:
            assert p.grad is None, n  # frozen weights are not part of the penalty
            continue
        assert torch.allclose(p.grad, 0.5 * (p.detach() - w0[n]), atol=1e-7), n
        # the descent direction -grad points from w toward w0 (positive inner product)
        assert torch.sum(-p.grad * (w0[n] - p.detach())) > 0, n


def test_l2sp_penalises_new_weights_with_beta():
    model, _ = small()
    reg = L2SP(model, alpha=0.0, beta=0.2)
    expected = 0.1 * sum((p ** 2).sum() for p in model.head.parameters() if p.ndim >= 2)
    assert reg().item() == pytest.approx(expected.item(), rel=1e-6)


def test_finetune_with_l2sp_stays_closer_to_the_start(image_folder):
    from transferkit import finetune

    dist = {}
    for spec in ("full", "full,l2sp=5.0"):
        model, bb = small()
        w0 = {n: p.detach().clone() for n, p in bb.trunk.named_parameters()}
        r = finetune(bb, data=image_folder, policy=spec, epochs=2, batch_size=8, lr=3e-3, image_size=16,
                     restore_best=False, verbose=False, num_workers=0)
        dist[spec] = sum(((p.detach().cpu() - w0[n]) ** 2).sum().item() for n, p in r.model.trunk.named_parameters())
        assert all(torch.equal(p, w0[n]) for n, p in bb.trunk.named_parameters())  # the caller's is untouched
    assert 0 < dist["full,l2sp=5.0"] < dist["full"]


def test_finetune_gradual_leaves_never_unfrozen_blocks_bit_for_bit_equal(image_folder):
    from transferkit import finetune

    _, bb = small()
    before = {k: v.clone() for k, v in bb.trunk.state_dict().items()}
    result = finetune(bb, data=image_folder, policy="gradual:every=1", epochs=2, batch_size=8, image_size=16,
                      restore_best=False, verbose=False, num_workers=0)
    assert not result.used_feature_cache
    assert all(torch.equal(before[k], v) for k, v in bb.trunk.state_dict().items())  # the caller's is untouched
    after = {k: v.cpu() for k, v in result.model.trunk.state_dict().items()}  # wherever it trained
    for k, v in after.items():  # epoch 0: head only; epoch 1: stage3 too (weights and BN statistics)
        assert torch.equal(before[k], v) == (not k.startswith("stage3.")), k


def test_finetune_with_fastais_fine_tune_trains_the_head_first_then_everything(image_folder, tmp_path):
    """``fine_tune:frozen=1``: epoch 1 leaves the whole trunk (weights and BN statistics)
    bit-for-bit unchanged, epoch 2 trains every parameter at a tenth of the lr, the stem at 1/100 of that."""
    from transferkit import finetune
    from transferkit.checkpoints import load_checkpoint

    _, bb = small()
    start = {k: v.clone() for k, v in bb.trunk.state_dict().items()}
    ckpt, states = tmp_path / "run.pt", []
    result = finetune(bb, data=image_folder, policy="fine_tune:frozen=1", epochs=2, batch_size=8, image_size=16,
                      lr=1e-3, schedule="constant", restore_best=False, verbose=False, num_workers=0,
                      checkpoint=ckpt, callbacks=[lambda row: states.append(load_checkpoint(ckpt)["model"])])
    assert not result.used_feature_cache
    assert result.decisions.cached_epochs == 1 and "features_s" in result.timings  # epoch 1 ran on cached features
    assert isinstance(result.model.head[0], torch.nn.Linear)  # built with weights=None: random, no FeatureNorm
    first, second = states
    trunk = [k for k in first if k.startswith("trunk.")]
    assert trunk and all(torch.equal(first[k], start[k[len("trunk."):]]) for k in trunk)
    params = {f"trunk.{n}" for n, _ in bb.trunk.named_parameters()}
    moved = {k for k in trunk if not torch.equal(first[k], second[k])}
    assert params <= moved  # every block trains in epoch 2
    assert any(k.endswith("running_mean") for k in moved)  # BN statistics follow the data once unfrozen
    head = [k for k in first if k.startswith("head.") and first[k].is_floating_point()]
    assert any(not torch.equal(first[k], second[k]) for k in head)
    # two phases: the head at the base lr, then everything at lr * unfrozen_lr (0.1), the stem at 1/100 of that
    assert [r["lr"] for r in result.history] == pytest.approx([1e-3, 1e-4])  # the base lr, not the stem's
    assert result.history[-1]["lr_groups"]["stem"] == pytest.approx(1e-6)
    assert result.history[-1]["lr_groups"]["head"] == pytest.approx(1e-4)


def test_finetune_fine_tune_for_its_frozen_epochs_only_caches_features(image_folder):
    from transferkit import finetune

    _, bb = small()
    result = finetune(bb, data=image_folder, policy="fine_tune", epochs=1, batch_size=8, image_size=16,
                      verbose=False, num_workers=0)
    assert result.used_feature_cache  # the backbone never trains in a 1-epoch fine_tune:frozen=1


def parameterless_in_stem():
    """A custom trunk whose frozen stem holds modules without parameters: a BatchNorm with
    ``affine=False`` and a dropout."""
    from transferkit.backbones import from_module

    torch.manual_seed(0)
    net = nn.Sequential(nn.BatchNorm2d(3, affine=False), nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Dropout(0.5),
                        nn.ReLU(), nn.Conv2d(8, 8, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    return from_module(net, input_spec={"image_size": 32}, blocks={"stem": ["0", "1", "2", "3"], "body": ["5"]})


@pytest.mark.parametrize("make, spec", [(parameterless_in_stem, "unfreeze:last=1"),
                                        (lambda: get_backbone("tk:cifar_resnet20", weights=None), "unfreeze:last=1"),
                                        (lambda: get_backbone("tk:cifar_resnet20", weights=None), "gradual:every=1")])
def test_finetune_leaves_every_parameter_and_buffer_of_frozen_blocks_bit_for_bit_equal(image_folder, make, spec):
    bb = make()
    before = {k: v.clone() for k, v in bb.trunk.state_dict().items()}
    result = tk.finetune(bb, data=image_folder, policy=spec, epochs=2, batch_size=8, image_size=32,
                         restore_best=False, verbose=False, num_workers=0)
    frozen = [b for b in bb.blocks if b.name not in Policy.parse(spec).trainable_blocks(bb.block_names, 1)]
    after = {k: v.cpu() for k, v in result.model.trunk.state_dict().items()}
    kept = [k for k in after if any(b.owns(k) for b in frozen)]
    assert kept and all(torch.equal(before[k], after[k]) for k in kept), [k for k in kept
                                                                          if not torch.equal(before[k], after[k])]
    moved = [k for k in after if k not in kept and not torch.equal(before[k], after[k])]
    assert moved  # the trained block did train


def test_modules_without_parameters_follow_their_block():
    from transferkit.policies.frozen_bn import is_frozen_batchnorm

    bb = parameterless_in_stem()
    model = TransferModel(ImagePreprocess((0.5,) * 3, (0.5,) * 3), bb.trunk, build_head(bb.num_features, 2))
    policy = Policy.parse("unfreeze:last=1")
    apply_policy(model, bb, policy)
    set_train_mode(model, bb, policy)
    assert is_frozen_batchnorm(model.trunk[0]) and is_frozen_batchnorm(model.trunk[2])
    assert not model.trunk[0].training and not model.trunk[3].training  # BN affine=False and dropout of the stem
    assert model.trunk[5].training


class InputNormLast(nn.Module):
    """A trunk whose input BatchNorm (no gamma/beta) is declared after its blocks but runs
    before them."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3)
        self.body = nn.Conv2d(8, 8, 3)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.input_norm = nn.BatchNorm2d(3, affine=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.body(self.stem(self.input_norm(x))))


def test_a_statistics_layer_outside_the_blocks_follows_the_block_it_runs_next_to_not_the_one_declared_before():
    """An input BatchNorm declared last followed the last block (registration order): with the
    stem frozen and the body training, it updated its running statistics, so the frozen stem's
    input changed. It follows the block it runs next to, told by one forward pass."""
    from transferkit.backbones import from_module
    from transferkit.policies.freeze import module_blocks

    torch.manual_seed(0)
    bb = from_module(InputNormLast(), input_spec={"image_size": 16}, blocks={"stem": ["stem"], "body": ["body"]})
    assert module_blocks(bb.trunk, bb)["input_norm"] == "stem"
    model = TransferModel(ImagePreprocess((0.5,) * 3, (0.5,) * 3), bb.trunk, build_head(bb.num_features, 2))
    policy = Policy.parse("unfreeze:last=1")
    apply_policy(model, bb, policy)
    set_train_mode(model, bb, policy)
    assert not model.trunk.input_norm.training and model.trunk.body.training
    before = model.trunk.input_norm.running_mean.clone()
    model(torch.rand(4, 3, 16, 16))
    assert torch.equal(model.trunk.input_norm.running_mean, before)


@pytest.mark.parametrize("spec, dropping", [("unfreeze:last=1", (False, False)), ("unfreeze:last=2", (False, True)),
                                            ("full", (True, True))])
def test_a_dropout_between_blocks_follows_the_block_before_it(spec, dropping):
    """A dropout outside every block (timm's ``pos_drop``, a custom trunk's) ran in training mode
    whenever any block trained, so the frozen part's output was dropped at random. It drops only
    when the block it runs after trains."""
    from transferkit.backbones import from_module

    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Dropout(0.5), nn.Conv2d(8, 8, 3), nn.AlphaDropout(0.1),
                        nn.Conv2d(8, 8, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    bb = from_module(net, input_spec={"image_size": 32})
    assert bb.block_names == ["0", "2", "4"]
    model = TransferModel(ImagePreprocess((0.5,) * 3, (0.5,) * 3), bb.trunk, build_head(bb.num_features, 2))
    policy = Policy.parse(spec)
    apply_policy(model, bb, policy)
    set_train_mode(model, bb, policy)
    assert (model.trunk[1].training, model.trunk[3].training) == dropping  # after block 0, after block 2


@pytest.mark.parametrize("spec", ["full", "gradual:every=1"])
def test_a_logistic_probe_on_a_training_backbone_is_refused_with_advice_that_fits(image_folder, spec):
    from transferkit.errors import ConfigError

    kw = dict(data=image_folder, policy=spec, epochs=2, image_size=16, verbose=False, num_workers=0)
    with pytest.raises(ConfigError) as caught:
        tk.plan("tk:small_cnn", weights=None, head="logistic", **kw)
    assert "Use policy='feature_extraction' for the probe, or head='linear'" in str(caught.value)
    assert "cache_features" not in str(caught.value)  # the cache does not decide whether the backbone trains
    with pytest.raises(ConfigError, match=r"cache_features=True needs a policy that keeps the backbone frozen.*"
                                          r"or cache_features='auto'"):
        tk.plan("tk:small_cnn", weights=None, cache_features=True, **kw)


@pytest.mark.parametrize("views, cached", [(1, "none"), (2, "standard")])
def test_a_frozen_phase_caches_the_eval_view_or_k_augmented_views(image_folder, views, cached):
    """As docs/policies.md says: one cached view of a frozen phase is the clean eval view; K > 1
    views are augmented as the run's augment says."""
    d = tk.plan("tk:small_cnn", weights=None, data=image_folder, policy="fine_tune", epochs=3, image_size=16,
                cache_views=views, verbose=False, num_workers=0)
    assert d.cached_epochs == 1 and d.augment == "standard" and d.cached_augment == cached


def test_unfreeze_last_counts_the_final_norm_of_a_vit_as_a_block():
    """As docs/policies.md says: a ViT's block list ends with its final norm, so last=1 trains the norm."""
    bb = get_backbone("timm:vit_tiny_patch16_224", weights=None, img_size=32)
    assert bb.block_names[-2:] == ["blocks.11", "norm"]
    assert Policy.parse("unfreeze:last=1").trainable_blocks(bb.block_names) == ["norm"]
    assert Policy.parse("unfreeze:last=2").trainable_blocks(bb.block_names) == ["blocks.11", "norm"]


def test_a_module_shared_by_two_blocks_is_owned_by_the_block_of_its_first_name(tmp_path):
    """timm's CoaT shares its positional convolutions between blocks: a policy that trains some
    blocks must still find each shared parameter's block (it ran epoch 1, then stopped)."""
    from conftest import make_image_folder
    from transferkit.backbones.custom import from_module

    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.cpe = nn.Conv2d(3, 3, 3, padding=1)  # its parameters' names: cpe.weight, cpe.bias
            self.body = nn.Sequential(nn.Sequential(self.cpe, nn.ReLU()),  # and again under body.0.0
                                      nn.Sequential(nn.Conv2d(3, 8, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten()))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.body(x)
    torch.manual_seed(0)
    bb = from_module(Shared(), input_spec={"image_size": 16}, name="shared",
                     blocks=[("cpe", ["cpe"]), ("top", ["body.1"])])
    data = make_image_folder(tmp_path / "d", per_class=3, size=16)
    r = tk.finetune(backbone=bb, data=str(data), policy="unfreeze:last=1", epochs=2, batch_size=4, val_split=0,
                    num_workers=0, verbose=False)
    assert len(r.history) == 2


def test_a_policy_that_unfreezes_only_batchnorm_blocks_under_bn_frozen_is_refused(tmp_path):
    """A DenseNet's last block is its final BatchNorm: ``unfreeze:last=1,bn=frozen`` would plan
    "head + norm" and train no backbone weight (uncached, at the backbone's rate)."""
    from conftest import make_image_folder
    from transferkit.backbones.custom import from_module

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    bb = from_module(net, input_spec={"image_size": 16}, name="norm_last", blocks=[("body", ["0"]), ("norm", ["1"])])
    data = str(make_image_folder(tmp_path / "d", per_class=3, size=16))
    with pytest.raises(tk.PolicyError, match=r"'unfreeze:last=1,bn=frozen' trains no backbone weight: the blocks it "
                                             r"unfreezes \(norm\) hold only BatchNorm gamma/beta"):
        tk.plan(tk.FinetuneConfig(backbone=bb, data=data, policy="unfreeze:last=1,bn=frozen", epochs=2))
    assert tk.plan(tk.FinetuneConfig(backbone=bb, data=data, policy="unfreeze:last=2,bn=frozen", epochs=2)).trainable
    assert tk.plan(tk.FinetuneConfig(backbone=bb, data=data, policy="unfreeze:last=1,bn=affine", epochs=2)).trainable


def test_a_gradual_schedule_with_an_epoch_that_unfreezes_only_batchnorm_under_bn_frozen_is_refused(tmp_path):
    """A gradual schedule's first step that unfreezes only a BatchNorm block trains no backbone
    weight in that epoch, uncached; the same rule as a fixed policy, named by its epoch."""
    from conftest import make_image_folder
    from transferkit.backbones.custom import from_module

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 8, 3), nn.BatchNorm2d(8), nn.AdaptiveAvgPool2d(1),
                        nn.Flatten())
    bb = from_module(net, input_spec={"image_size": 16}, name="norm_last",
                     blocks=[("stem", ["0"]), ("body", ["1"]), ("norm", ["2"])])
    data = str(make_image_folder(tmp_path / "d", per_class=3, size=16))
    with pytest.raises(tk.PolicyError, match=r"'gradual:every=1,bn=frozen' trains no backbone weight in epoch 2: the "
                                             r"blocks it unfreezes \(norm\) hold only BatchNorm.*start=2"):
        tk.plan(tk.FinetuneConfig(backbone=bb, data=data, policy="gradual:every=1,bn=frozen", epochs=3))
    plan = tk.plan(tk.FinetuneConfig(backbone=bb, data=data, policy="gradual:every=1,start=2,bn=frozen", epochs=3))
    assert plan.trainable == (("body", "norm"), ("stem", "body", "norm"), ("stem", "body", "norm"))
    # with max=1 the advice says max too (start=2 alone would be refused: max must lie above start)
    with pytest.raises(tk.PolicyError, match=r"\(start=2, and max above 2\)"):
        tk.plan(tk.FinetuneConfig(backbone=bb, data=data, policy="gradual:every=1,bn=frozen,max=1", epochs=3))
    assert tk.plan(tk.FinetuneConfig(backbone=bb, data=data, policy="gradual:every=1,bn=frozen,start=2,max=3",
                                     epochs=3)).trainable[0] == ("body", "norm")
    # one epoch: the frozen first epoch alone, nothing refused
    assert tk.plan(tk.FinetuneConfig(backbone=bb, data=data, policy="gradual:every=1,bn=frozen", epochs=1)).frozen


def test_a_block_whose_parameters_were_all_fixed_stays_frozen_with_its_statistics(tmp_path):
    """A block whose parameters all did not require gradients when the backbone was made (a
    module frozen by an earlier run) trains no weight under any policy: it stays in eval mode,
    its BatchNorm statistics bit-for-bit unchanged, the plan leaves it out of the blocks that
    train and says why; a policy whose unfrozen blocks are all such blocks is refused."""
    from conftest import make_image_folder
    from transferkit.backbones.custom import from_module

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 8, 3), nn.BatchNorm2d(8),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten())
    net[:2].requires_grad_(False)  # the stem, frozen by an earlier run
    bb = from_module(net, input_spec={"image_size": 16}, name="stem_fixed",
                     blocks=[("stem", ["0", "1"]), ("body", ["2", "3"])])
    data = str(make_image_folder(tmp_path / "d", per_class=3, size=16))
    plan = tk.plan(tk.FinetuneConfig(backbone=bb, data=data, policy="full", epochs=1))
    assert plan.trainable == (("body",),)
    assert any("(stem) holds only parameters that did not require gradients" in n for n in plan.notes)
    from transferkit.decisions import differences
    older = {**plan.to_dict(), "trainable": [{"epochs": [1, 1], "blocks": ["stem", "body"]}]}  # as recorded before
    older.pop("fixed_blocks")
    assert differences(older, plan.to_dict()) == {}  # a checkpoint of then resumes
    assert "trainable" in differences({**older, "trainable": [{"epochs": [1, 1], "blocks": []}]}, plan.to_dict())
    before = {k: v.clone() for k, v in net.state_dict().items()}
    r = tk.finetune(backbone=bb, data=data, policy="full", epochs=1, batch_size=4, val_split=0, num_workers=0,
                    verbose=False)
    after = r.model.trunk.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before if k.startswith(("0.", "1.")))  # stats included
    assert not torch.equal(after["3.running_mean"], before["3.running_mean"])  # the block that trains
    net[2:4].requires_grad_(False)  # every block fixed: nothing of the trunk would train
    whole = from_module(net, input_spec={"image_size": 16}, name="all_fixed",
                        blocks=[("stem", ["0", "1"]), ("body", ["2", "3"])])
    with pytest.raises(tk.PolicyError, match=r"'full' trains no backbone weight: the blocks it unfreezes \(stem, "
                                             r"body\) hold only parameters that did not require gradients.*Use "
                                             r"policy='feature_extraction'"):
        tk.plan(tk.FinetuneConfig(backbone=whole, data=data, policy="full", epochs=1))


def test_the_refusal_of_a_policy_that_trains_no_weight_counts_to_a_block_that_trains(tmp_path):
    """A block of fixed weights and BatchNorm under bn=frozen trains nothing either (it was
    planned: the trunk ran end to end, uncached, training no weight), and the advice counts the
    top blocks up to one whose weights train (it said last=2, the refused policy itself, and
    start=2 where start=3 was needed)."""
    from conftest import make_image_folder
    from transferkit.backbones.custom import from_module

    data = str(make_image_folder(tmp_path / "d", per_class=3, size=16))

    def trunk(fixed):
        torch.manual_seed(0)
        net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 8, 3),
                            nn.AdaptiveAvgPool2d(1), nn.Flatten())
        for i in fixed:
            net[i].requires_grad_(False)
        return from_module(net, input_spec={"image_size": 16}, name="three",
                           blocks=[("a", ["0"]), ("b", ["1", "2"]), ("c", ["3"])])

    def refused(bb, policy, said, epochs=2):
        with pytest.raises(tk.PolicyError, match=said):
            tk.plan(tk.FinetuneConfig(backbone=bb, data=data, policy=policy, epochs=epochs))

    mixed = trunk([1, 3])  # b: a fixed conv and a BatchNorm that trains; c: fixed
    refused(mixed, "unfreeze:last=2,bn=frozen", r"the blocks it unfreezes \(b, c\) hold only BatchNorm gamma/beta, "
            r"which bn=frozen keeps frozen and parameters that did not require gradients .*\(e\.g\. last=3\), let "
            r"BatchNorm train")
    assert tk.plan(tk.FinetuneConfig(backbone=mixed, data=data, policy="unfreeze:last=2", epochs=2)).trainable
    upper = trunk([1, 2, 3])  # b and c wholly fixed
    refused(upper, "unfreeze:last=2", r"\(b, c\) hold only parameters that did not require gradients .*Unfreeze a "
            r"block whose weights train \(e\.g\. last=3\), or use policy='feature_extraction'")
    refused(upper, "gradual:every=1,discriminative=0.5", r"in epoch 2: .*Train every block from the start "
            r"\('unfreeze:last=3,discriminative=0.5'\)", epochs=3)  # the policy's other options kept
    assert tk.plan(tk.FinetuneConfig(backbone=upper, data=data, policy="unfreeze:last=3", epochs=3)).trainable
    lower = trunk([3])  # c alone fixed: a gradual schedule starts at two blocks
    refused(lower, "gradual:every=1", r"in epoch 2: .*Start with more blocks unfrozen \(start=2\)", epochs=3)
    assert tk.plan(tk.FinetuneConfig(backbone=lower, data=data, policy="gradual:every=1,start=2", epochs=3))
    norm_fixed = trunk([2])  # b: a convolution that trains and a fixed BatchNorm; c trains
    assert tk.plan(tk.FinetuneConfig(backbone=norm_fixed, data=data, policy="unfreeze:last=2", epochs=2)).trainable
    torch.manual_seed(0)
    bn_net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    bn_net[1].requires_grad_(False)  # a block of a fixed BatchNorm alone
    bn_fixed = from_module(bn_net, input_spec={"image_size": 16}, name="bn_fixed",
                           blocks=[("body", ["0"]), ("norm", ["1"])])
    refused(bn_fixed, "unfreeze:last=1", r"\(norm\) hold only parameters that did not require gradients")
    every = trunk([0, 1, 2, 3])
    refused(every, "gradual:every=1", r"in epoch 2: .*lets them train\)\. Use policy='feature_extraction'", epochs=3)


def test_a_parameterless_batchnorm_between_blocks_is_frozen_with_the_block_before_it(tmp_path):
    """A BatchNorm without gamma/beta belongs to no block of a default block map (blocks hold
    parameters); its statistics moved while the block around it was frozen. It follows the
    block it runs after: kept under ``last=2`` (blocks 3 and 4), updated when block 0 trains."""
    from conftest import make_image_folder
    from transferkit.backbones.custom import from_module

    data = str(make_image_folder(tmp_path / "d", per_class=6, size=16))
    for policy, moves in (("unfreeze:last=2", False), ("full", True)):
        torch.manual_seed(0)
        net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8, affine=False), nn.ReLU(), nn.Conv2d(8, 16, 3),
                            nn.BatchNorm2d(16), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        bb = from_module(net, input_spec={"image_size": 16})
        assert bb.block_names == ["0", "3", "4"]
        stats = net[1].running_mean.clone()
        r = tk.finetune(bb, data=data, policy=policy, epochs=2, image_size=16, verbose=False, num_workers=0)
        assert torch.equal(r.model.trunk[1].running_mean, stats) != moves, policy
        r.model.train()  # a user's own loop: the frozen statistics stay put
        r.model(torch.rand(4, 3, 16, 16))
        assert torch.equal(r.model.trunk[1].running_mean, stats) != moves, policy
