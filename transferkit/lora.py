"""LoRA (Hu et al. 2021): low-rank updates ``W + (alpha / r) * B @ A`` on linear weights.

The factors are attached with `torch.nn.utils.parametrize`, so every access to the
weight sees the adapted value. That is what makes LoRA work on torchvision's ViT: its
``nn.MultiheadAttention`` never calls ``out_proj.forward`` and keeps the q/k/v projection
as a bare ``in_proj_weight`` parameter; both are read as tensors, and a parametrization
adapts them where a wrapper module could not. Targets:

- every ``nn.Linear`` (including ``MultiheadAttention.out_proj``) whose qualified name
  matches the pattern, e.g. timm's ``blocks.0.attn.qkv``, ``blocks.0.mlp.fc1``;
- the packed ``in_proj_weight`` of an ``nn.MultiheadAttention`` whose name + ``".in_proj"``
  matches (one rank-r update of the [3E, E] q/k/v weight, as timm's ``qkv`` Linear gets).

A parametrized module is not scriptable: `merge_lora` returns a plain copy with
the factors folded into the weights (same state-dict keys as before LoRA), which is what
gets exported.
"""

from __future__ import annotations

import copy
import math
import re

import torch
from torch import nn
from torch.nn.utils import parametrize

from transferkit.errors import PolicyError, WeightsError, warn


class LoRADelta(nn.Module):
    """The parametrization ``W -> W + scale * B @ A``; ``B`` starts at zero, so the
    adapted model equals the pretrained one until the first step. ``scale`` (``alpha / r``)
    is in the state dict too (``lora_scale``, float64 as `add_lora` attaches it), so that a
    checkpoint of an unmerged model can be folded into plain weights without knowing the
    run's policy (`fold_lora_state`)."""

    def __init__(self, out_features: int, in_features: int, *, rank: int, alpha: float) -> None:
        super().__init__()
        self.lora_A = nn.Parameter(torch.empty(rank, in_features))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.scale = float(alpha) / rank
        self.register_buffer("lora_scale", torch.tensor(self.scale, dtype=torch.float64))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[no-untyped-def]
        stored = state_dict.get(prefix + "lora_scale")
        if stored is None:  # written before the scale was stored: keep this one's
            state_dict[prefix + "lora_scale"] = self.lora_scale
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if stored is not None and stored.dtype == torch.float64:  # exact (a model cast to bf16 rounded its copy)
            self.scale = float(stored)
        self.lora_scale = torch.tensor(self.scale, dtype=torch.float64, device=self.lora_scale.device)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + (self.lora_B @ self.lora_A).to(weight.dtype) * self.scale


def lora_targets(module: nn.Module, pattern: str) -> list[tuple[str, nn.Module, str]]:
    """``(display name, owner module, parameter name)`` of every weight LoRA can adapt
    whose display name matches ``pattern`` (``re.search``)."""
    rx = re.compile(pattern)
    found = []
    for name, m in module.named_modules():
        if isinstance(m, nn.Linear):
            found.append((name, m, "weight"))
        elif isinstance(m, nn.MultiheadAttention) and m.in_proj_weight is not None:
            found.append((f"{name}.in_proj", m, "in_proj_weight"))
    return [t for t in found if rx.search(t[0])]


def add_lora(module: nn.Module, *, rank: int, alpha: float | None = None,
             targets: str = r"attn|attention|mlp") -> list[str]:
    """Attach rank-``rank`` LoRA factors, in place, to the linear weights of ``module``
    whose names match ``targets``; return their names. Does not change requires_grad.

    Example:
        >>> import torch
        >>> m = nn.Sequential(nn.Linear(4, 4))
        >>> add_lora(m, rank=2, targets="0")
        ['0']
        >>> torch.equal(m(torch.ones(1, 4)), merge_lora(m)(torch.ones(1, 4)))
        True
    """
    if has_lora(module):
        raise PolicyError("This model already has LoRA factors; add them once (merge_lora gives a plain copy).")
    found = lora_targets(module, targets)
    if not found:
        names = [n for n, _, _ in lora_targets(module, ".*")]
        raise PolicyError(f"LoRA: no linear layer matches targets={targets!r}. Layers LoRA can adapt here: "
                          f"{names[:10]}{' ...' if len(names) > 10 else ''}"
                          f"{'' if names else ' (none: LoRA needs nn.Linear or nn.MultiheadAttention layers)'}.")
    shapes = [tuple(getattr(owner, pname).shape) for _, owner, pname in found]
    over = [(o, i) for o, i in shapes if rank * (o + i) >= o * i]  # factors [r, in] and [out, r] vs the weight
    if over:
        o, i = min(over, key=lambda s: s[0] * s[1])
        warn(f"LoRA rank {rank}: on {len(over)} of the {len(shapes)} adapted weights its factors hold as many "
             f"numbers as the weight or more (e.g. {o}x{i}: {rank * (o + i):,} vs {o * i:,}), so LoRA saves nothing "
             f"there{', and its update can be of full rank' if rank >= min(o, i) else ''}. Its rank is meant to be a "
             f"small fraction of the weights' sides (commonly 4 to 64): lower r, or train those layers fully "
             f"(unfreeze or full).")
    for _, owner, pname in found:
        w = getattr(owner, pname)
        delta = LoRADelta(w.shape[0], w.shape[1], rank=rank, alpha=rank if alpha is None else alpha)
        delta = delta.to(device=w.device, dtype=w.dtype)
        delta.lora_scale = torch.tensor(delta.scale, dtype=torch.float64, device=w.device)  # exact, as .to() made it
        parametrize.register_parametrization(owner, pname, delta)
    return [n for n, _, _ in found]


