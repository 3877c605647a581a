"""Applying a policy to a model: ``requires_grad`` flags and train/eval modes.

BatchNorm modes (see ``docs/policies.md`` for the reasoning behind the default):

============  ================================  ===================================
``bn``        BN in trainable blocks            BN in frozen blocks
============  ================================  ===================================
``train``     statistics update, gamma/beta     frozen entirely (eval statistics)
``affine``    statistics frozen, gamma/beta     statistics frozen, gamma/beta train
``frozen``    frozen entirely (eval statistics) frozen entirely (eval statistics)
============  ================================  ===================================

"Statistics frozen" means the layer runs in eval mode (normalises with the stored
running mean/var, never updates them). A frozen block is bit-for-bit unchanged by
training except under ``affine``, which trains gamma/beta everywhere (fastai's
``train_bn``). `apply_policy` swaps such layers to a frozen kind
(`transferkit.policies.frozen_bn`), so they stay frozen when a user's own loop calls
``model.train()``, and swaps them back when a later epoch unfreezes their block.
"""

from __future__ import annotations

import itertools
import weakref

import torch
from torch import nn
from torch.nn.modules.dropout import _DropoutNd

from transferkit.backbones._base import Backbone
from transferkit.lora import add_lora, check_lora, has_lora, is_lora_parameter
from transferkit.policies.frozen_bn import freeze_batchnorm, thaw_batchnorm, tracks_statistics
from transferkit.policies.spec import Policy
from transferkit.policies.structure import (  # noqa: F401 (has_batchnorm: public here)
    block_of,
    bn_param_names,
    fixed_blocks,
    has_batchnorm,
)


def training_blocks(backbone: Backbone, policy: Policy, epoch: int = 0) -> list[str]:
    """The blocks whose weights train at ``epoch``: the policy's (`Policy.trainable_blocks`), but
    for those whose parameters all did not require gradients as the backbone was made
    (`transferkit.policies.structure.fixed_blocks`), which stay frozen, their BatchNorm
    statistics included."""
    fixed = fixed_blocks(backbone)
    return [b for b in policy.trainable_blocks(backbone.block_names, epoch) if b not in fixed]


def trainable_flags(model: nn.Module, backbone: Backbone, policy: Policy, epoch: int = 0) -> dict[str, bool]:
    """``{parameter name: trains at epoch}`` over ``model.trunk`` (names relative to the trunk),
    as the policy says; a query, nothing is changed. A parameter that did not require
    gradients as the backbone was made (`Backbone.fixed`) never trains."""
    blocks = set(training_blocks(backbone, policy, epoch))
    bn_params = bn_param_names(model.trunk)
    fixed = backbone.fixed or frozenset()
    flags = {}
    for name, _ in model.trunk.named_parameters():
        if is_lora_parameter(name):
            flags[name] = True
        elif name in fixed:
            flags[name] = False
        elif name in bn_params and policy.bn != "train":
            flags[name] = policy.bn == "affine"
        else:
            flags[name] = block_of(backbone, name) in blocks
    return flags


def apply_policy(model: nn.Module, backbone: Backbone, policy: Policy, epoch: int = 0) -> None:
    """Set ``requires_grad`` on ``model.trunk`` as ``policy`` says at ``epoch``; the head always
    trains. A LoRA policy adds its factors to the trunk the first time (in place); factors of
    another LoRA policy already there are a `PolicyError` (`check_lora`).

    Example:
        >>> from transferkit import get_backbone, build_head
        >>> from transferkit.model import TransferModel, ImagePreprocess
        >>> bb = get_backbone("tk:small_cnn", weights=None)
        >>> m = TransferModel(ImagePreprocess((0.5,) * 3, (0.5,) * 3), bb.trunk, build_head(bb.num_features, 2))
        >>> apply_policy(m, bb, Policy.parse("unfreeze:last=1"))
        >>> sorted({n.split(".")[1] for n in trainable_parameter_names(m)})
        ['0', 'stage3']
    """
    if policy.lora is not None:
        lora = {"rank": policy.lora, "alpha": policy.lora_alpha, "targets": policy.lora_targets}
        if has_lora(model.trunk):
            check_lora(model.trunk, **lora)
        else:
            add_lora(model.trunk, **lora)
    flags = trainable_flags(model, backbone, policy, epoch)
    for name, p in model.trunk.named_parameters():
        p.requires_grad_(flags[name])
    for p in model.head.parameters():
        p.requires_grad_(True)
    freeze_statistics(model, backbone, policy, epoch)


