"""The Run: the live objects of a fine-tuning run, built from its decisions.

[`build`][transferkit.run.build] takes the [`Decisions`][transferkit.Decisions] and the
[`Inputs`][transferkit.facts.Inputs] that looking loaded (the run's own backbone copy and
the datasets) and makes the model (preprocessing + trunk + the decided head, the policy
applied, moved to the device and layout), the loss and the run-time speed settings. The
steps ([`transferkit.steps`][transferkit.steps]) read the decisions and use the run; they
reassign neither.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from transferkit.backbones import Backbone
from transferkit.data import DataBundle
from transferkit.data.sampling import seed_everything
from transferkit.decisions import Decisions
from transferkit.errors import TransferkitError
from transferkit.facts import Inputs
from transferkit.model import TransferModel, build_model
from transferkit.policies import apply_policy, param_groups
from transferkit.train.distributed import DistInfo
from transferkit.train.speed import SpeedConfig
from transferkit.train.tasks import make_loss


@dataclass(frozen=True)
class Run:
    """The live objects of a run (see the module docstring)."""

    backbone: Backbone  # the run's own copy (its trunk is model.trunk)
    bundle: DataBundle
    model: TransferModel
    loss_fn: nn.Module
    speed: SpeedConfig  # the training loop's
    feature_speed: SpeedConfig  # the feature pass's
    dist: DistInfo

    def param_groups(self, decisions: Decisions, lr: float | None = None) -> list[dict[str, Any]]:
        """Fresh optimizer groups as decided (``lr``: another base rate, e.g. for the lr finder)."""
        lr = decisions.lr if lr is None else lr
        cfg = decisions.config
        if decisions.cache:
            groups = param_groups(self.model.head, lr=lr, weight_decay=cfg.weight_decay, policy=decisions.policy)
        else:
            groups = param_groups(self.model, lr=lr, weight_decay=cfg.weight_decay, backbone=self.backbone,
                                  policy=decisions.policy, epochs=cfg.epochs)
        made = [(g["name"], sum(t.numel() for t in g["params"])) for g in groups]
        decided = [(g["name"], g["params"]) for g in decisions.groups]
        if made != decided:
            raise TransferkitError(f"The optimizer groups built ({made}) differ from the decided ones ({decided}); "
                                   "this is a bug in transferkit.")
        return groups


def build(decisions: Decisions, inputs: Inputs) -> Run:
    """The live run of ``decisions`` over what ``inputs`` loaded (see the module docstring)."""
    d, cfg = decisions, decisions.config
    dev = inputs.device
    seed_everything(cfg.seed)
    model = build_model(inputs.backbone, d.num_outputs, spec=d.input_spec, head_hidden=d.head_hidden,
                        head_activation=cfg.head_activation, head_dropout=cfg.head_dropout,
                        head_norm=d.head_norm, target_norm=d.target_norm is not None).to(dev)
    target_std = None
    if d.target_norm is not None:  # the head ends in a TargetScale; the loss standardises by its std
        scale = model.head[-1]
        scale.set_stats(torch.tensor(d.target_norm["mean"]), torch.tensor(d.target_norm["std"]))
        target_std = scale.std
    apply_policy(model, inputs.backbone, d.policy, epoch=0)
    speed = SpeedConfig.of(dev, d.speed)
    speed.prepare(model)
    feature_speed = speed.for_features() if d.cached_epochs else speed
    seed_everything(d.seeds[d.rank])  # dropout etc. differ per rank; the model, data order and augmentation do not
    loss = make_loss(d.task, label_smoothing=cfg.label_smoothing, class_weights=d.class_weights,
                     target_std=target_std).to(dev)
    return Run(backbone=inputs.backbone, bundle=inputs.bundle, model=model, loss_fn=loss, speed=speed,
               feature_speed=feature_speed, dist=inputs.dist)
