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

from transferkit.backbones._base import Backbone
from transferkit.errors import ConfigError
from transferkit.lora import is_lora_parameter
from transferkit.policies.freeze import _bn_param_names, _block_of, trainable_flags
from transferkit.policies.spec import Policy

HEAD = "head"
_NO_DECAY_RX = re.compile(r"(^|\.)(pos_embed|pos_embedding|cls_token|class_token|dist_token|reg_token|"
                          r"absolute_pos_embed|relative_position_bias_table)$")


def lr_multipliers(block_names: list[str], policy: Policy) -> dict[str, float]:
    """The lr multiplier of each block and of the head (``"head"``: always 1).

    Blocks are numbered 0 (stem) .. B-1, the head is B. ``discriminative=r``: ``r ** ((B - i) / B)``
    (geometric from ``r`` at the stem to 1 at the head, fastai's ``slice``); ``layer_decay=d``:
    ``d ** (B - i)`` (timm). Neither: 1 everywhere.

    Example:
        >>> lr_multipliers(["stem", "layer1"], Policy(unfreeze="all", layer_decay=0.5))
        {'stem': 0.25, 'layer1': 0.5, 'head': 1.0}
    """
    n = len(block_names)
    if policy.discriminative is not None:
        mult = [policy.discriminative ** ((n - i) / n) for i in range(n)]
    elif policy.layer_decay is not None:
        mult = [policy.layer_decay ** (n - i) for i in range(n)]
    else:
        mult = [1.0] * n
    return {**dict(zip(block_names, mult)), HEAD: 1.0}


def _no_decay(name: str, p: nn.Parameter, norm_names: set[str]) -> bool:
    return p.ndim <= 1 or name in norm_names or bool(_NO_DECAY_RX.search(name))


def _norm_param_names(module: nn.Module) -> set[str]:
    norms = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm)
    out = _bn_param_names(module)
    for mn, m in module.named_modules():
        if isinstance(m, norms) or "norm" in type(m).__name__.lower():
            out |= {f"{mn}.{pn}" if mn else pn for pn, _ in m.named_parameters(recurse=False)}
    return out


def param_groups(model: nn.Module, *, lr: float, weight_decay: float, backbone: Backbone | None = None,
                 policy: Policy | None = None, epochs: int = 1) -> list[dict[str, Any]]:
    """Optimizer groups: one per (block, decay / no decay), each with ``lr * multiplier``.

    Without ``backbone``/``policy``: the parameters of ``model`` that require a gradient now,
    one lr, weight decay on weights but not on biases and norm parameters. With them:
    every parameter of ``model.trunk`` that trains at some epoch in ``range(epochs)`` plus
    ``model.head``, each exactly once; group ``"name"`` is ``<block>`` or ``<block>/no_decay``
    and ``"lr_scale"`` its multiplier. No weight decay on biases, norm parameters and
    token/position embeddings (unless ``policy.decay_norm_bias``), none at all with L2-SP
    (the penalty replaces it).

    Example:
        >>> from transferkit import get_backbone, build_head
        >>> from transferkit.model import TransferModel, ImagePreprocess
        >>> bb = get_backbone("tk:small_cnn", weights=None)
        >>> m = TransferModel(ImagePreprocess((0.5,) * 3, (0.5,) * 3), bb.trunk, build_head(bb.num_features, 2))
        >>> groups = param_groups(m, lr=1e-3, weight_decay=0.01, backbone=bb, policy=Policy.parse("unfreeze:last=1"))
        >>> [g["name"] for g in groups]
        ['stage3', 'stage3/no_decay', 'head', 'head/no_decay']
    """
    if not (isinstance(lr, (int, float)) and lr > 0):
        raise ConfigError(f"lr must be a positive number, got {lr!r}.")
    if backbone is None or policy is None:
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        return _build(named, lambda n: HEAD, {HEAD: 1.0}, lr=lr, weight_decay=weight_decay,
                      norm_names=_norm_param_names(model), decay_all=False, plain=True)
    ever: dict[str, bool] = {}
    for e in range(max(int(epochs), 1)):
        for name, on in trainable_flags(model, backbone, policy, e).items():
            ever[name] = ever.get(name, False) or on
    named = [(f"trunk.{n}", p) for n, p in model.trunk.named_parameters() if ever[n]]
    named += [(f"head.{n}", p) for n, p in model.head.named_parameters()]
    mults = lr_multipliers(backbone.block_names, policy)

    def block(qualified: str) -> str:
        return HEAD if qualified.startswith("head.") else _block_of(backbone, qualified[len("trunk."):])

    wd = 0.0 if policy.l2sp is not None else weight_decay
    norm_names = {f"trunk.{n}" for n in _norm_param_names(model.trunk)} | {f"head.{n}" for n in _norm_param_names(model.head)}
    return _build(named, block, mults, lr=lr, weight_decay=wd, norm_names=norm_names,
                  decay_all=policy.decay_norm_bias, plain=False)


def _build(named, block_of, mults: dict[str, float], *, lr: float, weight_decay: float, norm_names: set[str],
           decay_all: bool, plain: bool) -> list[dict[str, Any]]:
    groups: dict[tuple[str, bool], dict[str, Any]] = {}
    for name, p in named:
        b = block_of(name)
        nd = not decay_all and _no_decay(name, p, norm_names) and not is_lora_parameter(name)
        g = groups.setdefault((b, nd), {"params": [], "lr": lr * mults[b], "weight_decay": 0.0 if nd else weight_decay,
                                        "name": b + ("/no_decay" if nd else ""), "lr_scale": mults[b]})
        g["params"].append(p)
    order = {b: i for i, b in enumerate(mults)}
    out = sorted(groups.values(), key=lambda g: (order[g["name"].split("/")[0]], g["name"]))
    if plain:
        for g in out:
            g["name"] = "no_decay" if "/" in g["name"] else "decay"
    return out
