"""Every torchvision classification model as a backbone (``tv:<name>``)."""

from __future__ import annotations

import os
from typing import Any

import torch
import torchvision
from torch import nn

from transferkit.backbones._hub import hub_unreachable
from transferkit.backbones._base import Backbone, Block, InputSpec, blocks_from_members, check_blocks, container_blocks
from transferkit.backbones.registry import register_source
from transferkit.backbones.weights import is_weights_path, load_into, read_state_dict
from transferkit.errors import BackboneError, WeightsError, suggest
from transferkit._text import exception_line

_CLASSIFIER_ATTRS = ("fc", "classifier", "heads", "head")


def strip_classifier(model: nn.Module) -> tuple[str, int]:
    """Replace the final classification layer of ``model`` by ``nn.Identity`` in place.

    Returns the qualified name of the replaced module and the feature width it received.
    """
    for attr in _CLASSIFIER_ATTRS:
        mod = getattr(model, attr, None)
        if mod is None:
            continue
        if isinstance(mod, nn.Linear):
            setattr(model, attr, nn.Identity())
            return attr, mod.in_features
        if isinstance(mod, nn.Sequential):
            linear_idx = [i for i, m in enumerate(mod) if isinstance(m, nn.Linear)]
            if linear_idx:
                i = linear_idx[-1]
                width = mod[i].in_features
                mod[i] = nn.Identity()
                return f"{attr}.{i}", width
            convs = [i for i, m in enumerate(mod) if isinstance(m, nn.Conv2d)]
            if convs:  # SqueezeNet: a 1x1 conv classifier; keep global pooling only
                width = mod[convs[-1]].in_channels
                setattr(model, attr, nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1)))
                return attr, width
    raise BackboneError(f"Cannot find the classifier of {type(model).__name__} (looked for {_CLASSIFIER_ATTRS}).")


Spec = list[tuple[str, list[str]]]


def _has_params(module: nn.Module) -> bool:
    return any(True for _ in module.parameters())


def _seq(trunk: nn.Module, attr: str) -> list[tuple[str, nn.Module]]:
    """``[(qualified name, child), ...]`` of the Sequential ``trunk.<attr>``."""
    seq = trunk.get_submodule(attr)
    return [(f"{attr}.{i}", m) for i, m in seq.named_children()]


def _leftover_classifier(trunk: nn.Module, names: tuple[str, ...] = ("norm", "pre_logits")) -> Spec:
    """Layers that stay in ``classifier`` after the last Linear became Identity (ConvNeXt's
    LayerNorm, MobileNetV3's and MaxViT's pre-logits Linear), one block each, in order."""
    if not isinstance(getattr(trunk, "classifier", None), nn.Sequential):
        return []
    spec: Spec = []
    for qname, m in _seq(trunk, "classifier"):
        if not _has_params(m):
            continue
        kind = "norm" if isinstance(m, (nn.LayerNorm, nn.BatchNorm1d)) else "pre_logits"
        spec.append((kind if kind in names and all(kind != n for n, _ in spec) else f"{kind}{len(spec)}", [qname]))
    return spec


def _resnet(t: nn.Module) -> Spec:
    return [("stem", ["conv1", "bn1"])] + [(f"layer{i}", [f"layer{i}"]) for i in range(1, 5)]


def _vit(t: nn.Module) -> Spec:
    layers = [n for n, _ in t.encoder.layers.named_children()]
    return ([("embed", ["conv_proj", "class_token", "encoder.pos_embedding"])]
            + [(f"blocks.{i}", [f"encoder.layers.{n}"]) for i, n in enumerate(layers)] + [("norm", ["encoder.ln"])])


def _downsample_then_stage(t: nn.Module, stem_name: str) -> Spec:
    """ConvNeXt and Swin: ``features = [stem, stage, down, stage, down, stage, ...]``; each
    downsampling layer belongs to the stage that follows it (as in timm)."""
    feats = _seq(t, "features")
    spec: Spec = [(stem_name, [feats[0][0]])]
    pending: list[str] = []
    for qname, m in feats[1:]:
        pending.append(qname)
        if not _is_downsample(m):
            spec.append((f"stages.{len(spec) - 1}", pending))
            pending = []
    return spec


