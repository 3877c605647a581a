"""Optimizer parameter groups: learning rate per block, weight decay per kind of parameter.

With a backbone and a policy, the groups hold every parameter that trains at *some*
epoch of the run, created once at the start. Gradual unfreezing then only toggles
``requires_grad``: a parameter that is still frozen gets no gradient (``grad is None``),
and SGD, Adam and AdamW skip such parameters entirely (no update, no weight decay, no
optimizer state), so it enters training at its milestone with fresh Adam moments. Since
the groups never change, any per-group schedule (cosine, one-cycle with ``max_lr`` per
group, warmup) covers every group from step 0, and an optimizer/scheduler ``state_dict``
saved mid-run loads into the optimizer built the same way: the policy itself has no
state (what trains is a function of the epoch).
"""

from __future__ import annotations

import re
from typing import Any

from torch import nn

from transferkit.backbones._base import HEAD, Backbone, Block
from transferkit.errors import ConfigError, PolicyError
from transferkit.lora import has_lora, is_lora_parameter
from transferkit.policies.freeze import trainable_flags
from transferkit.policies.structure import PARAMETRIZED, block_of, bn_param_names
from transferkit.policies.spec import Policy, run_epochs

_NO_DECAY_RX = re.compile(r"(^|\.)(pos_embed|pos_embedding|cls_token|class_token|dist_token|reg_token|"
                          r"absolute_pos_embed|relative_position_bias_table)$")
_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


def lr_multipliers(block_names: list[str], policy: Policy) -> dict[str, float]:
    """The lr multiplier of each block and of the head (``"head"``: always 1), for
    ``discriminative=r`` or no per-block rate.

    Blocks are numbered 0 (stem) .. B-1, the head is B. ``discriminative=r``: ``r ** ((B - i) / B)``
    (geometric from ``r`` at the stem to 1 at the head, fastai's ``slice``). Neither: 1
    everywhere. ``layer_decay`` scales *layers*, not blocks: see `lr_scales`.

    Example:
        >>> lr_multipliers(["stem", "layer1"], Policy(unfreeze="all", discriminative=0.25))
        {'stem': 0.25, 'layer1': 0.5, 'head': 1.0}
    """
    if policy.layer_decay is not None:
        raise PolicyError(f"layer_decay={policy.layer_decay} scales timm's layers, which are finer than blocks "
                          "(one per residual block of a ResNet stage): use lr_scales(model, backbone, policy) for "
                          "the multiplier of every parameter.")
    n = len(block_names)
    if policy.discriminative is not None:
        mult = [policy.discriminative ** ((n - i) / n) for i in range(n)]
    else:
        mult = [1.0] * n
    return {**dict(zip(block_names, mult)), HEAD: 1.0}


# ---------------------------------------------------------------- layers for layer decay

class _Names:
    """Quacks like a module for ``timm.models.group_parameters``: only names are needed."""

    def __init__(self, names: list[str]) -> None:
        self.names = names

    def named_parameters(self):
        return ((n, None) for n in self.names)


def _plain_name(name: str) -> str:
    """A LoRA-parametrized weight and its factors answer to the weight's own name."""
    return PARAMETRIZED.sub(lambda m: f"{m.group(1)}{m.group(2)}", name)


def _timm_layer_ids(trunk: nn.Module, matcher: Any) -> tuple[dict[str, int], int]:
    """timm's own numbering: ``group_parameters(model, model.group_matcher(coarse=False))``, with
    the classifier (absent from a ``num_classes=0`` trunk) placed where timm places it."""
    from timm.models import group_parameters

    classifier = (getattr(trunk, "pretrained_cfg", None) or {}).get("classifier") or HEAD
    classifier = classifier if isinstance(classifier, str) else classifier[0]
    head_probe = f"{classifier}.weight"
    names = [n for n, _ in trunk.named_parameters()]
    ids = group_parameters(_Names([_plain_name(n) for n in names] + [head_probe]), matcher, reverse=True)
    return {n: ids[_plain_name(n)] for n in names}, ids[head_probe]


