"""Backbones: the registry, the [`Backbone`][transferkit.Backbone] record and its sources."""

from transferkit.backbones._base import Backbone, Block, InputSpec, check_blocks
from transferkit.backbones.custom import from_module, from_torchscript
from transferkit.backbones.registry import (
    BackboneSource,
    get_backbone,
    list_backbones,
    register_source,
    resolve_name,
)

# the sources register themselves with the registry on import (timm's is registered lazily: see registry)
from transferkit.backbones import builtin, mlp, spectrogram, torchaudio_source, torchvision_source  # noqa: E402,F401

__all__ = [
    "Backbone",
    "BackboneSource",
    "Block",
    "InputSpec",
    "check_blocks",
    "from_module",
    "from_torchscript",
    "get_backbone",
    "list_backbones",
    "register_source",
    "resolve_name",
]
