"""Bring your own backbone: any ``nn.Module`` or TorchScript module as a [`Backbone`][transferkit.Backbone].

Example:
    >>> import torch
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    >>> bb = from_module(net, input_spec=InputSpec(image_size=32), name="my_cnn")
    >>> bb.num_features, bb.block_names
    (8, ['0'])
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from transferkit._text import expand_home
from transferkit.config import check_seconds
from transferkit.backbones._base import HEAD, TRUNK_HEAD, Backbone, Block, InputSpec, check_blocks, container_blocks
from transferkit.errors import BackboneError

BlocksArg = Sequence[Block] | Sequence[str] | Sequence[tuple[str, Sequence[str]]] | Mapping[str, Sequence[str]] | None


EXPORT_METADATA = "transferkit.json"  # the file of metadata an export holds (`transferkit.export.metadata`)


def _as_spec(input_spec: InputSpec | Mapping[str, Any] | None) -> InputSpec:
    """The user's ``input_spec`` (its ``clip_seconds`` checked: `check_seconds`)."""
    if input_spec is None:
        return InputSpec()
    if isinstance(input_spec, Mapping):
        input_spec = InputSpec.from_dict(dict(input_spec))
    if not isinstance(input_spec, InputSpec):
        raise BackboneError(f"input_spec must be an InputSpec, a dict of its fields or None, got "
                            f"{type(input_spec).__name__}.")
    check_seconds(input_spec.clip_seconds, "input_spec.clip_seconds")
    return input_spec


def _as_blocks(module: nn.Module, blocks: BlocksArg) -> tuple[Block, ...]:
    """Blocks given as Block objects, module names (one block each), ``(name, members)`` pairs or
    a ``{name: members}`` dict; ``None`` gives one block per top-level child (containers split)."""
    if blocks is None:
        return container_blocks(module)
    if isinstance(blocks, Mapping):
        return _named([(str(k), list(v)) for k, v in blocks.items()])
    out: list[tuple[str, list[str]]] = []
    for b in blocks:
        if isinstance(b, Block):
            out.append((b.name, list(b.members)))
        elif isinstance(b, str):  # a module's name: the block of the trunk's own `head` is named as by default
            out.append((TRUNK_HEAD if b == HEAD else b, [b]))
        elif isinstance(b, (tuple, list)) and len(b) == 2 and isinstance(b[0], str):
            out.append((b[0], [b[1]] if isinstance(b[1], str) else list(b[1])))
        else:
            raise BackboneError(f"Cannot read the block {b!r}: give Block objects, module names, (name, [members]) "
                                "pairs or a {name: [members]} dict.")
    return _named(out)


def _named(spec: list[tuple[str, list[str]]]) -> tuple[Block, ...]:
    """Blocks of the names a user gave, as given (`check_blocks` refuses one named as the new
    head, which `blocks_from_members` would rename)."""
    return tuple(Block(name, tuple(m)) for name, m in spec if m)


@torch.no_grad()
def infer_num_features(module: nn.Module, spec: InputSpec, *, name: str = "module") -> int:
    """Run ``module`` on a zero batch of two inputs shaped by ``spec`` (images ``[2, C, S, S]``;
    audio ``[2, T]`` waveforms of ``clip_seconds``, else 1 s, at ``sample_rate``) and return
    ``F`` of its ``[N, F]`` output; raise BackboneError (with the fix) for any other output."""
    param = next(iter(module.parameters()), None)
    device = param.device if param is not None else torch.device("cpu")
    if spec.kind == "audio":
        x = torch.zeros(2, max(1, round((spec.clip_seconds or 1.0) * (spec.sample_rate or 16000))), device=device)
    else:
        x = torch.zeros(2, spec.channels, spec.image_size, spec.image_size, device=device)
    was_training = module.training
    module.eval()
    try:
        out = module(x)
    except Exception as exc:
        raise BackboneError(f"{name}: a forward pass on a zero batch {tuple(x.shape)} failed ({type(exc).__name__}: "
                            f"{str(exc).splitlines()[0] if str(exc) else ''}). Pass num_features=... and an "
                            "input_spec that fits the module.") from exc
    finally:
        module.train(was_training)
    if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[0] != 2:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise BackboneError(f"{name} returns {shape} on a batch of 2; a backbone trunk must return pooled features "
                            "[N, F]. Wrap it, e.g. nn.Sequential(module, nn.AdaptiveAvgPool2d(1), nn.Flatten()) for a "
                            "feature map, or return the feature tensor instead of a tuple/dict.")
    return int(out.shape[1])


