"""``tk:mlp``: a fully connected network on flattened pixels (the classic MNIST baseline,
e.g. 784-500-300 with a 10-way head), as a backbone like any other."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from transferkit.backbones._base import Backbone, InputSpec, blocks_from_members, check_blocks
from transferkit.backbones.builtin import load_file_weights, register_backbone
from transferkit.errors import ConfigError


class MLPTrunk(nn.Module):
    """Grayscale mean of the channels, average-pooled to ``side x side`` (so any input
    size works), flattened, then Linear+ReLU layers."""

    def __init__(self, side: int, hidden: Sequence[int]) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(side)
        layers, width = [], side * side
        for i, h in enumerate(hidden):
            layers.append(nn.Sequential(nn.Linear(width, int(h)), nn.ReLU(inplace=True)))
            width = int(h)
        self.layers = nn.Sequential(*layers)
        self.num_features = width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(self.pool(x.mean(dim=1, keepdim=True)).flatten(1))


@register_backbone("mlp")
def mlp(*, weights: Any = None, hidden: Sequence[int] = (500, 300), image_size: int = 28,
        weights_only: bool = True, strict: bool = True) -> Backbone:
    """``tk:mlp``: ``image_size**2`` inputs (channels averaged, pooled to that size), then
    ``hidden`` ReLU layers.

    Example:
        >>> from transferkit import get_backbone
        >>> get_backbone("tk:mlp", weights=None).num_features
        300
    """
    if not hidden:
        raise ConfigError("tk:mlp needs at least one hidden layer width, e.g. hidden=(500, 300).")
    trunk = MLPTrunk(image_size, hidden)
    blocks = blocks_from_members([(f"layer{i + 1}", [f"layers.{i}"]) for i in range(len(hidden))])
    check_blocks(trunk, blocks, name="tk:mlp")
    bb = Backbone(name="tk:mlp", trunk=trunk, num_features=trunk.num_features, blocks=blocks,
                  input_spec=InputSpec(image_size=image_size, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)))
    return load_file_weights(bb, weights, weights_only=weights_only, strict=strict)
