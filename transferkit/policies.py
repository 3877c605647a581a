"""Fine-tuning policies: which backbone blocks train, and how BatchNorm behaves.

Policies act on the backbone's named blocks (``stem, layer1 .. layer4`` for a ResNet,
``embed, blocks.0 .. blocks.11, norm`` for a ViT), so a policy means the same thing on
every architecture.

BatchNorm: a layer in a *frozen* block is always frozen entirely (eval-mode statistics,
no gradient): frozen means bit-for-bit unchanged. The policy's ``bn`` mode applies to
BatchNorm layers in *trainable* blocks:

- ``"train"`` (default): statistics update and gamma/beta train, as in plain PyTorch
  fine-tuning and timm's ``train.py``; the statistics adapt to the new data.
- ``"affine"``: statistics frozen, gamma/beta train (fastai's ``train_bn``).
- ``"frozen"``: statistics and gamma/beta frozen, eval-mode normalisation (Keras).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from transferkit.backbones._base import Backbone
from transferkit.errors import PolicyError, check_choice

BN_MODES = ("train", "affine", "frozen")
_ALIASES = {
    "feature_extraction": "none", "frozen": "none", "linear_probe": "none", "head": "none",
    "finetune": "all", "full": "all", "fine_tune": "all",
}


@dataclass(frozen=True)
class Policy:
    """A fine-tuning policy.

    ``unfreeze``: ``"none"`` (feature extraction: only the head trains), ``"all"``
    (full fine-tuning), an int N (the last N blocks), or a tuple of block names.
    ``bn``: the BatchNorm mode for trainable blocks (see the module docstring).

    Example:
        >>> Policy.parse("unfreeze:last=2,bn=affine")
        Policy(unfreeze=2, bn='affine')
    """

    unfreeze: str | int | tuple[str, ...] = "none"
    bn: str = "train"

    def __post_init__(self) -> None:
        check_choice("BatchNorm mode", self.bn, BN_MODES)
        u = self.unfreeze
        if isinstance(u, str) and u not in ("none", "all"):
            raise PolicyError(f"Policy.unfreeze must be 'none', 'all', an int or a tuple of block names, got {u!r}.")
        if isinstance(u, int) and (isinstance(u, bool) or u < 0):
            raise PolicyError(f"Policy.unfreeze=N needs N >= 0, got {u!r}.")
        if isinstance(u, list):
            object.__setattr__(self, "unfreeze", tuple(u))

    @classmethod
    def parse(cls, spec: str | Policy) -> Policy:
        """Parse a policy string: ``"feature_extraction"``, ``"finetune"``/``"full"``,
        ``"unfreeze:last=2"``, ``"unfreeze:blocks=layer3+layer4"``; options after a comma,
        e.g. ``",bn=affine"``."""
        if isinstance(spec, Policy):
            return spec
        if not isinstance(spec, str) or not spec.strip():
            raise PolicyError(f"A policy is a Policy object or a string such as 'feature_extraction', got {spec!r}.")
        head, *opts = [p.strip() for p in spec.split(",")]
        kw: dict[str, Any] = {}
        for opt in opts:
            key, _, value = opt.partition("=")
            if key != "bn" or not value:
                raise PolicyError(f"Unknown policy option {opt!r} in {spec!r}; valid: 'bn=train|affine|frozen'.")
            kw["bn"] = value
        if head in _ALIASES:
            return cls(_ALIASES[head], **kw)
        m = re.fullmatch(r"unfreeze:(last|blocks)=(.+)", head)
        if m and m.group(1) == "last" and m.group(2).isdigit():
            return cls(int(m.group(2)), **kw)
        if m and m.group(1) == "blocks":
            return cls(tuple(b for b in m.group(2).split("+") if b), **kw)
        raise PolicyError(f"Unknown policy {spec!r}. Valid: 'feature_extraction', 'finetune' (or 'full'), "
                          "'unfreeze:last=N', 'unfreeze:blocks=a+b', each optionally followed by ',bn=train|affine|frozen'.")

    def trainable_blocks(self, block_names: list[str], epoch: int = 0) -> list[str]:
        """The names of the blocks that train at ``epoch``."""
        u = self.unfreeze
        if u == "none":
            return []
        if u == "all":
            return list(block_names)
        if isinstance(u, int):
            return list(block_names[len(block_names) - u:]) if u else []
        unknown = [b for b in u if b not in block_names]
        if unknown:
            raise PolicyError(f"Unknown block(s) {unknown} in the policy; this backbone's blocks are {block_names}.")
        return [b for b in block_names if b in u]

    def frozen_throughout(self, block_names: list[str], epochs: int) -> bool:
        """True when no backbone block ever trains: features can then be computed once."""
        return all(not self.trainable_blocks(block_names, e) for e in range(max(epochs, 1)))


def _bn_modules(module: nn.Module):
    return [(n, m) for n, m in module.named_modules() if isinstance(m, _BatchNorm)]


def apply_policy(model: nn.Module, backbone: Backbone, policy: Policy, epoch: int = 0) -> None:
    """Set ``requires_grad`` on ``model.trunk`` as ``policy`` says at ``epoch``; the head always trains."""
    trainable = set(policy.trainable_blocks(backbone.block_names, epoch))
    for name, p in model.trunk.named_parameters():
        p.requires_grad_(backbone.block_of(name) in trainable)
    if policy.bn == "frozen":
        for name, m in _bn_modules(model.trunk):
            for p in m.parameters():
                p.requires_grad_(False)
    for p in model.head.parameters():
        p.requires_grad_(True)


def set_train_mode(model: nn.Module, backbone: Backbone, policy: Policy, epoch: int = 0) -> None:
    """``model.train()``, then eval mode for everything that must not change: frozen
    blocks (all their modules, so their BatchNorm statistics stay put and dropout is off)
    and BatchNorm layers in trainable blocks when ``policy.bn`` freezes statistics."""
    model.train()
    trainable = set(policy.trainable_blocks(backbone.block_names, epoch))
    if not trainable:
        model.trunk.eval()
        return
    for block in backbone.blocks:
        if block.name in trainable:
            continue
        for name, m in model.trunk.named_modules():
            if name and block.owns(name):
                m.eval()
    if policy.bn in ("affine", "frozen"):
        for _, m in _bn_modules(model.trunk):
            m.eval()
    for name, m in _bn_modules(model.trunk):  # BN owned by no block (rare) follows the policy too
        if not any(b.owns(name) for b in backbone.blocks) and policy.bn != "train":
            m.eval()


def trainable_parameter_names(model: nn.Module) -> set[str]:
    """Names of the parameters that currently require a gradient."""
    return {n for n, p in model.named_parameters() if p.requires_grad}


def param_groups(model: nn.Module, *, lr: float, weight_decay: float) -> list[dict[str, Any]]:
    """Optimizer groups over the trainable parameters: weight decay on weights of
    linear/conv layers, none on biases and normalisation parameters (1-d tensors)."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    groups = [{"params": decay, "lr": lr, "weight_decay": weight_decay},
              {"params": no_decay, "lr": lr, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]