def _has_params(m: nn.Module) -> bool:
    return any(True for _ in m.parameters())


def _homogeneous_units(mods: list[nn.Module]) -> bool:
    """Residual units: modules of one class that are neither containers nor single layers
    (each holds sub-layers with parameters, LoRA's ``parametrizations`` aside)."""
    if not mods or len({type(m) for m in mods}) != 1 or isinstance(mods[0], _CONTAINERS):
        return False
    return all(any(_has_params(c) for n, c in m.named_children() if n != "parametrizations") for m in mods)


def _units(trunk: nn.Module, block: Block) -> list[list[str]] | None:
    """The residual units a block is made of, each as the module names of one layer: the
    children of a member that is a stage (a Sequential/ModuleList/ModuleDict of units, such
    as a ResNet's ``layer1`` -> ``layer1.0``, ``layer1.1``), the other members joining the
    unit next to them (a ConvNeXt stage's downsampling joins its first block, a DenseNet
    transition the last dense layer, as timm groups them); else two or more members that are
    themselves units (MobileNet's inverted residuals); else None (the block is one layer)."""
    members = []
    for name in block.members:
        try:
            members.append((name, trunk.get_submodule(name)))
        except AttributeError:
            return None  # a member naming a parameter: the block is one layer
    members = [(n, m) for n, m in members if _has_params(m)]
    layers: list[list[str]] = []
    pending: list[str] = []
    for name, m in members:
        kids = [(f"{name}.{c}", k) for c, k in m.named_children() if _has_params(k)]
        if isinstance(m, _CONTAINERS) and _homogeneous_units([k for _, k in kids]):
            for i, (kid, _) in enumerate(kids):
                layers.append((pending if i == 0 else []) + [kid])
            pending = []
        else:
            pending.append(name)
    if layers:
        layers[-1] += pending
        return layers if len(layers) > 1 else None
    if len(members) >= 2 and _homogeneous_units([m for _, m in members]):
        return [[n] for n, _ in members]
    return None


def _block_layer_ids(trunk: nn.Module, backbone: Backbone) -> tuple[dict[str, int], int]:
    """Layers of a trunk without a timm ``group_matcher``, by timm's rules on the backbone's
    blocks: one layer per block, one per residual unit of a block made of them (see
    `_units`), a final block of norm parameters only shares the layer before it."""
    norm_names = _norm_param_names(trunk)
    params: dict[str, list[str]] = {b.name: [] for b in backbone.blocks}
    for n, _ in trunk.named_parameters():
        b = block_of(backbone, n)
        if b in params:
            params[b].append(n)
    ids: dict[str, int] = {}
    layer = -1
    blocks = [b for b in backbone.blocks if params[b.name]]
    for i, blk in enumerate(blocks):
        names = params[blk.name]
        if i == len(blocks) - 1 and i > 0 and all(n in norm_names for n in names):
            ids.update({n: layer for n in names})  # a final norm: timm's MATCH_PREV_GROUP
            continue
        units = _units(trunk, blk) or [[]]
        first = layer + 1
        layer += len(units)
        for n in names:
            plain = _plain_name(n)
            ids[n] = first + next((i for i, unit in enumerate(units)
                                   if any(plain == u or plain.startswith(u + ".") for u in unit)), 0)
    for n, _ in trunk.named_parameters():
        ids.setdefault(n, 0)  # frozen blocks (a TorchScript extractor) never train: their layer is unused
    return ids, layer + 1


