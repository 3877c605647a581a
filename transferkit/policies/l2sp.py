"""L2-SP (Li, Grandvalet & Davoine, ICML 2018): keep fine-tuned weights near the pretrained ones.

``penalty = alpha/2 * sum ||w - w0||^2`` over the pretrained trunk parameters that
currently train ``+ beta/2 * sum ||v||^2`` over the new weights (the head's weight
matrices and the LoRA factors; biases are not penalised). ``w0`` is a copy taken when the
penalty is built, so it must be built from the pretrained model, after ``.to(device)``.
The penalty is zero at the start for the pretrained part; its gradient
``alpha * (w - w0)`` points away from ``w0``, so a descent step moves toward it.
Plain weight decay pulls toward 0 instead, contradicting it: with L2-SP the optimizer
groups get no weight decay.
"""

from __future__ import annotations

import torch
from torch import nn

from transferkit.backbones._base import Backbone
from transferkit.lora import is_lora_parameter
from transferkit.policies.freeze import trainable_flags
from transferkit.policies.spec import Policy, run_epochs


class L2SP:
    """A callable returning the L2-SP penalty of ``model`` (a module with ``trunk`` and ``head``).

    ``anchor``: the trunk parameter names pulled toward their current values (default: all
    but LoRA factors). Only those that require a gradient at call time count.

    Example:
        >>> from transferkit import get_backbone, build_head
        >>> from transferkit.model import TransferModel, ImagePreprocess
        >>> bb = get_backbone("tk:small_cnn", weights=None)
        >>> m = TransferModel(ImagePreprocess((0.5,) * 3, (0.5,) * 3), bb.trunk, build_head(bb.num_features, 2))
        >>> reg = L2SP(m, alpha=0.1, beta=0.0)
        >>> float(reg().detach())
        0.0
    """

    def __init__(self, model: nn.Module, *, alpha: float, beta: float = 0.01, anchor: set[str] | None = None) -> None:
        self.model, self.alpha, self.beta = model, float(alpha), float(beta)
        self.reference = {n: p.detach().clone() for n, p in model.trunk.named_parameters()
                          if not is_lora_parameter(n) and (anchor is None or n in anchor)}

    def sp_term(self) -> torch.Tensor:
        """``sum ||w - w0||^2`` over the anchored trunk parameters that require a gradient."""
        terms = [(p - self.reference[n]).pow(2).sum() for n, p in self.model.trunk.named_parameters()
                 if p.requires_grad and n in self.reference]
        return torch.stack(terms).sum() if terms else self._zero()

    def new_term(self) -> torch.Tensor:
        """``sum ||v||^2`` over the head's weight matrices and the LoRA factors."""
        terms = [p.pow(2).sum() for p in self.model.head.parameters() if p.requires_grad and p.ndim >= 2]
        terms += [p.pow(2).sum() for n, p in self.model.trunk.named_parameters() if is_lora_parameter(n)]
        return torch.stack(terms).sum() if terms else self._zero()

    def _zero(self) -> torch.Tensor:
        return torch.zeros((), device=next(self.model.parameters()).device)

    def __call__(self) -> torch.Tensor:
        return 0.5 * self.alpha * self.sp_term() + 0.5 * self.beta * self.new_term()


def policy_penalty(model: nn.Module, backbone: Backbone, policy: Policy, *, epochs: int = 1) -> L2SP | None:
    """The L2-SP penalty the policy asks for (``None`` without ``l2sp``), anchoring only the
    trunk parameters that train at some epoch of the run (frozen ones need no copy).
    Call it after [`apply_policy`][transferkit.apply_policy] (LoRA factors exist) and after ``.to(device)``."""
    if policy.l2sp is None:
        return None
    ever: set[str] = set()
    for e in range(run_epochs(epochs)):
        ever |= {n for n, on in trainable_flags(model, backbone, policy, e).items() if on}
    return L2SP(model, alpha=policy.l2sp, beta=policy.l2sp_beta, anchor=ever)
