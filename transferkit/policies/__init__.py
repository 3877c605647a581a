"""Fine-tuning policies: which backbone blocks train when, BatchNorm modes, learning rate
per block, L2-SP and LoRA. See ``docs/policies.md``.

Example:
    >>> from transferkit.policies import Policy
    >>> Policy.parse("gradual:every=2,discriminative=0.1").trainable_blocks(["stem", "layer1", "layer2"], epoch=2)
    ['layer2']
"""

from transferkit.lora import add_lora, has_lora, merge_lora
from transferkit.policies.freeze import (
    apply_policy,
    has_batchnorm,
    set_train_mode,
    trainable_flags,
    trainable_parameter_names,
    training_blocks,
)
from transferkit.policies.groups import layer_ids, lr_multipliers, lr_scales, param_groups
from transferkit.policies.l2sp import L2SP, policy_penalty
from transferkit.policies.spec import BN_MODES, Policy

__all__ = [
    "BN_MODES",
    "L2SP",
    "Policy",
    "add_lora",
    "apply_policy",
    "has_batchnorm",
    "has_lora",
    "layer_ids",
    "lr_multipliers",
    "lr_scales",
    "merge_lora",
    "param_groups",
    "policy_penalty",
    "set_train_mode",
    "trainable_flags",
    "trainable_parameter_names",
    "training_blocks",
]