def _active_blocks(model: nn.Module, backbone: Backbone, policy: Policy, epoch: int) -> set[str]:
    """The blocks whose modules train at ``epoch``: the policy's, and those holding LoRA factors."""
    active = set(training_blocks(backbone, policy, epoch))
    if policy.lora is not None:
        active |= {block_of(backbone, n) for n, _ in model.trunk.named_parameters() if is_lora_parameter(n)}
    return active


def statistics_frozen(model: nn.Module, backbone: Backbone, policy: Policy, epoch: int = 0) -> dict[str, bool]:
    """``{module name: statistics frozen at epoch}`` for the BatchNorm layers of ``model.trunk``:
    those of blocks whose weights do not train (LoRA factors leave a block's own weights, and so
    its statistics, as they were), and all of them under ``bn="affine"`` or ``"frozen"``."""
    active = set(training_blocks(backbone, policy, epoch))
    owner = module_blocks(model.trunk, backbone) if active and policy.bn == "train" else {}
    return {name: not active or policy.bn != "train" or (owner[name] is not None and owner[name] not in active)
            for name, m in model.trunk.named_modules() if tracks_statistics(m)}


def freeze_statistics(model: nn.Module, backbone: Backbone, policy: Policy, epoch: int = 0) -> None:
    """Swap the BatchNorm layers whose statistics the policy freezes at ``epoch`` to frozen
    BatchNorm (they stay in eval mode under ``model.train()``), and the others back to their
    own class (`transferkit.policies.frozen_bn`); in place, parameters and buffers unchanged."""
    frozen = statistics_frozen(model, backbone, policy, epoch)
    for name, m in model.trunk.named_modules():
        if name in frozen:
            (freeze_batchnorm if frozen[name] else thaw_batchnorm)(m)


def module_blocks(trunk: nn.Module, backbone: Backbone) -> dict[str, str | None]:
    """``{module name: block}`` for every submodule of ``trunk``: the block with a member that is
    the module or contains it (the longest such member), so a module without parameters inside a
    block (BatchNorm with ``affine=False``, dropout, activation) follows its block; a module no
    member covers takes the block owning all the parameters under it (block maps may name single
    parameters), or its parent's when it has none; ``None`` for containers that span several
    blocks (the trunk itself, a ViT's encoder) and for parameterless modules outside every
    block, except a normalisation layer with running statistics (a BatchNorm with
    ``affine=False`` between blocks) and a dropout: it follows the block of the module it runs
    after (`run_order`; where that cannot be told, the one registered before it), or, first in
    the trunk, of the one after it, so that its statistics stay put and it drops nothing while
    that block is frozen. Other parameterless modules outside every block (SpecAugment's masks, a resampler)
    run in training mode whenever some block trains."""
    members = sorted(((m, b.name) for b in (*backbone.blocks, *backbone.frozen) for m in b.members),
                     key=lambda mb: -len(mb[0]))
    out: dict[str, str | None] = {}
    canonical = {id(p): n for n, p in trunk.named_parameters()}  # a parameter shared by two modules: its first name
    for name, m in trunk.named_modules():
        covering = next((b for member, b in members if name == member or name.startswith(member + ".")), None)
        if name and covering is not None:
            out[name] = covering
            continue
        owners = {block_of(backbone, canonical[id(p)]) for p in m.parameters()}
        if not owners and name:
            out[name] = out.get(name.rpartition(".")[0]) if "." in name else None
        else:
            out[name] = owners.pop() if len(owners) == 1 else None
    names, modules = list(out), dict(trunk.named_modules())  # (a TorchScript trunk has no get_submodule)
    order: list[str] | None = None  # the order the modules run in: looked at once, where a module needs it
    for name in names:
        if out[name] is None and _follows_its_neighbour(modules[name]):
            if order is None:
                ran = run_order(trunk, backbone)  # then the modules the forward did not call, as registered
                called = set(ran)
                order = [n for n in ran if n in out] + [n for n in names if n not in called] if ran else names
            i = order.index(name)
            before = (out[n] for n in reversed(order[:i]) if out[n] is not None)
            after = (out[n] for n in order[i + 1:] if out[n] is not None)
            out[name] = next(before, None) or next(after, None)
    return out


