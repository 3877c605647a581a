"""Every timm model as a backbone (``timm:<name>`` or ``timm:<name>.<pretrained tag>``).

The trunk is ``timm.create_model(name, pretrained=..., num_classes=0)``: timm removes the
classifier and returns pooled features. Blocks come from the model's own ``group_matcher``
(coarse: one block per stage), preprocessing from its ``pretrained_cfg``.

Example:
    >>> from transferkit import get_backbone
    >>> bb = get_backbone("timm:resnet10t", weights=None)
    >>> bb.num_features, bb.block_names
    (512, ['stem', 'layer1', 'layer2', 'layer3', 'layer4'])
"""

from __future__ import annotations

import math
import os
import re
import sys
from pathlib import Path
from typing import Any

import timm
import torch
from timm.models import group_parameters
from torch import nn

from transferkit.backbones._base import (
    Backbone,
    Block,
    InputSpec,
    blocks_from_param_groups,
    check_blocks,
    container_blocks,
)
from transferkit.backbones._hub import hf_offline, hf_offline_requested, hub_unreachable
from transferkit.backbones.weights import is_weights_path, load_into, read_state_dict
from transferkit.errors import BackboneError, UnknownBackboneError, WeightsError, suggest

_MATCH_PREV = 99999  # timm's MATCH_PREV_GROUP: "merge into the group before"
_EMBED_PREFIXES = ("patch_embed", "pos_embed", "cls_token", "reg_token", "absolute_pos_embed", "dist_token")
# position encodings computed once before the blocks and shared by all of them
_SHARED_POSITION_PREFIXES = ("shared_rel_pos", "rel_pos", "pos_embed", "rope")


# ---------------------------------------------------------------- names and weights

def split_tag(name: str) -> tuple[str, str | None]:
    """``"vit_small_patch16_224.augreg_in1k"`` -> ``("vit_small_patch16_224", "augreg_in1k")``."""
    arch, _, tag = name.partition(".")
    return arch, tag or None


def _pretrained_tags(arch: str) -> list[str]:
    return [split_tag(n)[1] or "" for n in timm.list_pretrained(arch + ".*")] or \
        ([""] if timm.is_model_pretrained(arch) else [])


def resolve_model_name(name: str, weights: Any) -> tuple[str, bool]:
    """The timm name to create (tag included) and whether timm should load pretrained weights.

    ``weights``: ``None``; ``"DEFAULT"`` (the tag in ``name``, else timm's default tag); a
    pretrained tag such as ``"augreg_in21k_ft_in1k"``; or a local file (handled by the caller).
    """
    arch, tag = split_tag(name)
    if weights is None or is_weights_path(weights):
        return name, False
    if not isinstance(weights, str):
        raise WeightsError(f"weights for timm:{name} must be None, 'DEFAULT', a pretrained tag or a file path, "
                           f"got {type(weights).__name__}.")
    tags = _pretrained_tags(arch)
    wanted = tag if weights == "DEFAULT" else weights
    if weights != "DEFAULT" and tag is not None and weights != tag:
        raise WeightsError(f"timm:{name} names the tag {tag!r} but weights={weights!r}. Pass one of them: "
                           f"timm:{arch} with weights={weights!r}, or timm:{name} with weights='DEFAULT'.")
    if not tags:
        raise WeightsError(f"timm:{arch} has no pretrained weights in timm {timm.__version__}. "
                           "Use weights=None, or pass the path of a state-dict file.")
    if wanted is not None and wanted not in tags:
        raise WeightsError(f"Unknown pretrained tag {wanted!r} for timm:{arch}.{suggest(wanted, tags)} Valid tags: "
                           f"{', '.join(map(repr, tags))} (or 'DEFAULT', a file path, None).")
    return (f"{arch}.{wanted}" if wanted else arch), True


def _download_hint(model_name: str) -> str:
    """Where the pretrained file comes from and where to put it when offline."""
    cfg = timm.models.get_pretrained_cfg(model_name)
    hf_id = getattr(cfg, "hf_hub_id", None)
    if hf_id:
        from huggingface_hub import constants

        hf_id = hf_id.split("@")[0]
        folder = os.path.join(constants.HF_HUB_CACHE, "models--" + hf_id.replace("/", "--"))
        return (f"timm looks for it on the Hugging Face hub as {hf_id} (model.safetensors or pytorch_model.bin) "
                f"and in the HF cache folder {folder}. On a machine with internet run "
                f"`hf download {hf_id}` (or `huggingface-cli download {hf_id}`) and copy that folder to the same place "
                "here (set HF_HUB_OFFLINE=1 to skip the network), or download "
                f"https://huggingface.co/{hf_id}/resolve/main/model.safetensors and pass its path as weights=...")
    url = getattr(cfg, "url", None) or "?"
    cache = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(url))
    return (f"timm downloads it from {url}. Put that file at {cache}, or pass its path as weights=...")