def check_lora(module: nn.Module, *, rank: int, alpha: float | None = None,
               targets: str = r"attn|attention|mlp") -> None:
    """A `PolicyError` when the LoRA factors ``module`` holds are not those `add_lora` with
    these settings attaches (another rank, alpha or set of layers): a second LoRA policy
    applied to one model would train the first one's factors."""
    held: dict[str, tuple[int, float]] = {}
    for name, m in module.named_modules():
        for pname, chain in (getattr(m, "parametrizations", None) or {}).items():
            for delta in chain:
                if isinstance(delta, LoRADelta):
                    held[name if pname == "weight" else f"{name}.in_proj"] = (int(delta.lora_A.shape[0]), delta.scale)
    want = {n for n, _, _ in lora_targets(module, targets)}
    scale = float(rank if alpha is None else alpha) / rank
    if set(held) != want or any(r != rank or not math.isclose(sc, scale) for r, sc in held.values()):
        ranks = sorted({r for r, _ in held.values()})
        first = sorted(held)[:3]
        raise PolicyError(f"This model already holds LoRA factors (rank {'/'.join(map(str, ranks))} on "
                          f"{len(held)} layers: {', '.join(first)}{' ...' if len(held) > 3 else ''}) that are not "
                          f"the policy's (rank {rank}, alpha {rank if alpha is None else alpha}, targets "
                          f"{targets!r}: {len(want)} layers). A model takes one LoRA policy: build it again for "
                          "another, or start from merge_lora(model) to adapt the merged weights.")


def has_lora(module: nn.Module) -> bool:
    """True when some submodule of ``module`` carries LoRA factors."""
    return any(isinstance(m, LoRADelta) for m in module.modules())


def is_lora_parameter(name: str) -> bool:
    """True for the qualified name of a LoRA factor."""
    return name.endswith((".lora_A", ".lora_B"))


def merge_lora(module: nn.Module) -> nn.Module:
    """A copy of ``module`` with every LoRA factor folded into its weight (plain modules,
    scriptable, the state-dict keys of the model before LoRA). ``module`` is unchanged;
    a module without LoRA is returned as is.

    Example:
        >>> merge_lora(nn.Linear(2, 2)).weight.shape
        torch.Size([2, 2])
    """
    if not has_lora(module):
        return module
    merged = copy.deepcopy(module)
    for m in list(merged.modules()):
        if parametrize.is_parametrized(m):
            _fold(m)
    return merged


_PARAMETRIZED = re.compile(r"^(?P<owner>.*?)\.?parametrizations\.(?P<name>[^.]+)\.original$")


def fold_lora_state(state: dict[str, torch.Tensor], *, source: str = "The weights") -> dict[str, torch.Tensor]:
    """A state dict of a model with LoRA factors (a checkpoint written while a LoRA run trained)
    as the state dict of the model without them: each adapted weight ``W + scale * B @ A``
    under its plain key, as `merge_lora` gives. A state dict without LoRA is returned as is.

    Example:
        >>> m = nn.Sequential(nn.Linear(2, 2))
        >>> _ = add_lora(m, rank=1, targets="0")
        >>> sorted(fold_lora_state(m.state_dict()))
        ['0.bias', '0.weight']
    """
    if not any(k.endswith(".lora_A") for k in state):
        return state
    out = dict(state)
    for key in [k for k in state if _PARAMETRIZED.match(k)]:
        m = _PARAMETRIZED.match(key)
        owner, name = m["owner"], m["name"]
        delta = f"{owner}.parametrizations.{name}.0." if owner else f"parametrizations.{name}.0."
        if delta + "lora_scale" not in state:
            raise WeightsError(f"{source} hold LoRA factors without their scale (written by an earlier transferkit): "
                               "finish the run with transferkit.resume(path), and use the model it returns.")
        w = state[key]
        a, b, scale = state[delta + "lora_A"], state[delta + "lora_B"], float(state[delta + "lora_scale"])
        out[f"{owner}.{name}" if owner else name] = w + (b.float() @ a.float()).to(w.dtype) * scale
        for k in (key, delta + "lora_A", delta + "lora_B", delta + "lora_scale"):
            del out[k]
    return out


def _fold(m: nn.Module) -> None:
    """Replace the parametrized tensors of ``m`` (a deep copy) by plain parameters holding their
    current value. ``parametrize.remove_parametrizations`` cannot be used on a copy: the copy
    shares its dynamically made class with the original, and removing the property from that
    class would break the original."""
    plists = m.parametrizations
    if not all(isinstance(p, LoRADelta) for name in plists for p in plists[name]):
        raise PolicyError(f"Cannot merge LoRA into {type(m).__name__}: it carries other parametrizations too.")
    with torch.no_grad():
        values = {name: nn.Parameter(getattr(m, name).detach().clone(), requires_grad=plists[name].original.requires_grad)
                  for name in plists}
    m.__class__ = m.__class__.__bases__[0]  # the module's own class, without the properties
    del m._modules["parametrizations"]
    m._parameters = {**values, **m._parameters}  # weights first, as nn.Linear and MultiheadAttention register them
