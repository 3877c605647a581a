"""The [`Backbone`][transferkit.Backbone] record every adapter returns, and helpers over its blocks."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from transferkit.errors import BackboneError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
AUDIO_FIELDS = ("kind", "channels", "sample_rate", "clip_seconds")  # what an audio InputSpec records


@dataclass(frozen=True)
class InputSpec:
    """What a backbone expects as input.

    For images: square crop ``image_size``, the shorter side resized to
    ``resize_size`` first (``None``: resize straight to ``image_size``), the
    interpolation, and the per-channel ``mean``/``std`` applied to pixels in [0, 1].
    For audio: ``sample_rate`` (and ``kind="audio"``).
    """

    kind: str = "image"
    image_size: int = 224
    resize_size: int | None = None
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    interpolation: str = "bilinear"
    channels: int = 3
    sample_rate: int | None = None
    clip_seconds: float | None = None

    def replace(self, **changes: Any) -> InputSpec:
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

    def to_dict(self) -> dict[str, Any]:
        """Plain data of the fields that apply to its kind: an audio spec has no image size,
        interpolation or pixel statistics (`from_dict` gives them their defaults).

        Example:
            >>> InputSpec(kind="audio", channels=1, sample_rate=16000).to_dict()
            {'kind': 'audio', 'channels': 1, 'sample_rate': 16000, 'clip_seconds': None}
        """
        d = dataclasses.asdict(self)
        if self.kind == "audio":
            return {k: d[k] for k in AUDIO_FIELDS}
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> InputSpec:
        known = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in known}
        for key in ("mean", "std"):
            if key in kw:
                kw[key] = tuple(float(x) for x in kw[key])
        return cls(**kw)


@dataclass(frozen=True)
class Block:
    """A named group of the trunk's parameters.

    ``members`` are parameter or module names inside the trunk; a parameter belongs to
    the block when its name equals a member or starts with ``member + "."``.
    """

    name: str
    members: tuple[str, ...]

    def owns(self, qualified_name: str) -> bool:
        return any(qualified_name == m or qualified_name.startswith(m + ".") for m in self.members)


def parameter_versions(module: nn.Module) -> tuple[tuple[int, int], ...]:
    """Each parameter's identity and in-place version: what loading or changing weights moves."""
    return tuple((id(p), p._version) for p in module.parameters())


@dataclass
class Backbone:
    """A feature extractor ready for transfer.

    ``trunk(x)`` maps a normalised input batch to pooled features ``[N, num_features]``.
    ``blocks`` are ordered from input to output and, with ``frozen``, partition the trunk's
    parameters. ``frozen`` blocks (e.g. a TorchScript feature extractor) are never trainable:
    they are not in ``block_names``, so no policy can name or unfreeze them.
    """

    name: str
    trunk: nn.Module
    num_features: int
    blocks: tuple[Block, ...]
    input_spec: InputSpec
    weights: str | None = None
    categories: tuple[str, ...] | None = field(default=None, repr=False)
    frozen: tuple[Block, ...] = ()
    random_init: bool = False  # built by name with weights=None (from_module: the caller's weights, taken as trained)
    # get_backbone's keyword arguments that built it ({}: none), which rebuild it from a checkpoint (None: built
    # otherwise, from_module or by hand)
    build_options: dict[str, Any] | None = field(default=None, repr=False, compare=False)
    _built: tuple[tuple[int, int], ...] | None = field(default=None, repr=False, compare=False)
    # trunk parameters that do not require gradients as the backbone is made (a fixed sin-cos position table, a
    # constant scale): no policy trains them (None: read from the trunk here)
    fixed: frozenset[str] | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.fixed is None:
            self.fixed = frozenset(n for n, p in self.trunk.named_parameters() if not p.requires_grad)

    def mark_random_init(self) -> None:
        """Record that the trunk holds the random weights it was just built with (see `weights_random`)."""
        self.random_init, self._built = True, parameter_versions(self.trunk)

    def weights_random(self) -> bool:
        """Whether the trunk still holds the random weights it was built with: built with
        ``weights=None`` and no parameter loaded or changed since (``load_state_dict`` and any
        in-place change bump a parameter's version; a caller who loads weights by hand has
        trained ones)."""
        return self.random_init and self._built == parameter_versions(self.trunk)

    @property
    def block_names(self) -> list[str]:
        return [b.name for b in self.blocks]

    def block_of(self, parameter_name: str) -> str:
        for b in (*self.blocks, *self.frozen):
            if b.owns(parameter_name):
                return b.name
        raise KeyError(parameter_name)