def layer_ids(model: nn.Module, backbone: Backbone) -> tuple[dict[str, int], int]:
    """``({trunk parameter name: layer}, head layer)``: the layers ``layer_decay`` counts.

    A trunk with a timm ``group_matcher`` (every timm model) is numbered exactly as
    ``timm.optim.param_groups_layer_decay`` numbers it: ``group_matcher(coarse=False)``, so one
    layer per ViT block (the final norm shares the last block's), per ResNet residual block,
    per EfficientNet block ...; the head is the last layer. Other trunks: see
    ``docs/policies.md`` (blocks, split into residual units; a final norm shares the last layer).

    Example:
        >>> from transferkit import get_backbone, build_head
        >>> from transferkit.model import TransferModel, ImagePreprocess
        >>> bb = get_backbone("tk:small_cnn", weights=None)
        >>> m = TransferModel(ImagePreprocess((0.5,) * 3, (0.5,) * 3), bb.trunk, build_head(bb.num_features, 2))
        >>> ids, head = layer_ids(m, bb)
        >>> ids["stem.0.weight"], ids["stage3.0.0.weight"], head
        (0, 3, 4)
    """
    trunk = model.trunk
    if hasattr(trunk, "group_matcher"):
        try:
            matcher = trunk.group_matcher(coarse=False)
        except (NotImplementedError, AssertionError, TypeError, AttributeError):
            matcher = None  # a matcher timm itself cannot use: number by blocks
        if matcher is not None:
            return _timm_layer_ids(trunk, matcher)
    return _block_layer_ids(trunk, backbone)


def lr_scales(model: nn.Module, backbone: Backbone, policy: Policy) -> dict[str, float]:
    """The lr multiplier of every parameter of ``model.trunk`` and ``model.head``
    (``"trunk.<name>"``, ``"head.<name>"``), as `param_groups` applies it.

    ``discriminative=r``: the multiplier of the parameter's block (`lr_multipliers`).
    ``layer_decay=d``: ``d ** (L - l)`` for a parameter of layer ``l`` when the head is layer
    ``L`` (`layer_ids`), which is timm's ``param_groups_layer_decay`` lr_scale.

    Example:
        >>> from transferkit import get_backbone, build_head
        >>> from transferkit.model import TransferModel, ImagePreprocess
        >>> bb = get_backbone("tk:small_cnn", weights=None)
        >>> m = TransferModel(ImagePreprocess((0.5,) * 3, (0.5,) * 3), bb.trunk, build_head(bb.num_features, 2))
        >>> s = lr_scales(m, bb, Policy(unfreeze="all", layer_decay=0.5))
        >>> s["trunk.stem.0.weight"], s["trunk.stage3.0.0.weight"], s["head.0.weight"]
        (0.0625, 0.5, 1.0)
    """
    trunk_names = [n for n, _ in model.trunk.named_parameters()]
    out: dict[str, float]
    if policy.layer_decay is not None:
        ids, head = layer_ids(model, backbone)
        top = max([head, *ids.values()])
        out = {f"trunk.{n}": policy.layer_decay ** (top - ids[n]) for n in trunk_names}
        head_scale = policy.layer_decay ** (top - head)
    else:
        mult = lr_multipliers(backbone.block_names, policy)
        out = {f"trunk.{n}": mult.get(block_of(backbone, n), 1.0) for n in trunk_names}
        head_scale = 1.0
    out.update({f"head.{n}": head_scale for n, _ in model.head.named_parameters()})
    return out


# ---------------------------------------------------------------- groups

def _no_decay(name: str, p: nn.Parameter, norm_names: set[str]) -> bool:
    return p.ndim <= 1 or name in norm_names or bool(_NO_DECAY_RX.search(name))


def _norm_param_names(module: nn.Module) -> set[str]:
    norms = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm)
    out = bn_param_names(module)
    for mn, m in module.named_modules():
        if isinstance(m, norms) or "norm" in type(m).__name__.lower():
            out |= {f"{mn}.{pn}" if mn else pn for pn, _ in m.named_parameters(recurse=False)}
    return out