_RUN_ORDERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # trunk -> `run_order`


def run_order(trunk: nn.Module, backbone: Backbone) -> list[str]:
    """The names of ``trunk``'s modules in the order a forward pass calls them (each at its first
    call), from one forward of a zero input of the backbone's ``input_spec`` in eval mode
    without gradients (the modules' modes are restored); looked at once per trunk. Empty where
    it cannot be told (a TorchScript trunk takes no hooks; a forward that fails): the order the
    modules are registered in stands for it."""
    if trunk in _RUN_ORDERS:
        return _RUN_ORDERS[trunk]
    called: dict[str, None] = {}  # in the order of first calls
    spec = backbone.input_spec
    try:
        ref = next(itertools.chain(trunk.parameters(), trunk.buffers()), None)
        device = ref.device if ref is not None else torch.device("cpu")
        dtype = ref.dtype if ref is not None and ref.is_floating_point() else torch.float32
        shape = (1, int(spec.sample_rate * (spec.clip_seconds or 1.0))) if spec.kind == "audio" else \
            (1, spec.channels, spec.image_size, spec.image_size)
        x = torch.zeros(shape, device=device, dtype=dtype)
        hooks = [m.register_forward_pre_hook(lambda _m, _a, n=n: called.setdefault(n))
                 for n, m in trunk.named_modules()]  # (a module called twice keeps its first place)
        modes = {m: m.training for m in trunk.modules()}
        try:
            trunk.eval()
            with torch.no_grad():
                trunk(x)
        finally:
            for h in hooks:
                h.remove()
            for m, mode in modes.items():
                m.training = mode
    except Exception:  # noqa: BLE001 - a TorchScript trunk, a size it does not take: the registered order
        called = {}
    _RUN_ORDERS[trunk] = list(called)
    return _RUN_ORDERS[trunk]


def _follows_its_neighbour(m: nn.Module) -> bool:
    """A module that computes as the frozen trunk must not in training mode: a normalisation
    layer that updates running statistics, or a dropout."""
    return tracks_statistics(m) or isinstance(m, _DropoutNd)


def set_train_mode(model: nn.Module, backbone: Backbone, policy: Policy, epoch: int = 0) -> None:
    """``model.train()``, then eval mode for what must not change: every module of a block
    whose weights do not train at ``epoch`` (so its BatchNorm statistics stay put and its
    dropout is off; a block holding LoRA factors counts as training here, its BatchNorm layers
    stay frozen: `statistics_frozen`), and all BatchNorm layers under ``bn="affine"`` or
    ``"frozen"``."""
    model.train()
    active = _active_blocks(model, backbone, policy, epoch)
    if not active:
        model.trunk.eval()
        return
    owner = module_blocks(model.trunk, backbone)
    for name, m in model.trunk.named_modules():
        if owner[name] is not None and owner[name] not in active:
            m.eval()
    if policy.bn != "train":
        for m in model.trunk.modules():
            if tracks_statistics(m):
                m.eval()


def trainable_parameter_names(model: nn.Module) -> set[str]:
    """Names of the parameters that currently require a gradient."""
    return {n for n, p in model.named_parameters() if p.requires_grad}