def _is_downsample(m: nn.Module) -> bool:
    """ConvNeXt's downsampling is ``Sequential(LayerNorm2d, Conv2d(stride 2))``; Swin's is PatchMerging."""
    return "PatchMerging" in type(m).__name__ or (
        isinstance(m, nn.Sequential) and len(m) == 2 and isinstance(m[-1], nn.Conv2d) and m[-1].stride != (1, 1))


def _convnext(t: nn.Module) -> Spec:
    return _downsample_then_stage(t, "stem") + _leftover_classifier(t)


def _swin(t: nn.Module) -> Spec:
    return _downsample_then_stage(t, "embed") + [("norm", ["norm"])]


def _stem_stages_head(t: nn.Module, attr: str = "features") -> Spec:
    """EfficientNet (v1/v2): ``features = [stem, stage 1..k, 1x1 conv head]``."""
    feats = _seq(t, attr)
    return ([("stem", [feats[0][0]])] + [(f"stages.{i}", [q]) for i, (q, _) in enumerate(feats[1:-1])]
            + [("conv_head", [feats[-1][0]])] + _leftover_classifier(t))


def _mobilenet(t: nn.Module) -> Spec:
    """MobileNetV2/V3: single inverted-residual blocks, grouped into stages of equal width."""
    feats = _seq(t, "features")
    spec: Spec = [("stem", [feats[0][0]])]
    width = None
    for qname, m in feats[1:-1]:
        w = getattr(m, "out_channels", None)
        if w is None or w != width:
            spec.append((f"stages.{len(spec) - 1}", []))
            width = w
        spec[-1][1].append(qname)
    return spec + [("conv_head", [feats[-1][0]])] + _leftover_classifier(t)


def _mnasnet(t: nn.Module) -> Spec:
    """MNASNet: ``layers = [8 stem layers, 6 stacks (Sequential), 1x1 conv, bn, relu]``."""
    names = [q for q, _ in _seq(t, "layers")]
    stacks = [q for q, m in _seq(t, "layers") if isinstance(m, nn.Sequential)]
    first, after = names.index(stacks[0]), names.index(stacks[-1]) + 1
    return ([("stem", names[:first])] + [(f"stages.{i}", [q]) for i, q in enumerate(stacks)]
            + [("conv_head", names[after:])])


def _regnet(t: nn.Module) -> Spec:
    return [("stem", ["stem"])] + [(f"stages.{i}", [q]) for i, (q, _) in enumerate(_seq(t, "trunk_output"))]


def _shufflenet(t: nn.Module) -> Spec:
    return [("stem", ["conv1"]), ("stage2", ["stage2"]), ("stage3", ["stage3"]), ("stage4", ["stage4"]),
            ("conv5", ["conv5"])]


def _squeezenet(t: nn.Module) -> Spec:
    """SqueezeNet: ``conv1``, then the fire modules named as in the paper (``fire2`` .. ``fire9``)."""
    feats = _seq(t, "features")
    spec: Spec = []
    for qname, m in feats:
        if spec and not _has_params(m):
            spec[-1][1].append(qname)
        elif isinstance(m, nn.Conv2d):
            spec.append(("conv1", [qname]))
        elif _has_params(m):
            spec.append((f"fire{len(spec) + 1}", [qname]))
    return spec


def _pool_stages(t: nn.Module) -> Spec:
    """VGG / AlexNet: conv stages ended by max-pooling, then the fully connected ``fc6``, ``fc7``."""
    spec: Spec = [("stage1", [])]
    for qname, m in _seq(t, "features"):
        spec[-1][1].append(qname)
        if isinstance(m, nn.MaxPool2d):
            spec.append((f"stage{len(spec) + 1}", []))
    spec = [s for s in spec if any(_has_params(t.get_submodule(q)) for q in s[1])]
    fcs = [q for q, m in _seq(t, "classifier") if isinstance(m, nn.Linear)]
    return spec + [(f"fc{6 + i}", [q]) for i, q in enumerate(fcs)]


def _densenet(t: nn.Module) -> Spec:
    names = [q for q, _ in _seq(t, "features")]
    spec: Spec = [("stem", [q for q in names if q.rsplit(".", 1)[1] in ("conv0", "norm0")])]
    for i in range(1, 5):
        spec.append((f"denseblock{i}", [q for q in names if q.rsplit(".", 1)[1] in (f"denseblock{i}", f"transition{i}")]))
    return spec + [("norm", ["features.norm5"])]


