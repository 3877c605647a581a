"""transferkit's own small backbones (``tk:``): fast CNNs for small images.

They have no downloadable weights: pass ``weights=None`` or the path of a file you
trained (the demo does exactly that).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from transferkit.backbones._base import Backbone, InputSpec, blocks_from_members, check_blocks
from transferkit.backbones.cifar_resnet import DEPTHS, cifar_resnet
from transferkit.backbones.registry import BuilderSource, register_source
from transferkit.backbones.weights import is_weights_path, load_into, read_state_dict
from transferkit.errors import WeightsError

builtin = BuilderSource("tk")


def register_backbone(name: str):
    """Decorator registering a builder ``f(*, weights, **kw) -> Backbone`` as ``tk:<name>``."""
    def deco(fn):
        builtin.add(name, fn)
        return fn
    return deco


def load_file_weights(backbone: Backbone, weights: Any, *, weights_only: bool = True, strict: bool = True) -> Backbone:
    """Apply ``weights`` (None or a local file) to a backbone that has no downloadable weights."""
    if weights is None:
        return backbone
    if not is_weights_path(weights):
        raise WeightsError(f"{backbone.name} has no published pretrained weights, so weights={weights!r} cannot be "
                           "resolved. Pass the path of a state-dict file you trained, or weights=None.")
    load_into(backbone.trunk, read_state_dict(weights, weights_only=weights_only), strict=strict,
              source=f"Weights file {str(weights)!r}")
    backbone.weights = str(Path(weights))
    return backbone


def _conv_bn(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class SmallCNN(nn.Module):
    """A VGG-style CNN for small images: three stages, global average pooling."""

    def __init__(self, widths: tuple[int, int, int] = (32, 64, 128), in_channels: int = 3) -> None:
        super().__init__()
        w1, w2, w3 = widths
        self.stem = _conv_bn(in_channels, w1)
        self.stage1 = nn.Sequential(_conv_bn(w1, w1), nn.MaxPool2d(2))
        self.stage2 = nn.Sequential(_conv_bn(w1, w2), _conv_bn(w2, w2), nn.MaxPool2d(2))
        self.stage3 = nn.Sequential(_conv_bn(w2, w3), nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
        self.num_features = w3

    def forward(self, x):
        return self.stage3(self.stage2(self.stage1(self.stem(x))))


@register_backbone("small_cnn")
def small_cnn(*, weights: Any = None, widths: tuple[int, int, int] = (32, 64, 128), image_size: int = 32,
              weights_only: bool = True, strict: bool = True) -> Backbone:
    """A 5-conv CNN (about 0.3 M parameters) for images of 8 to 64 pixels."""
    trunk = SmallCNN(tuple(widths))
    blocks = blocks_from_members([(n, [n]) for n in ("stem", "stage1", "stage2", "stage3")])
    check_blocks(trunk, blocks, name="tk:small_cnn")
    bb = Backbone(name="tk:small_cnn", trunk=trunk, num_features=trunk.num_features, blocks=blocks,
                  input_spec=InputSpec(image_size=image_size, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)))
    return load_file_weights(bb, weights, weights_only=weights_only, strict=strict)


def _register_cifar_resnets() -> None:

    for depth in DEPTHS:
        def build(*, weights: Any = None, weights_only: bool = True, strict: bool = True, _depth: int = depth) -> Backbone:
            return cifar_resnet(_depth, weights=weights, weights_only=weights_only, strict=strict)

        build.__doc__ = f"CIFAR ResNet-{depth} (He et al. 2016, option-A shortcuts), 32 px, 64 features."
        builtin.add(f"cifar_resnet{depth}", build)


_register_cifar_resnets()
register_source(builtin)