def _is_download_error(exc: BaseException) -> bool:
    if isinstance(exc, OSError):  # URLError, LocalEntryNotFoundError, ConnectionError, ... are OSErrors
        return True
    text = f"{type(exc).__name__} {exc}".lower()
    return any(s in text for s in ("connection", "offline", "resolve", "urlopen", "hub", "download"))


def _weights_source(model_name: str, kwargs: dict[str, Any]) -> tuple[str, Any]:
    """Where timm will read the pretrained weights from: ``("hf-hub", (hub id, filename or None))``,
    ``("url", url)`` or a local source (``("file", path)``, ``("state_dict", ...)``), as timm's
    builder decides from the model's ``pretrained_cfg`` and the ``pretrained_cfg`` /
    ``pretrained_cfg_overlay`` arguments (timm 1.0's order: an ``hf-hub`` or ``local-dir``
    source, else a state dict, a file, the HF hub id, the URL)."""
    base = kwargs.get("pretrained_cfg")
    if not isinstance(base, dict) and not hasattr(base, "to_dict"):
        base = timm.models.get_pretrained_cfg(model_name)
    cfg = dict(base if isinstance(base, dict) else base.to_dict())
    cfg.update(kwargs.get("pretrained_cfg_overlay") or {})
    source, hub_id = cfg.get("source") or "", cfg.get("hf_hub_id")
    if source == "hf-hub" and hub_id:
        return "hf-hub", (hub_id, cfg.get("hf_hub_filename"))
    if source == "local-dir":
        return "local-dir", cfg.get("file")
    if cfg.get("state_dict"):
        return "state_dict", cfg["state_dict"]
    if cfg.get("file"):
        return "file", cfg["file"]
    if hub_id:
        return "hf-hub", (hub_id, cfg.get("hf_hub_filename"))
    return ("url", cfg["url"]) if cfg.get("url") else ("", "")


def _is_cached(load_from: str, loc: Any) -> bool:
    """The weights are on this machine already (HF cache, torch hub cache or a local file)."""
    if load_from == "hf-hub":
        from huggingface_hub import try_to_load_from_cache

        hub_id, filename = loc
        repo, _, revision = hub_id.partition("@")
        names = [filename] if filename else ["model.safetensors", "pytorch_model.bin"]
        return any(isinstance(try_to_load_from_cache(repo, n, revision=revision or None), str) for n in names)
    if load_from == "url":
        return os.path.isfile(os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(str(loc))))
    return True  # a file, a state dict, a local folder: no network involved


def _offline_reason(model_name: str, kwargs: dict[str, Any]) -> str | None:
    """Why the weights of ``model_name`` cannot come from the network right now (``HF_HUB_OFFLINE``,
    or the hub does not answer a connection within a second or two), or None when they can
    or need not. Checked before timm tries, so an offline machine fails in about a second."""
    load_from, loc = _weights_source(model_name, kwargs)
    if load_from == "hf-hub":
        if hf_offline_requested():
            return "HF_HUB_OFFLINE is set"
        from huggingface_hub import constants

        return hub_unreachable(constants.ENDPOINT)
    if load_from == "url":
        return hub_unreachable(str(loc))
    return None


def create(model_name: str, *, pretrained: bool, **kwargs: Any) -> nn.Module:
    """``timm.create_model(model_name, pretrained=..., num_classes=0)``; a failed download raises
    [`WeightsError`][transferkit.WeightsError] saying where to put the file - never random weights instead.

    When the hub cannot be reached (or ``HF_HUB_OFFLINE`` is set) the weights come from the
    local cache without any network retry, and the error comes at once when they are not there."""
    offline = _offline_reason(model_name, kwargs) if pretrained else None
    if offline is not None and not _is_cached(*_weights_source(model_name, kwargs)):
        raise WeightsError(f"Could not get the pretrained weights of timm:{model_name} ({offline}; they are not "
                           f"in the local cache either). {_download_hint(model_name)} "
                           "Or use weights=None for random initialisation.")
    try:
        with hf_offline(offline is not None):
            return timm.create_model(model_name, pretrained=pretrained, num_classes=0, **kwargs)
    except Exception as exc:
        if pretrained and _is_download_error(exc):
            raise WeightsError(f"Could not get the pretrained weights of timm:{model_name} "
                               f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}). "
                               f"{_download_hint(model_name)} Or use weights=None for random initialisation.") from exc
        raise