def _googlenet(t: nn.Module) -> Spec:
    kids = [n for n, m in t.named_children() if _has_params(m)]
    return ([("stem", [n for n in kids if n.startswith("conv")])]
            + [(f"inception{i}", [n for n in kids if n.startswith(f"inception{i}")]) for i in (3, 4, 5)])


def _inception3(t: nn.Module) -> Spec:
    kids = [n for n, m in t.named_children() if _has_params(m)]
    return ([("stem", [n for n in kids if n.startswith("Conv2d_")])]
            + [(f"mixed{i}", [n for n in kids if n.startswith(f"Mixed_{i}")]) for i in (5, 6, 7)])


def _maxvit(t: nn.Module) -> Spec:
    return ([("stem", ["stem"])] + [(f"stages.{i}", [f"blocks.{i}"]) for i in range(len(t.blocks))]
            + _leftover_classifier(t))


BLOCK_MAPS = {
    "ResNet": _resnet, "VisionTransformer": _vit, "ConvNeXt": _convnext, "SwinTransformer": _swin,
    "EfficientNet": _stem_stages_head, "MobileNetV2": _mobilenet, "MobileNetV3": _mobilenet, "MNASNet": _mnasnet,
    "RegNet": _regnet, "ShuffleNetV2": _shufflenet, "SqueezeNet": _squeezenet, "VGG": _pool_stages,
    "AlexNet": _pool_stages, "DenseNet": _densenet, "GoogLeNet": _googlenet, "Inception3": _inception3,
    "MaxVit": _maxvit,
}


def tv_blocks(trunk: nn.Module) -> tuple[Block, ...]:
    """The block map of a torchvision classifier whose last Linear was stripped, by model class
    (subclasses included); other classes get `container_blocks`."""
    for cls in type(trunk).__mro__:
        fn = BLOCK_MAPS.get(cls.__name__)
        if fn is not None:
            return blocks_from_members(fn(trunk))
    return container_blocks(trunk)


def _input_spec(weights_enum: Any) -> InputSpec:
    t = weights_enum.transforms()
    interp = getattr(t, "interpolation", None)
    return InputSpec(image_size=int(t.crop_size[0]), resize_size=int(t.resize_size[0]),
                     mean=tuple(t.mean), std=tuple(t.std),
                     interpolation=getattr(interp, "value", "bilinear"))


def _spec_without_weights(name: str, model: nn.Module) -> InputSpec:
    """The preprocessing of the model's published weights (no download needed), at the size the
    randomly initialised model takes (a ViT built without weights has a fixed ``image_size``)."""
    try:
        members = list(torchvision.models.get_model_weights(name))
    except (ValueError, KeyError):
        members = []
    size = getattr(model, "image_size", None)
    fits = [w for w in members if size is None or _input_spec(w).image_size == size]
    if fits:
        default = torchvision.models.get_model_weights(name).DEFAULT
        return _input_spec(default if default in fits else fits[0])
    size = size or 224
    return InputSpec(image_size=size, resize_size=round(size * 256 / 224))


def _resolve_weights_enum(name: str, tag: str) -> Any:
    enum = torchvision.models.get_model_weights(name)
    tags = [w.name for w in enum]
    if tag == "DEFAULT":
        return enum.DEFAULT
    if tag.startswith(enum.__name__ + "."):
        tag = tag.split(".", 1)[1]
    if tag not in tags:
        raise WeightsError(f"Unknown weights {tag!r} for tv:{name}.{suggest(tag, ['DEFAULT', *tags])} Valid: "
                           f"'DEFAULT', {', '.join(map(repr, tags))}, a local file path, or None.")
    return enum[tag]


def _cache_file(weights_enum: Any) -> str:
    """Where torch.hub keeps the file of ``weights_enum`` (and looks for it first)."""
    return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(weights_enum.url))


def _download_hint(weights_enum: Any, why: str) -> str:
    return (f"Could not get the pretrained weights {weights_enum} ({weights_enum.url}): {why}. Download that file "
            f"on a machine with internet and put it at {_cache_file(weights_enum)}, or pass its local path as "
            "weights=..., or use weights=None for random initialisation.")