def param_groups(model: nn.Module, *, lr: float, weight_decay: float, backbone: Backbone | None = None,
                 policy: Policy | None = None, epochs: int | None = None) -> list[dict[str, Any]]:
    """Optimizer groups: one per (block, decay / no decay), each with ``lr * multiplier``.

    With ``backbone`` and ``policy``: every parameter of ``model.trunk`` that trains at some
    epoch in ``range(epochs)`` plus ``model.head``, each exactly once (``epochs``, the run's,
    is needed where the blocks that train change from one epoch to the next: a gradual or
    ``fine_tune`` policy, for which leaving it out is a ConfigError, since the groups would
    leave out what later epochs unfreeze) (a LoRA policy needs its
    factors in the trunk first: call `apply_policy` before, else PolicyError); group ``"name"`` is
    ``<block>`` or ``<block>/no_decay`` (with ``layer_decay``, a block spanning several layers
    has one group per layer: ``layer1.0``, ``layer1.1`` ...) and ``"lr_scale"`` its multiplier
    (`lr_scales`). No weight decay on biases, norm parameters and token/position
    embeddings (unless ``policy.decay_norm_bias``), none at all with L2-SP (the penalty
    replaces it).

    With ``policy`` alone, ``model`` is the head trained on cached features: its parameters
    that require a gradient, in groups ``head`` / ``head/no_decay`` (lr_scale 1) with the
    policy's weight-decay rules (none with L2-SP, ``decay_norm_bias`` honoured).

    With neither: the parameters of ``model`` that require a gradient now, one lr, weight
    decay on weights but not on biases and norm parameters (groups ``decay``/``no_decay``).

    Example:
        >>> from transferkit import get_backbone, build_head
        >>> from transferkit.model import TransferModel, ImagePreprocess
        >>> bb = get_backbone("tk:small_cnn", weights=None)
        >>> m = TransferModel(ImagePreprocess((0.5,) * 3, (0.5,) * 3), bb.trunk, build_head(bb.num_features, 2))
        >>> groups = param_groups(m, lr=1e-3, weight_decay=0.01, backbone=bb, policy=Policy.parse("unfreeze:last=1"))
        >>> [g["name"] for g in groups]
        ['stage3', 'stage3/no_decay', 'head', 'head/no_decay']
        >>> [g["weight_decay"] for g in param_groups(m.head, lr=1e-2, weight_decay=0.01, policy=Policy(l2sp=0.1))]
        [0.0, 0.0]
    """
    if not (isinstance(lr, (int, float)) and lr > 0):
        raise ConfigError(f"lr must be a positive number, got {lr!r}.")
    if backbone is not None and policy is None:
        raise ConfigError("param_groups(backbone=...) also needs policy=...: the policy says which blocks train "
                          "and at which rate.")
    if backbone is None:
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if policy is None:
            return _build(named, lambda n: (HEAD, 0, 1.0), lr=lr, weight_decay=weight_decay,
                          norm_names=_norm_param_names(model), decay_all=False, plain=True)
        trunk = getattr(model, "trunk", None)
        if isinstance(trunk, nn.Module) and any(p.requires_grad for p in trunk.parameters()):
            raise ConfigError("param_groups(model, policy=...) without backbone= is for the head alone (cached "
                              "features), but this model has a trunk that trains: pass backbone=... too.")
        wd = 0.0 if policy.l2sp is not None else weight_decay
        return _build(named, lambda n: (HEAD, 0, 1.0), lr=lr, weight_decay=wd, norm_names=_norm_param_names(model),
                      decay_all=policy.decay_norm_bias, plain=False)
    if policy.lora is not None and not has_lora(model.trunk):
        raise PolicyError(f"The policy {str(policy)!r} trains LoRA factors, but model.trunk has none yet, so the "
                          "groups would leave them out of the optimizer: call apply_policy(model, backbone, policy) "
                          "first (it adds the factors), then param_groups.")
    if epochs is None:
        if policy.is_gradual or policy.frozen_epochs:
            raise ConfigError(f"param_groups(backbone=..., policy={str(policy)!r}) needs epochs= (the run's number of "
                              "epochs): this policy unfreezes blocks after the first epoch, and groups built for one "
                              "epoch would leave them out of the optimizer (they would never train).")
        epochs = 1
    ever: dict[str, bool] = {}
    for e in range(run_epochs(epochs)):
        for name, on in trainable_flags(model, backbone, policy, e).items():
            ever[name] = ever.get(name, False) or on
    named = [(f"trunk.{n}", p) for n, p in model.trunk.named_parameters() if ever[n]]
    named += [(f"head.{n}", p) for n, p in model.head.named_parameters()]
    scales = lr_scales(model, backbone, policy)
    keys = _group_keys(model, backbone, policy)

    def key(qualified: str) -> tuple[str, int, float]:
        return (*keys[qualified], scales[qualified])

    wd = 0.0 if policy.l2sp is not None else weight_decay
    norm_names = {f"trunk.{n}" for n in _norm_param_names(model.trunk)} | {f"head.{n}" for n in _norm_param_names(model.head)}
    return _build(named, key, lr=lr, weight_decay=wd, norm_names=norm_names, decay_all=policy.decay_norm_bias,
                  plain=False)