def load_file(model: nn.Module, path: str | Path, *, weights_only: bool = True, strict: bool = True) -> None:
    """Load a local weights file into a timm trunk: a ``model.state_dict()`` file (the hub's
    ``model.safetensors`` / ``pytorch_model.bin``), passed through the model's own
    ``checkpoint_filter_fn`` when timm has one for the architecture (e.g. to resize position
    embeddings), then loaded strictly; the old classifier's keys are ignored."""
    sd = read_state_dict(path, weights_only=weights_only)
    filter_fn = getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)
    if callable(filter_fn):
        try:
            sd = filter_fn(sd, model)
        except Exception:  # noqa: BLE001  the filter targets original checkpoints; a timm state dict needs none,
            pass           # and the strict load below still reports any mismatch
    classifier = getattr(model, "pretrained_cfg", {}).get("classifier") or ()
    ignore = (classifier,) if isinstance(classifier, str) else tuple(classifier)
    load_into(model, sd, strict=strict, ignore=ignore, source=f"Weights file {str(path)!r}")


# ---------------------------------------------------------------- blocks

def _split_trailing_groups(matcher: dict[str, Any]) -> dict[str, Any]:
    """timm merges trailing layers (a ViT's final ``norm``, an EfficientNet's ``conv_head``) into the
    last stage (suffix ``(99999,)``, for layer decay). For unfreezing they are blocks of their own:
    a pattern without a stage number gets the suffix 99998 instead, which sorts after every stage."""
    out: dict[str, Any] = {}
    for key, spec in matcher.items():
        if isinstance(spec, (list, tuple)):
            spec = [(pat, (_MATCH_PREV - 1,) if suffix == (_MATCH_PREV,) and re.compile(pat).groups == 0 else suffix)
                    for pat, suffix in spec]
        out[key] = spec
    return out


def _unmerge_overlapped_groups(model: nn.Module, grouped: dict[Any, list[str]]) -> dict[Any, list[str]]:
    """A function matcher may put elements of two containers in one group for layer decay
    (CaiT: ``blocks.23``, ``blocks_token_only.1`` and the final ``norm``, though the class-attention
    blocks and the norm run after every block). Such a group (one holding an indexed element
    ``X.<n>`` and a module of another top-level name) is split by top-level name, and the groups
    are put in the order the model registers their parameters (its order of execution here);
    a group without indexed elements (a stem of ``cls_token``, ``pos_embed``, ``patch_embed``) stays whole."""
    def top(p: str) -> str:
        return p.split(".")[0]

    def indexed(p: str) -> bool:
        parts = p.split(".")
        return len(parts) > 2 and parts[1].isdecimal()

    pieces: list[list[str]] = []
    for key in sorted(grouped):
        params = grouped[key]
        tops = list(dict.fromkeys(top(p) for p in params))
        if len(tops) > 1 and any(indexed(p) for p in params):
            pieces += [[p for p in params if top(p) == t] for t in tops]
        else:
            pieces.append(params)
    if len(pieces) == len(grouped):
        return grouped
    position = {n: i for i, (n, _) in enumerate(model.named_parameters())}
    pieces.sort(key=lambda ps: min(position.get(p, len(position)) for p in ps))
    return dict(enumerate(pieces))


def _common_prefix(params: list[str]) -> str:
    parts = [p.split(".")[:-1] for p in params]
    common: list[str] = []
    for seg in zip(*parts):
        if any(s != seg[0] for s in seg):
            break
        common.append(seg[0])
    return ".".join(common)


def _compile(matcher: dict[str, Any]) -> list[tuple[re.Pattern, int]]:
    """``[(regex, index of the matcher key), ...]`` in timm's matching order."""
    out = []
    for i, spec in enumerate(matcher.values()):
        if spec is None:
            continue
        for pat in ([p for p, _ in spec] if isinstance(spec, (list, tuple)) else [spec]):
            out.append((re.compile(pat), i))
    return out


