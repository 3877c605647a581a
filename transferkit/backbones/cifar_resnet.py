"""CIFAR ResNet-20/32/44/56 (He et al. 2016, section 4.2) as ``tk:cifar_resnet<depth>``.

The exact layout of the widely used CIFAR-10 checkpoints (akamaster/pytorch_resnet_cifar10):
a 3x3 conv stem with 16 channels, three stages of ``n = (depth - 2) / 6`` basic blocks with
16, 32 and 64 channels (stride 2 at the start of stages 2 and 3), "option A" shortcuts
(identity, subsampled by 2 and zero-padded in channels: no parameters), global average
pooling and a ``linear`` 64 -> 10 classifier. Parameter names are those of the checkpoints
(``conv1``, ``bn1``, ``layer{1,2,3}.{i}.{conv1,bn1,conv2,bn2}``, ``linear``), so the files load
strictly as they are (``module.`` prefix and missing ``num_batches_tracked`` are handled).

Example:
    >>> from transferkit import get_backbone
    >>> bb = get_backbone("tk:cifar_resnet20", weights=None)
    >>> bb.num_features, bb.block_names
    (64, ['stem', 'layer1', 'layer2', 'layer3'])
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from transferkit.backbones._base import IMAGENET_MEAN, IMAGENET_STD, Backbone, InputSpec, blocks_from_members, check_blocks
from transferkit.backbones.weights import is_weights_path, load_into, read_state_dict
from transferkit.errors import ConfigError, WeightsError

DEPTHS = (20, 32, 44, 56)


class PadShortcut(nn.Module):
    """Option-A shortcut: take every second pixel and zero-pad the new channels on both sides."""

    def __init__(self, pad_channels: int) -> None:
        super().__init__()
        self.pad_channels = pad_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad_channels, self.pad_channels))


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        # Option A: no parameters, so the checkpoints hold no shortcut keys.
        self.shortcut: nn.Module = PadShortcut(cout // 4) if (stride != 1 or cin != cout) else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """The full CIFAR ResNet, classifier (``linear``) included; ``forward`` returns logits.

    Pooling is a global mean, the same as the original ``avg_pool2d`` over the whole 8x8
    map at 32 px, and it also works for other input sizes.
    """

    def __init__(self, depth: int = 20, num_classes: int = 10) -> None:
        super().__init__()
        if depth not in DEPTHS:
            raise ConfigError(f"CIFAR ResNet depth must be one of {DEPTHS}, got {depth!r}.")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.layer1 = self._stage(16, 16, n, 1)
        self.layer2 = self._stage(16, 32, n, 2)
        self.layer3 = self._stage(32, 64, n, 2)
        self.linear: nn.Module = nn.Linear(64, num_classes)
        for m in self.modules():  # the reference implementation's init
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    @staticmethod
    def _stage(cin: int, cout: int, n: int, stride: int) -> nn.Sequential:
        return nn.Sequential(*[BasicBlock(cin if i == 0 else cout, cout, stride if i == 0 else 1) for i in range(n)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        return self.linear(out.mean(dim=(2, 3)))


def _default_weights_message(name: str, depth: int) -> str:
    return (f"tk:{name} has no downloadable weights, so weights='DEFAULT' cannot be resolved. Pass the path of a "
            f"checkpoint, e.g. weights='../shared/data/weights/cifar-resnet/resnet{depth}-<hash>.th' (the CIFAR-10 "
            "checkpoints of akamaster/pytorch_resnet_cifar10 load as they are), or weights=None for random "
            "initialisation.")


def cifar_resnet(depth: int, *, weights: Any = None, weights_only: bool = True, strict: bool = True) -> Backbone:
    """The CIFAR ResNet of ``depth`` as a [`Backbone`][transferkit.Backbone] (32 px input, pooled 64 features).

    ``weights``: ``None``, the path of a checkpoint of the full network (its ``linear``
    classifier is checked by the strict load, then dropped from the trunk), or a transferkit
    checkpoint of a model trained on this backbone (its trunk: no classifier to check).
    """
    name = f"cifar_resnet{depth}"
    model = CifarResNet(depth)
    desc = None
    if weights is not None:
        if not is_weights_path(weights):
            raise WeightsError(_default_weights_message(name, depth) if weights == "DEFAULT" else
                               f"Unknown weights {weights!r} for tk:{name}: pass a checkpoint path or None.")
        sd = read_state_dict(weights, weights_only=weights_only)
        if not any(k.startswith("linear.") for k in sd):  # a trunk (transferkit checkpoint): no classifier
            model.linear = nn.Identity()
        load_into(model, sd, strict=strict, source=f"Weights file {str(weights)!r}")
        desc = str(Path(weights))
    model.linear = nn.Identity()
    blocks = blocks_from_members([("stem", ["conv1", "bn1"]), ("layer1", ["layer1"]), ("layer2", ["layer2"]),
                                  ("layer3", ["layer3"])])
    check_blocks(model, blocks, name=f"tk:{name}")
    spec = InputSpec(image_size=32, resize_size=None, mean=IMAGENET_MEAN, std=IMAGENET_STD, interpolation="bilinear")
    return Backbone(name=f"tk:{name}", trunk=model, num_features=64, blocks=blocks, input_spec=spec, weights=desc)
