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
