"""Every torchvision classification model as a backbone (``tv:<name>``)."""

from __future__ import annotations

import os
from typing import Any

import torch
import torchvision
from torch import nn

from transferkit.backbones._base import Backbone, InputSpec, blocks_from_members, check_blocks, children_blocks
from transferkit.backbones.registry import register_source
from transferkit.backbones.weights import is_weights_path, load_into, read_state_dict
from transferkit.errors import BackboneError, WeightsError

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


def _tv_blocks(name: str, trunk: nn.Module):
    if name.startswith(("resnet", "resnext", "wide_resnet")):
        return blocks_from_members([("stem", ["conv1", "bn1"])] + [(f"layer{i}", [f"layer{i}"]) for i in range(1, 5)])
    if name.startswith("vit_"):
        layers = [n for n, _ in trunk.encoder.layers.named_children()]
        return blocks_from_members(
            [("embed", ["conv_proj", "class_token", "encoder.pos_embedding"])]
            + [(f"blocks.{i}", [f"encoder.layers.{n}"]) for i, n in enumerate(layers)]
            + [("norm", ["encoder.ln"])])
    # Generic: top-level children, with a `features` Sequential split into its stages.
    spec: list[tuple[str, list[str]]] = []
    for blk in children_blocks(trunk):
        child = getattr(trunk, blk.name, None)
        if isinstance(child, nn.Sequential) and blk.name in ("features", "layers"):
            for sub, m in child.named_children():
                if any(True for _ in m.parameters()):
                    spec.append((f"{blk.name}.{sub}", [f"{blk.name}.{sub}"]))
        else:
            spec.append((blk.name, list(blk.members)))
    return blocks_from_members(spec)


def _input_spec(weights_enum: Any) -> InputSpec:
    if weights_enum is None:
        return InputSpec(image_size=224, resize_size=256)
    t = weights_enum.transforms()
    interp = getattr(t, "interpolation", None)
    return InputSpec(image_size=int(t.crop_size[0]), resize_size=int(t.resize_size[0]),
                     mean=tuple(t.mean), std=tuple(t.std),
                     interpolation=getattr(interp, "value", "bilinear"))


def _resolve_weights_enum(name: str, tag: str) -> Any:
    enum = torchvision.models.get_model_weights(name)
    tags = [w.name for w in enum]
    if tag == "DEFAULT":
        return enum.DEFAULT
    if tag.startswith(enum.__name__ + "."):
        tag = tag.split(".", 1)[1]
    if tag not in tags:
        raise WeightsError(f"Unknown weights {tag!r} for tv:{name}. Valid: 'DEFAULT', "
                           f"{', '.join(map(repr, tags))}, a local file path, or None.")
    return enum[tag]


def _download_hint(weights_enum: Any) -> str:
    fname = os.path.basename(weights_enum.url)
    cache = os.path.join(torch.hub.get_dir(), "checkpoints", fname)
    return (f"Could not get the pretrained weights {weights_enum} ({weights_enum.url}). You seem to be offline. "
            f"Download that file on a machine with internet and put it at {cache}, or pass its local path "
            "as weights=..., or use weights=None for random initialisation.")


class TorchvisionSource:
    prefix = "tv"

    def names(self) -> list[str]:
        return list(torchvision.models.list_models(module=torchvision.models))

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
        has_aux = name in ("inception_v3", "googlenet")
        if has_aux and weights_enum is None:
            kwargs = {"aux_logits": False, "init_weights": True, **kwargs}
        try:
            model = torchvision.models.get_model(name, weights=weights_enum, **kwargs)
        except (OSError, RuntimeError) as exc:  # URLError is an OSError
            if weights_enum is not None and ("urlopen" in str(exc) or isinstance(exc, OSError)):
                raise WeightsError(_download_hint(weights_enum)) from exc
            raise
        if has_aux:  # pretrained builders force auxiliary heads on; transfer never uses them
            model.aux_logits = False
            for aux in ("AuxLogits", "aux1", "aux2"):
                if hasattr(model, aux):
                    setattr(model, aux, None)
        classifier, width = strip_classifier(model)
        if file_sd is not None:
            # The file may or may not hold the old classifier; it is replaced anyway.
            load_into(model, file_sd, strict=strict, ignore=(classifier,), source=f"Weights file {str(weights)!r}")
        blocks = _tv_blocks(name, model)
        check_blocks(model, blocks, name=f"tv:{name}")
        spec = _input_spec(weights_enum)
        cats = tuple(weights_enum.meta.get("categories") or ()) if weights_enum is not None else None
        desc = None if weights is None else (str(weights) if file_sd is not None else str(weights_enum))
        return Backbone(name=f"tv:{name}", trunk=model, num_features=width, blocks=blocks,
                        input_spec=spec, weights=desc, categories=cats)


register_source(TorchvisionSource())