HEAD = "head"
"""The new head's name in parameter groups, learning rates and plans: no trunk block takes it."""
TRUNK_HEAD = "trunk.head"
"""The name a block of the trunk's own ``head`` module (timm's MetaFormers keep a final norm
there) is given, where the block would otherwise be named ``head``."""


def blocks_from_members(spec: list[tuple[str, list[str]]]) -> tuple[Block, ...]:
    """Build blocks from ``[(name, [member, ...]), ...]``, dropping empty ones; a block named
    after the trunk's ``head`` module is `TRUNK_HEAD` (`HEAD` names the new head)."""
    return tuple(Block(TRUNK_HEAD if name == HEAD else name, tuple(m)) for name, m in spec if m)


def check_blocks(trunk: nn.Module, blocks: tuple[Block, ...], *, name: str = "backbone") -> None:
    """Raise BackboneError unless ``blocks`` cover every parameter of ``trunk`` exactly once,
    each holds a parameter (a policy counts blocks: ``last=1`` on a block of pooling layers
    would train nothing), and a parameter shared by several modules (tied weights) lies in
    one block."""
    names = [b.name for b in blocks]
    if len(set(names)) != len(names):
        raise BackboneError(f"{name}: duplicate block names in {names}")
    if HEAD in names:
        raise BackboneError(f"{name}: a block is named {HEAD!r}, the name of the new head in parameter groups, "
                            f"learning rates and plans; name it otherwise (e.g. ({TRUNK_HEAD!r}, ['head'])).")
    every = [n for n, _ in trunk.named_parameters(remove_duplicate=False)]  # a shared parameter under each name
    empty = [b.name for b in blocks if not any(b.owns(n) for n in every)]
    if empty:
        raise BackboneError(f"{name}: {'blocks' if len(empty) > 1 else 'block'} {empty} hold no parameter: nothing in "
                            "them can train, yet a policy would count them (unfreeze:last=1 would train nothing). "
                            "Leave them out of the blocks: a module without parameters follows the block it runs "
                            "after.")
    missing, doubled = [], []
    for pname, _ in trunk.named_parameters():
        owners = [b.name for b in blocks if b.owns(pname)]
        if not owners:
            missing.append(pname)
        elif len(owners) > 1:
            doubled.append(f"{pname} -> {owners}")
    by_tensor: dict[int, list[str]] = {}
    for pname, p in trunk.named_parameters(remove_duplicate=False):
        by_tensor.setdefault(id(p), []).append(pname)
    for shared in (ns for ns in by_tensor.values() if len(ns) > 1):
        owners = [b.name for b in blocks if any(b.owns(n) for n in shared)]
        if len(owners) > 1:
            raise BackboneError(f"{name}: one parameter is shared by blocks {owners} (as {', '.join(shared[:4])}): "
                                "a policy that freezes one of them and trains another would change the frozen one. "
                                "Put the modules that share it in one block.")
    if missing or doubled:
        parts = []
        if missing:
            parts.append(f"not in any block: {missing[:8]}{' ...' if len(missing) > 8 else ''}")
        if doubled:
            parts.append(f"in several blocks: {doubled[:8]}")
        raise BackboneError(f"{name}: blocks do not partition the parameters; " + "; ".join(parts))