def _group_name(params: list[str], patterns: list[tuple[re.Pattern, int]], index: int,
                trainable: set[str] | frozenset[str] = frozenset()) -> str:
    """Name a group after the text its pattern matched, up to the stage number
    (``^layer(\\d+)`` -> ``layer1``, ``^stages\\.(\\d+)`` -> ``stages.0``, ``^norm`` -> ``norm``),
    else after the modules its parameters share; the first group without a stage number (timm's
    ``stem``) is ``embed`` for a patch embedding. Parameters that do not train (``trainable``
    lists those that do; EfficientViM's unused classifier-fusion ``weights``) do not name a group."""
    params = [p for p in params if p in trainable] or params
    first = params[0]
    for rx, key_index in patterns:
        m = rx.match(first)
        if m is None:
            continue
        if m.lastindex:
            return first[:m.end(m.lastindex)]
        if key_index > 0:  # a named trailing layer: extend the match to the whole module name
            end = first.find(".", m.end())
            return first[:end] if end != -1 else first
        break
    if index == 0:
        tops = {p.split(".")[0] for p in params}
        return "embed" if any(t.startswith(_EMBED_PREFIXES) for t in tops) else "stem"
    return _common_prefix(params) or first.split(".")[0]  # unmatched layers (neck, pooling head)


def _shared_positions_first(grouped: dict[Any, list[str]], patterns: list[tuple[re.Pattern, int]]) -> dict[Any, list[str]]:
    """Parameters no pattern of the matcher names and that are position encodings shared by
    all blocks (the ``shared_rel_pos`` MLP of timm's ``vit_srelpos_*``, run before block 0) join
    the first group (stem/embed) instead of trailing after the final norm."""
    if not patterns or len(grouped) < 2:
        return grouped
    keys = sorted(grouped)
    moved = [p for k in keys[1:] for p in grouped[k]
             if p.startswith(_SHARED_POSITION_PREFIXES) and not any(rx.match(p) for rx, _ in patterns)]
    if not moved:
        return grouped
    out = {k: [p for p in grouped[k] if p not in moved] for k in keys}
    out[keys[0]] = grouped[keys[0]] + moved
    return {k: v for k, v in out.items() if v}


def timm_blocks(model: nn.Module) -> tuple[Block, ...]:
    """Blocks from the model's ``group_matcher(coarse=True)`` (stem/embed, one block per stage,
    the final norm/conv head on their own), falling back to top-level children (containers
    such as ``stages`` split into their children) for models without one."""
    try:
        matcher = model.group_matcher(coarse=True)
    except (AttributeError, NotImplementedError, AssertionError, TypeError):
        return container_blocks(model)
    patterns: list[tuple[re.Pattern, int]] = []
    if isinstance(matcher, dict):
        matcher = _split_trailing_groups(matcher)
        patterns = _compile(matcher)
    grouped = _shared_positions_first(group_parameters(model, matcher), patterns)
    if callable(matcher):
        grouped = _unmerge_overlapped_groups(model, grouped)
    groups, taken = [], set()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    for i, (_, params) in enumerate(sorted(grouped.items())):
        name = _group_name(params, patterns, i, trainable)
        if name in taken:
            name = f"{name}_{i}"
        taken.add(name)
        groups.append((name, params))
    return blocks_from_param_groups(model, groups)


# ---------------------------------------------------------------- input spec

def timm_input_spec(model: nn.Module, *, img_size: Any = None) -> InputSpec:
    """Preprocessing from the model's ``pretrained_cfg``: crop ``input_size``, resize to
    ``floor(size / crop_pct)`` (timm's eval transform), mean, std, interpolation."""
    cfg = timm.data.resolve_model_data_config(model)
    channels, h, _ = cfg["input_size"]
    size = int(h)
    if img_size is not None:  # a model built at another size (a tiny test config, a ViT at 384 ...)
        size = int(img_size if isinstance(img_size, int) else img_size[0])
    crop_pct = cfg.get("crop_pct") or 1.0
    resize = math.floor(size / crop_pct)
    if crop_pct == 1.0 and cfg.get("crop_mode") in ("squash", "border"):
        # timm squashes the whole image to the square ('border': fits it and pads the rest): no crop.
        # ('squash' with a crop_pct below 1 squashes to resize and crops: the shorter side resized
        # and cropped below gives the same pixels on square images.)
        resize = None
    interp = cfg.get("interpolation") or "bilinear"
    if interp not in ("nearest", "bilinear", "bicubic"):
        interp = "bilinear"
    # resize_size == image_size too (crop_pct 1.0 in timm's 'center' mode): the shorter side resized, then cropped
    return InputSpec(image_size=size, resize_size=resize, mean=tuple(cfg["mean"]),
                     std=tuple(cfg["std"]), interpolation=interp, channels=int(channels))


REAL_SHAPE_CHECK_PARAMS = 30_000_000


