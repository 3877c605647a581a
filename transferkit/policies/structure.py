"""What a policy needs to know of a backbone's structure: its BatchNorm parameters and the
block each trunk parameter belongs to (a LoRA-parametrized weight answers to its weight's name)."""

from __future__ import annotations

import re
from collections.abc import Callable

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from transferkit.backbones._base import Backbone
from transferkit.errors import PolicyError
from transferkit.policies.frozen_bn import tracks_statistics


def bn_param_names(trunk: nn.Module) -> set[str]:
    """The names of the BatchNorm gamma/beta parameters of ``trunk`` (and of InstanceNorm layers
    that track running statistics, which a policy treats as BatchNorm)."""
    return {f"{mn}.{pn}" if mn else pn for mn, m in trunk.named_modules()
            if isinstance(m, _BatchNorm) or tracks_statistics(m)
            for pn, _ in m.named_parameters(recurse=False)}


def has_batchnorm(backbone: Backbone) -> bool:
    """Whether the backbone's trainable blocks hold BatchNorm gamma/beta (what ``bn="affine"``
    trains in frozen blocks). A ViT has none; neither has a TorchScript trunk, whose compiled
    layers are not ``nn.BatchNorm*`` modules and sit in frozen blocks.

    Example:
        >>> from transferkit import get_backbone
        >>> has_batchnorm(get_backbone("tk:small_cnn", weights=None))
        True
    """
    trainable = set(backbone.block_names)
    return any(backbone.block_of(n) in trainable for n in bn_param_names(backbone.trunk))


def batchnorm_only_blocks(backbone: Backbone) -> tuple[str, ...]:
    """The blocks whose parameters are all BatchNorm gamma/beta (a DenseNet's final ``norm``):
    under ``bn="frozen"`` nothing in them trains.

    Example:
        >>> from transferkit import get_backbone
        >>> batchnorm_only_blocks(get_backbone("tv:densenet121", weights=None))
        ('norm',)
    """
    bn = bn_param_names(backbone.trunk)
    return _blocks_holding_only(backbone, lambda name: name in bn)


def idle_at_frozen_bn(backbone: Backbone) -> tuple[str, ...]:
    """The blocks whose parameters are each BatchNorm gamma/beta or fixed (`fixed_blocks`):
    under ``bn="frozen"`` no weight of theirs trains."""
    bn, fixed = bn_param_names(backbone.trunk), backbone.fixed or frozenset()
    return _blocks_holding_only(backbone, lambda name: name in bn or name in fixed)


def fixed_blocks(backbone: Backbone) -> tuple[str, ...]:
    """The blocks whose parameters all did not require gradients as the backbone was made
    (`Backbone.fixed`: a module frozen by an earlier run, given to `from_module`): a policy that
    unfreezes them trains none of their weights, so they stay frozen, in eval mode with their
    BatchNorm statistics kept (`transferkit.policies.training_blocks`)."""
    fixed = backbone.fixed or frozenset()
    return _blocks_holding_only(backbone, lambda name: name in fixed) if fixed else ()


def _blocks_holding_only(backbone: Backbone, test: Callable[[str], bool]) -> tuple[str, ...]:
    """The blocks of ``backbone`` with parameters, each of which passes ``test`` (by its name as
    the backbone was made: a LoRA-parametrized weight answers to its weight's)."""
    owned: dict[str, list[bool]] = {}
    for name, _ in backbone.trunk.named_parameters():
        name = PARAMETRIZED.sub(lambda m: f"{m.group(1)}{m.group(2)}", name)
        owned.setdefault(backbone.block_of(name), []).append(test(name))
    return tuple(b for b in backbone.block_names if owned.get(b) and all(owned[b]))


PARAMETRIZED = re.compile(r"(^|\.)parametrizations\.([^.]+)\.(original|\d+\..+)$")


def block_of(backbone: Backbone, name: str) -> str:
    """The block of a trunk parameter; a parametrized weight (LoRA) and its factors belong to the
    block of the weight (``a.parametrizations.weight.original`` -> ``a.weight``)."""
    name = PARAMETRIZED.sub(lambda m: f"{m.group(1)}{m.group(2)}", name)
    try:
        return backbone.block_of(name)
    except KeyError:
        raise PolicyError(f"Trunk parameter {name!r} belongs to none of the blocks {backbone.block_names}; the "
                          "backbone's block map does not cover its trunk (was the trunk changed after building?).") from None