def _group_keys(model: nn.Module, backbone: Backbone, policy: Policy) -> dict[str, tuple[str, int]]:
    """``{qualified parameter name: (group name, order)}``: the block (and, with ``layer_decay``,
    the layer inside a block that spans several: ``layer1.0``), ordered stem to head."""
    order = {b: i for i, b in enumerate([*backbone.block_names, *(b.name for b in backbone.frozen)])}
    trunk_names = [n for n, _ in model.trunk.named_parameters()]
    blocks = {n: block_of(backbone, n) for n in trunk_names}
    out: dict[str, tuple[str, int]] = {}
    if policy.layer_decay is not None:
        ids, _ = layer_ids(model, backbone)
        per_block: dict[str, list[int]] = {}
        for n in trunk_names:
            per_block.setdefault(blocks[n], [])
            if ids[n] not in per_block[blocks[n]]:
                per_block[blocks[n]].append(ids[n])
        for n in trunk_names:
            b, layers = blocks[n], sorted(per_block[blocks[n]])
            name = b if len(layers) == 1 else f"{b}.{layers.index(ids[n])}"
            out[f"trunk.{n}"] = (name, order[b] * 10_000 + layers.index(ids[n]))
    else:
        out = {f"trunk.{n}": (blocks[n], order[blocks[n]] * 10_000) for n in trunk_names}
    out.update({f"head.{n}": (HEAD, len(order) * 10_000) for n, _ in model.head.named_parameters()})
    return out


def _build(named, key_of, *, lr: float, weight_decay: float, norm_names: set[str], decay_all: bool,
           plain: bool) -> list[dict[str, Any]]:
    """Groups over ``named`` parameters; ``key_of(name) -> (group name, order, lr scale)``."""
    groups: dict[tuple[str, bool], dict[str, Any]] = {}
    orders: dict[tuple[str, bool], int] = {}
    for name, p in named:
        b, rank, scale = key_of(name)
        nd = not decay_all and _no_decay(name, p, norm_names) and not is_lora_parameter(name)
        g = groups.setdefault((b, nd), {"params": [], "lr": lr * scale, "weight_decay": 0.0 if nd else weight_decay,
                                        "name": b + ("/no_decay" if nd else ""), "lr_scale": scale})
        if g["lr_scale"] != scale:
            raise PolicyError(f"Parameters of group {g['name']!r} have different lr multipliers "
                              f"({g['lr_scale']} and {scale}, at {name!r}); this is a bug in transferkit's grouping.")
        orders[(b, nd)] = rank
        g["params"].append(p)
    out = [groups[k] for k in sorted(groups, key=lambda k: (orders[k], k[1]))]
    if plain:
        for g in out:
            g["name"] = "no_decay" if "/" in g["name"] else "decay"
    return out