def from_module(module: nn.Module, *, num_features: int | None = None, blocks: BlocksArg = None,
                input_spec: InputSpec | Mapping[str, Any] | None = None, name: str | None = None,
                weights: str | None = None) -> Backbone:
    """Wrap your own ``module`` (input batch -> pooled features ``[N, F]``) as a Backbone.

    ``num_features`` is inferred by a forward pass on zeros shaped by ``input_spec`` when not
    given. ``blocks`` (input to output) default to the module's top-level children, with a
    ``stages``/``blocks``/``layers``/``features`` container split into its elements; they must
    cover every parameter exactly once. ``input_spec`` defaults to 224 px ImageNet
    normalisation. ``weights`` only describes the weights (it is recorded, not loaded).

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        >>> from_module(net, input_spec={"image_size": 32}).num_features
        8
    """
    if not isinstance(module, nn.Module):
        raise BackboneError(f"from_module needs an nn.Module, got {type(module).__name__}.")
    label = name or type(module).__name__
    spec = _as_spec(input_spec)
    block_map = _as_blocks(module, blocks)
    check_blocks(module, block_map, name=label)
    if num_features is None:
        num_features = infer_num_features(module, spec, name=label)
    elif isinstance(num_features, bool) or not isinstance(num_features, int) or num_features < 1:
        raise BackboneError(f"num_features must be a positive integer, got {num_features!r}.")
    return Backbone(name=label, trunk=module, num_features=num_features, blocks=block_map, input_spec=spec,
                    weights=weights)


def from_torchscript(path_or_module: str | Path | torch.jit.ScriptModule, *, num_features: int | None = None,
                     input_spec: InputSpec | Mapping[str, Any] | None = None, name: str | None = None,
                     device: str = "cpu") -> Backbone:
    """A TorchScript module (a file from ``torch.jit.save`` or a loaded module) as a frozen
    feature extractor: its parameters are switched off (``requires_grad=False``) and sit in
    the backbone's ``frozen`` block, which is not among ``block_names``: no policy can
    unfreeze it, only the head trains, and ``finetune`` caches the features.

    The module must map a normalised batch to ``[N, F]`` features; ``num_features`` is
    inferred by a forward pass when not given. ``device``: where it is loaded. A file that
    transferkit exported gives its model's trunk (its head and preprocessing left out: the new
    model normalises its input as the export did), read at the export's input spec unless
    ``input_spec`` is given.

    Example:
        >>> net = torch.jit.script(nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten()))
        >>> bb = from_torchscript(net, input_spec={"image_size": 16})
        >>> bb.num_features, bb.block_names, any(p.requires_grad for p in bb.trunk.parameters())
        (4, [], False)
    """
    if isinstance(path_or_module, (str, Path)):
        path = Path(expand_home(path_or_module))
        if not path.is_file():
            raise BackboneError(f"TorchScript file {str(path)!r} does not exist.")
        extra = {EXPORT_METADATA: ""}
        try:
            scripted = torch.jit.load(str(path), map_location=device, _extra_files=extra)
        except Exception as exc:
            raise BackboneError(f"Cannot load {str(path)!r} as TorchScript ({type(exc).__name__}: "
                                f"{str(exc).splitlines()[0] if str(exc) else ''}). Save it with torch.jit.save; "
                                "for a plain nn.Module use from_module.") from exc
        label = name or path.stem
        if extra[EXPORT_METADATA]:  # a transferkit export: pixels (or waveforms) -> preprocess -> trunk -> head
            if not isinstance(getattr(scripted, "trunk", None), torch.jit.ScriptModule):
                raise BackboneError(f"{str(path)!r} is a transferkit export frozen by --optimize (torch.jit.freeze), "
                                    "which inlines its trunk into the whole model: its features cannot be taken "
                                    "apart from its class scores. Export it again without --optimize (transferkit "
                                    "export CHECKPOINT --out model.pt) and give that file.")
            scripted = scripted.trunk
            if input_spec is None:
                input_spec = json.loads(extra[EXPORT_METADATA]).get("input_spec")
    elif isinstance(path_or_module, torch.jit.ScriptModule):
        scripted, label = path_or_module.to(device), name or "torchscript"
    else:
        raise BackboneError(f"from_torchscript needs a file path or a torch.jit.ScriptModule, got "
                            f"{type(path_or_module).__name__}; for a plain nn.Module use from_module.")
    scripted.eval()
    for p in scripted.parameters():
        p.requires_grad_(False)
    params = tuple(n for n, _ in scripted.named_parameters())
    frozen = (Block("frozen", params),) if params else ()  # a parameterless extractor (pooling) has none
    check_blocks(scripted, frozen, name=label)
    spec = _as_spec(input_spec)
    if num_features is None:
        num_features = infer_num_features(scripted, spec, name=label)
    return Backbone(name=label, trunk=scripted, num_features=int(num_features), blocks=(), input_spec=spec,
                    weights=f"torchscript:{label}", frozen=frozen)