def children_blocks(trunk: nn.Module) -> tuple[Block, ...]:
    """Fallback block map: one block per top-level child that holds parameters,
    with parameters registered directly on the trunk in a leading ``"params"`` block."""
    spec: list[tuple[str, list[str]]] = []
    direct = [n for n, _ in trunk.named_parameters(recurse=False)]
    if direct:
        spec.append(("params", direct))
    for cname, child in trunk.named_children():
        if any(True for _ in child.parameters()):
            spec.append((cname, [cname]))
    return blocks_from_members(spec)


def blocks_from_param_groups(trunk: nn.Module, groups: list[tuple[str, list[str]]]) -> tuple[Block, ...]:
    """Blocks from groups of *parameter* names, with members compressed to the largest modules
    whose parameters all lie in one group (so that module-level queries such as
    `Block.owns` on a module name, used to switch frozen blocks to eval mode, work).
    Parameters of a module shared between groups stay as parameter-name members."""
    owner = {p: i for i, (_, params) in enumerate(groups) for p in params}
    members: list[list[str]] = [[] for _ in groups]

    def visit(prefix: str, module: nn.Module) -> None:
        found = {owner.get(prefix + n, -1) for n, _ in module.named_parameters()}
        if prefix and len(found) == 1 and -1 not in found:
            members[found.pop()].append(prefix[:-1])
            return
        for n, _ in module.named_parameters(recurse=False):
            if prefix + n in owner:
                members[owner[prefix + n]].append(prefix + n)
        for cname, child in module.named_children():
            visit(f"{prefix}{cname}.", child)

    visit("", trunk)
    return blocks_from_members([(name, m) for (name, _), m in zip(groups, members)])


CONTAINER_NAMES = ("stages", "blocks", "layers", "features", "levels", "network")


def _stage_list_parts(child: nn.Module | None) -> list[nn.Module]:
    """The elements with parameters of a Sequential or ModuleList whose every such element is a
    module of modules (a stage, not a single layer); [] for anything else."""
    if not isinstance(child, (nn.Sequential, nn.ModuleList)):
        return []
    parts = [m for m in child.children() if any(True for _ in m.parameters())]
    return parts if all(any(True for _ in m.children()) for m in parts) else []


def container_blocks(trunk: nn.Module) -> tuple[Block, ...]:
    """Like `children_blocks`, but a container child (``stages``, ``blocks``, ``layers``,
    ``features`` ...: a Sequential or ModuleList; or a child of any name that is a list of
    stages, `_stage_list_parts`, with at least half of the parameters and not one of a numbered
    series of such lists) is split into one block per element (``stages.0``, ``stages.1`` ...)."""
    spec: list[tuple[str, list[str]]] = []
    total = sum(p.numel() for p in trunk.parameters())
    # a list of stages of another name: a child that is a list of two or more stages holding at least half of
    # the parameters (timm PiT's transformers), unless it is one of a numbered series of such lists (ResNet's
    # layer4 beside layer1..layer3: each is a stage)
    lists = [n for n, c in trunk.named_children() if len(_stage_list_parts(c)) > 1]
    series = [re.sub(r"\d+$", "", n) for n in lists if n[-1:].isdecimal()]
    stages = {n for n in lists if 2 * sum(p.numel() for p in trunk.get_submodule(n).parameters()) >= total
              and not (n[-1:].isdecimal() and series.count(re.sub(r"\d+$", "", n)) > 1)}
    for blk in children_blocks(trunk):
        child = getattr(trunk, blk.name, None)
        named = blk.name in CONTAINER_NAMES and isinstance(child, (nn.Sequential, nn.ModuleList)) and len(child) > 1
        if named or blk.name in stages:
            spec += [(f"{blk.name}.{i}", [f"{blk.name}.{i}"]) for i, m in child.named_children()
                     if any(True for _ in m.parameters())]
        else:
            spec.append((blk.name, list(blk.members)))
    return blocks_from_members(spec)