class _Inception3Trunk(torchvision.models.Inception3):
    """Inception v3 whose ``forward`` returns the main output only. torchvision's returns an
    ``InceptionOutputs`` namedtuple when scripted, which a trunk must not."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._transform_input(x)
        x, _ = self._forward(x)
        return x


class _GoogLeNetTrunk(torchvision.models.GoogLeNet):
    """GoogLeNet whose ``forward`` returns the main output only (see `_Inception3Trunk`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._transform_input(x)
        x, _, _ = self._forward(x)
        return x


_AUX = {"inception_v3": (_Inception3Trunk, ("AuxLogits",)), "googlenet": (_GoogLeNetTrunk, ("aux1", "aux2"))}


def _drop_aux_heads(name: str, model: nn.Module) -> tuple[str, ...]:
    """Remove the auxiliary classifiers of Inception v3 / GoogLeNet (transfer never uses them) and
    make ``forward`` return a plain tensor, also when scripted. Returns the removed module names."""
    if name not in _AUX:
        return ()
    cls, aux_names = _AUX[name]
    model.aux_logits = False
    for aux in aux_names:
        setattr(model, aux, None)
    model.__class__ = cls  # same parameters and state-dict keys; only forward differs
    return aux_names


def _build_model(name: str, weights_enum: Any, kwargs: dict[str, Any]) -> nn.Module:
    if name in _AUX and weights_enum is None:
        kwargs = {"aux_logits": False, "init_weights": True, **kwargs}
    # said before torch.hub prints "Downloading: ..." and fails; with builder options, after the builder checked them
    # (it refuses some with weights, which is the better message)
    if weights_enum is not None and not kwargs and not os.path.isfile(_cache_file(weights_enum)):
        offline = hub_unreachable(weights_enum.url)  # once per host and process, about a second at most
        if offline is not None:
            raise WeightsError(_download_hint(weights_enum, offline))
    try:
        return torchvision.models.get_model(name, weights=weights_enum, **kwargs)
    except (OSError, RuntimeError) as exc:  # URLError is an OSError
        if weights_enum is not None and ("urlopen" in str(exc) or isinstance(exc, OSError)):
            raise WeightsError(_download_hint(weights_enum, exception_line(exc))) from exc
        raise


class TorchvisionSource:
    """``tv:<name>`` for every model of ``torchvision.models.list_models(module=torchvision.models)``.

    ``weights``: ``"DEFAULT"``, an enum member name (``"IMAGENET1K_V2"``, or
    ``"ResNet50_Weights.IMAGENET1K_V2"``), a WeightsEnum member, a local file, or ``None``.
    Extra keyword arguments go to the torchvision builder (e.g. ``image_size=`` for a ViT without weights).
    """

    prefix = "tv"

    def names(self) -> list[str]:
        return list(torchvision.models.list_models(module=torchvision.models))

    def check_weights(self, name: str, weights: Any, **kwargs: Any) -> None:
        """A tag torchvision does not list for ``name`` raises WeightsError (nothing is downloaded)."""
        if isinstance(weights, str):
            _resolve_weights_enum(name, weights)

    def build(self, name: str, *, weights: Any = "DEFAULT", weights_only: bool = True,
              strict: bool = True, **kwargs: Any) -> Backbone:
        weights_enum = None
        file_sd = None
        if weights is None:
            pass
        elif is_weights_path(weights):
            file_sd = read_state_dict(weights, weights_only=weights_only)
        elif isinstance(weights, str):
            weights_enum = _resolve_weights_enum(name, weights)
        else:
            weights_enum = weights  # a torchvision WeightsEnum member
        model = _build_model(name, weights_enum, kwargs)
        aux = _drop_aux_heads(name, model)
        classifier, width = strip_classifier(model)
        if file_sd is not None:
            # The file may or may not hold the old classifier and auxiliary heads; they are replaced anyway.
            load_into(model, file_sd, strict=strict, ignore=(classifier, *aux), source=f"Weights file {str(weights)!r}")
        blocks = tv_blocks(model)
        check_blocks(model, blocks, name=f"tv:{name}")
        spec = _input_spec(weights_enum) if weights_enum is not None else _spec_without_weights(name, model)
        cats = tuple(weights_enum.meta.get("categories") or ()) if weights_enum is not None else None
        desc = None if weights is None else (str(weights) if file_sd is not None else str(weights_enum))
        return Backbone(name=f"tv:{name}", trunk=model, num_features=width, blocks=blocks,
                        input_spec=spec, weights=desc, categories=cats)


register_source(TorchvisionSource())