def output_shape(model: nn.Module, *, img_size: Any = None) -> tuple[int, ...] | None:
    """The shape of ``model``'s output for one image at its input size (eval mode, so no
    statistic changes), or None when it cannot be computed. A model of at most
    ``REAL_SHAPE_CHECK_PARAMS`` parameters (or one on the meta device) runs one image of
    zeros (hundredths of a second on a CPU; the kernels it warms up serve the run); a larger one runs on fake
    tensors (no arithmetic, no memory, but tenths of a second of dispatch)."""
    spec = timm_input_spec(model, img_size=img_size)
    was_training = model.training
    model.eval()
    params = list(model.parameters())
    device = params[0].device if params else torch.device("cpu")  # a model built on "meta" runs on meta
    x = torch.zeros(1, spec.channels, spec.image_size, spec.image_size, device=device)
    try:
        if device.type == "meta" or sum(p.numel() for p in params) <= REAL_SHAPE_CHECK_PARAMS:
            with torch.inference_mode():
                return tuple(model(x).shape)
        from torch._subclasses.fake_tensor import FakeTensorMode

        with FakeTensorMode(allow_non_fake_inputs=True), torch.no_grad():
            return tuple(model(x).shape)
    except Exception:  # noqa: BLE001  the caller cannot check, nothing else
        return None
    finally:
        model.train(was_training)


def _num_features(model: nn.Module) -> int:
    return int(getattr(model, "head_hidden_size", None) or model.num_features)


# ---------------------------------------------------------------- the source

class TimmSource:
    """``timm:<name>`` for every model of ``timm.list_models()``, optionally with a pretrained
    tag (``timm:vit_small_patch16_224.augreg_in21k_ft_in1k``).

    ``weights``: ``"DEFAULT"`` (pretrained: the name's tag or timm's default), a pretrained
    tag, a local file, or ``None``. Extra keyword arguments go to ``timm.create_model``
    (``img_size=``, ``drop_path_rate=``, ``pretrained_cfg_overlay=dict(file=...)`` ...).
    """

    prefix = "timm"

    def names(self) -> list[str]:
        return list(timm.list_models())

    def has(self, name: str) -> bool:
        arch, tag = split_tag(name)
        return timm.is_model(arch) and (tag is None or name in timm.list_pretrained(name))

    def check_weights(self, name: str, weights: Any, **kwargs: Any) -> None:
        """A tag timm does not list for ``name`` raises WeightsError (nothing is downloaded)."""
        resolve_model_name(name, weights)

    def build(self, name: str, *, weights: Any = "DEFAULT", weights_only: bool = True, strict: bool = True,
              **kwargs: Any) -> Backbone:
        if not self.has(name):
            arch, tag = split_tag(name)
            raise UnknownBackboneError(f"Unknown pretrained tag {tag!r} in timm:{name}."
                                       f"{suggest(name, timm.list_pretrained(arch + '.*'))} "
                                       f"See timm.list_pretrained('{arch}.*').")
        model_name, pretrained = resolve_model_name(name, weights)

        def make(**extra: Any) -> nn.Module:
            model = create(model_name, pretrained=pretrained, **kwargs, **extra)
            if is_weights_path(weights):
                load_file(model, weights, weights_only=weights_only, strict=strict)
            return model

        model = make()
        shape = output_shape(model, img_size=kwargs.get("img_size"))
        if shape is not None and len(shape) != 2 and "global_pool" not in kwargs:
            # vision encoders of multimodal models (timm's *_enc) return tokens by default
            model = make(global_pool="avg")
            shape = output_shape(model, img_size=kwargs.get("img_size"))
        if shape is not None and (len(shape) != 2 or shape[1] != _num_features(model)):
            raise BackboneError(f"timm:{name} returns features of shape {list(shape)} for one image, not pooled "
                                f"[1, {_num_features(model)}], even with global_pool='avg'; transferkit cannot use it "
                                "as it is. Wrap a module that pools it with transferkit.backbones.from_module(...).")
        desc = f"timm:{model_name}" if pretrained else (str(Path(weights)) if is_weights_path(weights) else None)
        blocks = timm_blocks(model)
        check_blocks(model, blocks, name=f"timm:{name}")
        cfg = getattr(model, "pretrained_cfg", {}) or {}
        labels = cfg.get("label_names")
        return Backbone(name=f"timm:{name}", trunk=model, num_features=_num_features(model), blocks=blocks,
                        input_spec=timm_input_spec(model, img_size=kwargs.get("img_size")), weights=desc,
                        categories=tuple(labels) if pretrained and labels else None)

