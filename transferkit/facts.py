"""Facts: what a run must look at before it decides, gathered once (the only I/O before deciding).

``look(config)`` resolves the device and this process's place in a distributed job, builds
the backbone (a private copy of a caller's Backbone; without its weights for a dry run),
scans the data (the census: classes, counts, fingerprints, decoded sizes), and measures
what cannot be known otherwise (a hybrid trunk's faster layout). It returns the
[`Facts`][transferkit.facts.Facts], plain data that [`decide`][transferkit.decisions.decide]
reads, and the [`Inputs`][transferkit.facts.Inputs] it loaded (backbone and datasets), which
[`build`][transferkit.run.build] turns into the live run.

Example:
    >>> facts, inputs = look(FinetuneConfig(backbone="tk:small_cnn", weights=None, data="images/"))  # doctest: +SKIP
    >>> facts.data.n_train, facts.backbone.blocks  # doctest: +SKIP
"""

from __future__ import annotations

import copy
import functools
import hashlib
import inspect
import json
import os
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from transferkit._io import file_digest, read_only_folder
from transferkit.backbones import Backbone, InputSpec, check_blocks, get_backbone
from transferkit.backbones.spectrogram import SpecAugment
from transferkit.backbones.registry import check_weights_tag
from transferkit.backbones.weights import check_weights_file, is_weights_path
from transferkit.config import OUTPUT_KEYS, FinetuneConfig, caller, check_seconds
from transferkit.data import DataBundle, eval_transform
from transferkit.data.audio import AUDIO_AUGMENTATIONS, prepare_audio_data
from transferkit.data.decoded import decode_census
from transferkit.data.gpu_jpeg import input_decode_facts
from transferkit.data.sampling import seed_everything
from transferkit.data.fingerprint import (class_counts, data_fingerprint, listing_digest, parameters_digest,
                                         quick_fingerprint)
from transferkit._text import exception_line
from transferkit.errors import BackboneError, ConfigError, DataError
from transferkit.hardware import conv_share, cpu_capability, device_bf16, out_of_memory
from transferkit.heads import build_head, resolve_head
from transferkit.lora import add_lora
from transferkit.model import TransferModel
from transferkit.policies import Policy, param_groups
from transferkit.policies.freeze import has_batchnorm
from transferkit.policies.freeze import module_blocks
from transferkit.policies.frozen_bn import tracks_statistics
from transferkit.policies.structure import batchnorm_only_blocks, fixed_blocks, idle_at_frozen_bn
from transferkit.policies.frozen_bn import eval_fingerprint
from transferkit.train.device import resolve_device
from transferkit.train.distributed import DistInfo, broadcast_object, init_distributed
from transferkit.train.engines import compile_unavailable, engine_facts, time_candidates
from transferkit.train.speed import SpeedConfig, decide_speed, layout_fact
from transferkit.train.tasks import prepare_task_data, resolve_class_weights, target_summary

FACTS_FORMAT = 1


@dataclass(frozen=True)
class DeviceFacts:
    """The device and this process's place in the job."""

    device: str  # "cpu", "cuda:0", ...
    type: str
    rank: int
    world_size: int
    local_world_size: int
    bf16: bool  # the device runs bf16 natively
    bf16_why: str
    cpu_capability: str
    compile_unavailable: str | None = None  # why torch.compile cannot run here; None: it can


@dataclass(frozen=True)
class BackboneFacts:
    """The backbone's structure (and, when loaded, its weights' identity)."""

    name: str
    weights: Any  # as given (a name, a path, None)
    weights_loaded: bool
    pretrained: bool  # weights given (a Backbone object: unless it was built with weights=None)
    blocks: tuple[str, ...]
    has_batchnorm: bool
    conv_share: float
    n_conv: int
    num_features: int
    input_spec: InputSpec  # at the run's image size
    layout_timed: tuple[bool, str] | None  # a hybrid trunk's measured layout verdict
    fingerprint: str | None  # digest of the preprocessing and trunk weights (None: not loaded)
    weights_digest: str | None  # name@blake2b of a weights file (portable records)
    groups: tuple[dict[str, Any], ...]  # whole-model optimizer groups at lr 1 (name, lr_scale, weight_decay, params)
    head_groups: tuple[dict[str, Any], ...]  # the head's alone (training on cached features)
    spec_augment: bool = False  # the trunk holds SpecAugment masks (active in training mode only)
    batchnorm_only: tuple[str, ...] = ()  # blocks of BatchNorm gamma/beta alone (nothing trains in them at bn=frozen)
    tracks_statistics: bool = False  # some layer keeps running statistics (BatchNorm, affine or not; in a block or not)
    # the blocks such layers follow (`module_blocks`; None for one outside every block, which runs in training mode
    # whenever some block trains)
    statistics_blocks: tuple[str | None, ...] = ()
    fixed: tuple[tuple[str, str], ...] = ()  # (parameter, block) of `Backbone.fixed` in blocks a policy can train
    fixed_blocks: tuple[str, ...] = ()  # blocks of such parameters alone (they stay frozen: `training_blocks`)
    idle_at_frozen_bn: tuple[str, ...] = ()  # blocks of such parameters and BatchNorm gamma/beta alone
    anchor: str | None = None  # `parameters_digest` of the trunk training starts from, under L2-SP (when loaded)


@dataclass(frozen=True)
class DataFacts:
    """The data's census."""

    kind: str  # "image" or "audio"
    classes: tuple[str, ...]
    num_outputs: int
    n_train: int
    n_val: int
    identity: dict[str, Any]  # names and digests (no absolute paths)
    fingerprints: dict[str, str]  # part -> full fingerprint (for the feature-cache key; with cache_dir)
    files: dict[str, bool]  # part -> file-backed (can be decoded once)
    decode: dict[str, dict[str, Any]]  # part -> `decode_census`
    class_weights: tuple[float, ...] | None  # class_weights as the data resolve them
    # regression: mean, std and constant flags (per output) and n of the training targets (a CSV's all, a
    # Dataset's those read before training; `target_summary`); None for labels
    targets: dict[str, Any] | None = None
    # the training samples are drawn shard by shard (remote shards the shard cache cannot hold at once)
    shard_by_shard: bool = False


@dataclass(frozen=True)
class Facts:
    """Everything [`decide`][transferkit.decisions.decide] reads besides the configuration."""

    device: DeviceFacts
    backbone: BackboneFacts
    data: DataFacts
    policy: Policy
    head: str  # "linear", "mlp" or "logistic", as configured
    head_hidden: tuple[int, ...]
    # feature-engine hook: engines available, images of the feature pass, the candidates' timing
    # on the run's own input (train/engines.py `engine_facts`); empty when there is no feature pass
    engines: dict[str, Any] = field(default_factory=dict)
    # where images are decoded (data/gpu_jpeg.py `input_decode_facts`): the JPEG census of the
    # image files, whether decode_jpeg works on the device, and on CUDA the two decoders timed
    # on the run's own files; empty: not looked at (no image files)
    input_decode: dict[str, Any] = field(default_factory=dict)
    # why cache_dir cannot be written (it is then read, never written: `transferkit._io.read_only_folder`);
    # None: writable, or no cache_dir
    cache_read_only: str | None = None

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["policy"] = str(self.policy)
        out["backbone"]["input_spec"] = self.backbone.input_spec.to_dict()
        return out


@dataclass
class Inputs:
    """What looking loaded, handed to [`build`][transferkit.run.build]: the run's own backbone
    copy and the datasets."""

    backbone: Backbone
    bundle: DataBundle
    dist: DistInfo
    device: torch.device
    # the timing of the feature engines when `look` left it due (`timed_engines` runs it once)
    engine_timing: Callable[[], dict[str, Any]] | None = None


def environment(cfg: FinetuneConfig) -> tuple[DistInfo, torch.device]:
    """The device (``cfg.device`` resolved once) and this process's place in the job (joining
    the process group when launched by torchrun)."""
    return init_distributed(resolve_device(cfg.device))


def resolve_input_spec(spec: InputSpec, image_size: int | None) -> InputSpec:
    """The backbone's spec at another crop size, keeping its resize-to-crop ratio."""
    if image_size is None or spec.kind == "audio":
        return spec
    resize = round(image_size * spec.resize_size / spec.image_size) if spec.resize_size else None
    return spec.replace(image_size=image_size, resize_size=resize)


def _size_option(trunk: torch.nn.Module) -> str | None:
    """The keyword by which the trunk's class takes its input size (timm: ``img_size``; torchvision's
    ViT ``image_size``, MaxViT ``input_size``), or None."""
    for klass in type(trunk).__mro__:  # past a subclass that passes *args, **kwargs on (timm's LevitDistilled)
        if klass is torch.nn.Module:
            break
        try:
            params = inspect.signature(klass.__init__).parameters
        except (TypeError, ValueError):
            return None
        found = next((p for p in ("img_size", "image_size", "input_size") if p in params), None)
        if found is not None or not any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params.values()):
            return found
    return None


def check_options_of_kind(cfg: FinetuneConfig, bb: Backbone) -> None:
    """ConfigError, before any data are read, for settings an audio backbone has no use for or
    reads otherwise: ``image_size`` (it would be ignored), an ``augment`` of images only; and for
    its ``clip_seconds`` (`check_seconds`: a Backbone object's spec may have been replaced)."""
    if bb.input_spec.kind != "audio":
        return
    check_seconds(bb.input_spec.clip_seconds, f"{bb.name}'s input_spec.clip_seconds")  # a Backbone object's too
    if cfg.image_size is not None:
        raise ConfigError(f"image_size={cfg.image_size} applies to image backbones; {bb.name} takes audio, whose "
                          "length is set by clip_seconds (backbone_options) and max_seconds. Leave image_size out.")
    if cfg.augment is not None and cfg.augment not in AUDIO_AUGMENTATIONS:
        raise ConfigError(f"augment={cfg.augment!r} is an image augmentation; {bb.name} takes audio, whose "
                          f"augmentations are {', '.join(map(repr, AUDIO_AUGMENTATIONS))} (standard: a random time "
                          "shift, gain and noise).")


def _forward_fails(bb: Backbone, channels: int, size: int) -> BaseException | None:
    """What one image of zeros (``channels`` x ``size`` x ``size``) raises in the trunk's
    forward (eval mode, no gradients; its train flag is put back), or None when it runs."""
    was = bb.trunk.training
    try:
        with torch.no_grad():
            bb.trunk.eval()(torch.zeros(1, channels, size, size))
        return None
    except Exception as exc:  # noqa: BLE001 - whatever fails is said by the caller
        return exc
    finally:
        bb.trunk.train(was)


def _option_serves(name: str, options: dict[str, Any], channels: int, size: int) -> bool:
    """Whether the backbone ``name`` built with ``options`` (random weights: the structure alone)
    runs at ``size`` px: a size option is suggested only where it serves (timm's EfficientFormer
    takes ``img_size`` and still fails at other sizes)."""
    try:
        built = get_backbone(name, weights=None, **options)
    except Exception:  # noqa: BLE001 - an option the builder refuses does not serve
        return False
    return _forward_fails(built, channels, size) is None


def _drawn_by_shard(dataset: Any) -> bool:
    """Whether a training loader over ``dataset`` draws it shard by shard (`transferkit.train.loaders.make_loader`)."""
    groups = getattr(dataset, "sample_groups", None)
    return callable(groups) and groups() is not None


def check_channels(bb: Backbone, spec: InputSpec, *, options: dict[str, Any] | None = None) -> None:
    """ConfigError, before any data are read, when the trunk's first convolution takes another
    number of channels than the images fed to it (RGB: grayscale and other modes are
    converted), e.g. a timm model built with ``in_chans=1``. A forward at the size the trunk
    was built for confirms it first: a first convolution that is not where the images go in
    (a space-to-depth stem) runs, and a size the trunk does not take is `check_runs_at`'s."""
    if spec.kind != "image":
        return
    if spec.channels != 3:  # a spectrogram backbone's image trunk may take 1 (its own spec is audio)
        raise ConfigError(
            f"{bb.name} says it takes {spec.channels}-channel images (its input_spec): every image is read as "
            "3-channel RGB (grayscale files are converted), and training, the export and prediction feed it 3 "
            "channels. Build it for 3 channels, or wrap it in a module that takes 3, e.g. one whose forward returns "
            "net(x.mean(1, keepdim=True)) (input_spec channels=3).")
    first = next(((n, m) for n, m in bb.trunk.named_modules() if isinstance(m, torch.nn.Conv2d)), None)
    if first is None or first[1].in_channels == spec.channels:
        return
    exc = _forward_fails(bb, spec.channels, bb.input_spec.image_size)
    if exc is None:
        return
    name, conv = first
    said = f" (backbone_options={{'in_chans': {options['in_chans']!r}}})" if "in_chans" in (options or {}) else ""
    raise ConfigError(f"{bb.name} takes {conv.in_channels}-channel images{said}: its first convolution {name!r} has "
                      f"in_channels={conv.in_channels}, and transferkit feeds {spec.channels}-channel RGB images "
                      f"(grayscale and other modes are converted to RGB); its forward fails "
                      f"({exception_line(exc, 200)}). Build it for {spec.channels} channels"
                      + (", leaving in_chans out" if said else "") + ".") from exc


def check_runs_at(bb: Backbone, spec: InputSpec, *, by_name: bool = True, weights: Any = None,
                  options: dict[str, Any] | None = None) -> None:
    """ConfigError, before any data are read, when ``image_size`` asks for a crop size the
    trunk was not built for and it does not run at it (a model with a fixed input size: ViTs'
    position embeddings, EfficientFormer, Swin windows), or when the trunk was built for a
    size through its size option (``options``, its backbone_options) and does not run at it
    (timm's EfficientFormer takes ``img_size`` and keeps attention biases of 224 px): one
    image of zeros at that size, in eval mode, without gradients."""
    built = bb.input_spec.image_size
    asked = next((k for k in ("img_size", "image_size", "input_size") if k in (options or {})), None)
    if spec.kind != "image" or (spec.image_size == built and asked is None):
        return
    exc = _forward_fails(bb, spec.channels, spec.image_size)
    if exc is None:
        return
    if spec.image_size == built:  # built for it through the option, and still failing: the option does not serve
        raise ConfigError(f"{bb.name} built with backbone_options={{{asked!r}: {options[asked]!r}}} does not run at "
                          f"{built} px ({exception_line(exc, 200)}): its architecture does not take another size "
                          f"through {asked} (parts of it stay at their default size). Leave {asked} out and use "
                          "the size it is built for, or choose a backbone that takes the size you want.") from exc
    option, size = _size_option(bb.trunk), spec.image_size
    if out_of_memory(exc):  # the size is too large for this machine, whatever the architecture takes
        raise ConfigError(f"image_size={size} is too large to run {bb.name} here: one image of {size} x {size} px "
                          f"does not fit in memory ({exception_line(exc, 200)}). Use a smaller size (e.g. "
                          f"image_size={built}, the size it was built for).") from exc
    value = (size, size) if option == "input_size" else size
    if not by_name:  # a Backbone object: built already
        how = f"or pass a Backbone built for {size} px" + (f" (its class takes {option}=)" if option else "")
    elif option and bb.name.startswith("tv:") and weights is not None:  # torchvision's weights fix the size
        how = (f"or weights=None to train it from scratch at {size} px (backbone_options={{{option!r}: {value}}}): "
               f"torchvision's weights for it take {built} px only")
    elif option and _option_serves(bb.name, {**(options or {}), option: value}, spec.channels, size):
        how = f"or build it at that size (backbone_options={{{option!r}: {value}}})"
    elif option:
        how = (f"or choose a backbone that takes {size} px (its class takes {option}=, but built with "
               f"{option}={value} it does not run at {size} px either)")
    else:
        how = f"or choose a backbone that takes {size} px (the class {type(bb.trunk).__name__} takes no input size)"
    raise ConfigError(f"{bb.name} does not run at image_size={size}: it was built for {built} px, and "
                      f"at {size} px its forward fails ({exception_line(exc, 200)}). Use "
                      f"image_size={built}, {how}.") from exc


def look(cfg: FinetuneConfig, *, env: tuple[DistInfo, torch.device] | None = None,
         load_weights: bool = True, time_engines: bool = True) -> tuple[Facts, Inputs]:
    """Gather the [`Facts`][transferkit.facts.Facts] of the run ``cfg`` describes (see the module
    docstring). ``load_weights=False`` (a dry run) builds the backbone's structure only.
    ``time_engines=False`` leaves the timing of the feature engines due (`timed_engines`)."""
    info, dev = env if env is not None else environment(cfg)
    policy = Policy.parse(cfg.policy)
    head_kind, hidden = resolve_head(cfg.head, cfg.head_hidden)
    seed_everything(cfg.seed)  # a randomly initialised backbone is the same in every run of this seed
    if load_weights and cfg.weights is not None and isinstance(cfg.backbone, str):
        _check_data_paths(cfg)  # a mistyped path is said before pretrained weights are fetched, not after
    bb, spec = _checked_backbone(cfg, load_weights=load_weights)
    # every rank reads the same data (checked next): rank 0 says what it found; the others say
    # it only when their data differ from rank 0's, where it may name the difference
    with warnings.catch_warnings(record=not info.is_main) as held:
        bundle, n_out = _data(cfg, spec)
    try:
        _check_same_data(bundle, info, cfg)
    except (ConfigError, DataError):
        for w in held or []:
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
        raise
    bf16, why = device_bf16(dev)
    device = DeviceFacts(device=str(dev), type=dev.type, rank=info.rank, world_size=info.world_size,
                         local_world_size=_local_world_size(info), bf16=bf16, bf16_why=why,
                         cpu_capability=cpu_capability(), compile_unavailable=compile_unavailable(dev.type))
    backbone = _backbone_facts(cfg, bb, spec, dev, policy, n_out, hidden, head_kind, loaded=load_weights)
    frozen_phase = policy.frozen_phase_epochs(list(bb.block_names), cfg.epochs, has_batchnorm=backbone.has_batchnorm)
    trains_inputs = cfg.epochs - (frozen_phase if cfg.cache_features is not False else 0) >= 2
    data = _data_facts(cfg, bundle, spec, n_out, census_decode=trains_inputs)
    engines, engine_timing = _engine_facts(cfg, bb, bundle, dev, device, backbone, frozen_phase, loaded=load_weights)
    decoding = _input_decode_facts(cfg, bundle, dev, info, backbone)
    facts = Facts(device=device, backbone=backbone, data=data, policy=policy, head=head_kind, head_hidden=hidden,
                  engines=engines, input_decode=decoding, cache_read_only=read_only_folder(cfg.cache_dir))
    inputs = Inputs(backbone=bb, bundle=bundle, dist=info, device=dev, engine_timing=engine_timing)
    return (timed_engines(facts, inputs) if time_engines else facts), inputs


def _engine_facts(cfg: FinetuneConfig, bb: Backbone, bundle: DataBundle, dev: torch.device, device: DeviceFacts,
                  backbone: BackboneFacts, frozen_phase: int, *,
                  loaded: bool) -> tuple[dict[str, Any], Callable[[], dict[str, Any]] | None]:
    """Feature-engine hook: the facts of the engine decision when the run has a frozen feature
    pass (timing needs the feature pass's precision and layout: `decide_speed` is pure), and
    the timing of the candidates when it is due (`timed_engines` runs it)."""
    if frozen_phase == 0 or cfg.cache_features is False:
        return {}, None
    spec = backbone.input_spec
    speed = decide_speed(device_type=dev.type, bf16=(device.bf16, device.bf16_why), precision=cfg.precision,
                         channels_last=cfg.channels_last, kind=spec.kind, conv=(backbone.conv_share, backbone.n_conv),
                         layout_timed=backbone.layout_timed, cached=True, features=True)
    n = len(bundle.train) * cfg.cache_views + (len(bundle.val) if bundle.val is not None else 0)
    batch = SpeedConfig.of(dev, speed).feature_batch_size(cfg.batch_size)  # the feature pass's batches
    timing = dict(trunk=bb.trunk if loaded else None, spec=spec,
                  dataset=bundle.train.view(transform=eval_transform(spec)), device=dev,
                  precision=speed["feature_precision"], channels_last=speed["channels_last"], n_images=n,
                  batch_size=batch, cache_dir=cfg.cache_dir)
    out = engine_facts(cfg.feature_engine, **timing, world_size=device.world_size, structure=bb.trunk, measure=False)
    return out, (functools.partial(time_candidates, out["due"], **timing) if out.get("due") else None)


def timed_engines(facts: Facts, inputs: Inputs, *, cached: str | None = None) -> Facts:
    """``facts`` with the engine timing that `look` left due done: the candidates timed on the
    run's own input, or, with ``cached`` (an engine whose features of this input are all in
    ``cache_dir`` already: `transferkit.decisions.cached_engine`), that engine recorded and nothing
    timed. Facts without a due timing are returned as they are."""
    if facts.engines.get("due") is None:
        return facts
    engines = {k: v for k, v in facts.engines.items() if k != "due"}
    if cached is not None:
        engines["cached"] = cached
    elif inputs.engine_timing is not None:  # (None: no candidate to time, or timed already)
        engines["measured"] = inputs.engine_timing()
    inputs.engine_timing = None
    return replace(facts, engines=engines)


def _check_same_data(bundle: DataBundle, info: DistInfo, cfg: FinetuneConfig | None = None) -> None:
    """In a job of several processes, a [`DataError`][transferkit.DataError] on a rank that reads
    other data than rank 0 (its classes, its number of training or validation items, or its
    file listing: relative paths, labels and sizes), or a [`ConfigError`][transferkit.ConfigError]
    on one started with other settings (``cfg``, but for its paths and workers,
    `OUTPUT_KEYS`): the ranks split the same sample indices, so different data would train on a
    wrong mix, and other settings (a batch size, the epochs) hang a collective when the batch
    counts differ. Copies of the data on each node agree (file times are not compared)."""
    if not info.enabled:
        return
    settings = {k: v for k, v in (cfg.to_dict() if cfg is not None else {}).items() if k not in OUTPUT_KEYS}
    mine = {"classes": list(bundle.classes), "train items": len(bundle.train),
            "validation items": len(bundle.val) if bundle.val is not None else 0,
            "file listing": [listing_digest(ds) for ds in (bundle.train, bundle.val) if ds is not None],
            "settings": settings}
    ref = broadcast_object(mine if info.is_main else None, info)
    other = {k: (ref["settings"].get(k), v) for k, v in settings.items() if ref["settings"].get(k) != v}
    if other:
        shown = "; ".join(f"{k}: {a!r} on rank 0, {b!r} here" for k, (a, b) in list(other.items())[:6])
        raise ConfigError(f"Rank {info.rank} was started with other settings than rank 0: {shown}. Start every rank "
                          "with the same command and configuration.")
    mine.pop("settings")
    differ = [f"the {k} (paths, labels, sizes) differs" if k == "file listing" else f"{k} {ref[k]!r} on rank 0, "
              f"{mine[k]!r} here" for k in mine if mine[k] != ref[k]]
    if differ:
        raise DataError(f"Rank {info.rank} reads other data than rank 0: {'; '.join(differ)}. Every rank must read "
                        "the same data (the same folder, file list or shards, fully copied to every node); check "
                        "for a listing that differs between nodes or a copy still in progress.")


def _input_decode_facts(cfg: FinetuneConfig, bundle: DataBundle, dev: torch.device, info: DistInfo,
                        backbone: BackboneFacts) -> dict[str, Any]:
    """The facts of the input-decode decision; rank 0 times the decoders and every rank gets its
    facts (one decision for the whole job, so the ranks' feature-cache keys agree)."""
    batch = SpeedConfig(device=dev).feature_batch_size(cfg.batch_size)  # the feature pass's batches
    mine = None
    if info.is_main:
        mine = input_decode_facts(cfg.input_decode, parts={"train": bundle.train, "val": bundle.val},
                                  spec=backbone.input_spec, device=dev, batch_size=batch, num_workers=cfg.num_workers,
                                  world_size=info.world_size, cache_dir=cfg.cache_dir)
    return broadcast_object(mine, info)


def _local_world_size(info: DistInfo) -> int:
    return int(os.environ.get("LOCAL_WORLD_SIZE", info.world_size))


def _check_data_paths(cfg: FinetuneConfig) -> None:
    """DataError for ``data`` or ``val_data`` given as a local path that does not exist (not a
    URL, a ``pipe:`` command, a glob or brace pattern: their readers say what they lack)."""
    for key in ("data", "val_data"):
        value = getattr(cfg, key)
        if not isinstance(value, (str, os.PathLike)):
            continue
        text = str(value)
        if "://" in text or text.startswith("pipe:") or any(c in text for c in "*?[{") or os.path.exists(text):
            continue
        raise DataError(f"The {'training' if key == 'data' else 'validation'} data {text!r} do not exist (looked for "
                        f"{os.path.abspath(text)!r}): check the path (data are a folder root/<class>/<file>, a CSV "
                        "file, tar shards or Parquet files).")


def check_weights_given(cfg: FinetuneConfig) -> None:
    """Refuse, as the run does, a weights tag that the backbone's source cannot resolve, without
    downloading anything (a file is not a tag: a dry run checks that it exists)."""
    if cfg.weights is not None and isinstance(cfg.backbone, str) and not is_weights_path(cfg.weights):
        check_weights_tag(cfg.backbone, cfg.weights, **(cfg.backbone_options or {}))


def check_settings(cfg: FinetuneConfig) -> None:
    """Refuse what the run of ``cfg`` would refuse of its backbone and policy, before its data
    are read and without its weights: the backbone's name and options, a weights tag or file,
    the sizes the trunk runs at, the blocks the policy names, the layers LoRA adapts (a recipe
    checks each of its runs so before the first one trains)."""
    check_weights_given(cfg)
    policy = Policy.parse(cfg.policy)
    head_kind, hidden = resolve_head(cfg.head, cfg.head_hidden)
    bb, spec = _checked_backbone(cfg, load_weights=False)
    policy.schedule(list(bb.block_names), cfg.epochs)
    if head_kind != "logistic":
        _groups(cfg, bb, spec, policy, 2, hidden)


def _checked_backbone(cfg: FinetuneConfig, *, load_weights: bool) -> tuple[Backbone, InputSpec]:
    """The run's own backbone (`_own_backbone`) and the input spec it runs at, checked as the run
    needs them: its options fit its kind, it takes the images' channels and runs at that size."""
    bb = _own_backbone(cfg, load_weights=load_weights)
    spec = resolve_input_spec(bb.input_spec, cfg.image_size)
    check_options_of_kind(cfg, bb)
    check_channels(bb, spec, options=cfg.backbone_options)
    check_runs_at(bb, spec, by_name=isinstance(cfg.backbone, str), weights=cfg.weights, options=cfg.backbone_options)
    return bb, spec


def _own_backbone(cfg: FinetuneConfig, *, load_weights: bool) -> Backbone:
    """A Backbone this run may change: built from the name, or a deep copy of the caller's."""
    backbone = cfg.backbone
    if isinstance(backbone, Backbone):
        asked = cfg.weights != FinetuneConfig.__dataclass_fields__["weights"].default and \
            (None if cfg.weights is None else str(cfg.weights)) != backbone.weights
        if asked or cfg.backbone_options:
            given = f"weights={cfg.weights!r}" if asked else f"backbone_options={cfg.backbone_options!r}"
            raise ConfigError(f"{caller()}: {given} applies to a backbone given by name, but backbone is a Backbone "
                              f"object, built already (weights: {backbone.weights or 'random init'}). Pass the name "
                              f"(backbone={backbone.name!r}, {given}), or build the object with them "
                              "(transferkit.get_backbone(name, weights=..., **options)).")
        # a Backbone built by hand: its blocks are checked as the builders check theirs (a policy counts them)
        check_blocks(backbone.trunk, (*backbone.blocks, *backbone.frozen), name=f"Backbone {backbone.name!r}")
        if backbone.blocks and isinstance(backbone.trunk, torch.jit.ScriptModule):  # no leaves a copy can train
            raise BackboneError(f"Backbone {backbone.name!r}: a TorchScript trunk cannot train, and it has blocks a "
                                f"policy would train ({backbone.block_names[:3]}). Give it as "
                                "transferkit.backbones.from_torchscript(...) (a frozen feature extractor: only the "
                                "head trains), or give the Python module to train it.")
        own = copy.deepcopy(backbone)
        if backbone.weights_random():  # still as built (a copy's parameters are new tensors)
            own.mark_random_init()
        else:
            own.random_init = False
        return own
    if not isinstance(backbone, str):
        raise ConfigError(f"{caller()}: backbone must be a registered name or a Backbone, got "
                          f"{type(backbone).__name__}; see transferkit.list_backbones().")
    if not load_weights and is_weights_path(cfg.weights):
        check_weights_file(cfg.weights)  # a dry run loads no weights, but a missing file is refused as the run does
    return get_backbone(backbone, weights=cfg.weights if load_weights else None, **(cfg.backbone_options or {}))


def _data(cfg: FinetuneConfig, spec: InputSpec) -> tuple[DataBundle, int]:
    if spec.kind == "audio":
        if cfg.task != "multiclass":
            raise ConfigError(f"{caller()}: task={cfg.task!r} is not available for audio backbones yet: audio data are "
                              "read as classes (root/<class>/<clip> folders, or a CSV of path,label); use "
                              "task='multiclass'.")
        bundle = prepare_audio_data(cfg.data, cfg.val_data, spec=spec, val_split=cfg.val_split, seed=cfg.seed,
                                    classes=cfg.classes, on_bad_file=cfg.on_bad_file, scan=cfg.scan,
                                    max_seconds=cfg.max_seconds)
        return bundle, len(bundle.classes)
    return prepare_task_data(cfg.data, cfg.val_data, task=cfg.task, val_split=cfg.val_split, seed=cfg.seed,
                             classes=cfg.classes, min_size=spec.resize_size or spec.image_size,
                             on_bad_file=cfg.on_bad_file, scan=cfg.scan,
                             cache_dir=cfg.cache_dir)  # tar shards keep their member indexes there


def _groups(cfg: FinetuneConfig, bb: Backbone, spec: InputSpec, policy: Policy, n_out: int,
            hidden: tuple[int, ...]) -> tuple[tuple[dict[str, Any], ...], tuple[dict[str, Any], ...]]:
    """The optimizer groups at lr 1 of the model this configuration builds (whole model, and
    the head alone), from a structural copy of the head (and, with LoRA, of the trunk)."""
    trunk = bb.trunk
    if policy.lora is not None:
        trunk = copy.deepcopy(bb.trunk)
        add_lora(trunk, rank=policy.lora, alpha=policy.lora_alpha, targets=policy.lora_targets)
    with torch.random.fork_rng(devices=[]):
        head = build_head(bb.num_features, n_out, hidden=hidden, activation=cfg.head_activation,
                          dropout=cfg.head_dropout)
    model = TransferModel(torch.nn.Identity(), trunk, head)
    shape = copy.copy(bb)
    shape.trunk = trunk

    def plain(groups: list[dict[str, Any]]) -> tuple[dict[str, Any], ...]:
        return tuple({"name": g["name"], "lr_scale": g["lr"], "weight_decay": g["weight_decay"],
                      "params": sum(t.numel() for t in g["params"])} for g in groups)

    whole = plain(param_groups(model, lr=1.0, weight_decay=cfg.weight_decay, backbone=shape, policy=policy,
                               epochs=cfg.epochs))
    alone = plain(param_groups(head, lr=1.0, weight_decay=cfg.weight_decay, policy=policy))
    return whole, alone


def _backbone_facts(cfg: FinetuneConfig, bb: Backbone, spec: InputSpec, dev: torch.device, policy: Policy,
                    n_out: int, hidden: tuple[int, ...], head_kind: str, *, loaded: bool) -> BackboneFacts:
    share, n_conv = conv_share(bb.trunk)
    store = Path(cfg.cache_dir) / "layouts.json" if cfg.cache_dir is not None else None
    timed = layout_fact(bb.trunk, dev, kind=spec.kind, channels_last=cfg.channels_last, image_size=spec.image_size,
                        store=store)
    groups, head_groups = ((), ()) if head_kind == "logistic" else _groups(cfg, bb, spec, policy, n_out, hidden)
    weights = bb.weights if loaded or isinstance(cfg.backbone, Backbone) else cfg.weights
    digest = None
    if isinstance(weights, (str, Path)) and Path(weights).is_file():
        digest = f"{Path(weights).name}@blake2b:{file_digest(weights)}"
    fingerprint = None
    if loaded:
        fingerprint = _spec_digest(spec) + "/" + eval_fingerprint(bb.trunk)  # frozen statistics or not: one pass
    pretrained = not bb.weights_random() if isinstance(cfg.backbone, Backbone) else cfg.weights is not None
    return BackboneFacts(name=bb.name, weights=weights, weights_loaded=loaded, pretrained=pretrained,
                         blocks=tuple(bb.block_names),
                         has_batchnorm=has_batchnorm(bb), conv_share=share, n_conv=n_conv,
                         num_features=bb.num_features, input_spec=spec, layout_timed=timed, fingerprint=fingerprint,
                         weights_digest=digest, groups=groups, head_groups=head_groups,
                         spec_augment=any(isinstance(m, SpecAugment) and (m.freq_masks or m.time_masks)
                                          for m in bb.trunk.modules()),
                         batchnorm_only=batchnorm_only_blocks(bb),
                         tracks_statistics=any(tracks_statistics(m) for m in bb.trunk.modules()),
                         statistics_blocks=_statistics_blocks(bb),
                         fixed=tuple((n, bb.block_of(n)) for n in sorted(bb.fixed or ())
                                     if bb.block_of(n) in bb.block_names),
                         fixed_blocks=fixed_blocks(bb), idle_at_frozen_bn=idle_at_frozen_bn(bb),
                         anchor=parameters_digest(bb.trunk) if loaded and policy.l2sp is not None else None)


def _statistics_blocks(bb: Backbone) -> tuple[str | None, ...]:
    """The blocks the layers with running statistics of ``bb``'s trunk follow, in block order."""
    blocks = module_blocks(bb.trunk, bb)
    found = {blocks.get(n) for n, m in bb.trunk.named_modules() if tracks_statistics(m)}
    return tuple(b for b in [*bb.block_names, None] if b in found)


def _spec_digest(spec: InputSpec) -> str:
    return hashlib.blake2b(json.dumps(spec.to_dict(), sort_keys=True, default=str).encode(),
                           digest_size=8).hexdigest()


def _data_facts(cfg: FinetuneConfig, bundle: DataBundle, spec: InputSpec, n_out: int, *,
                census_decode: bool) -> DataFacts:
    parts = {"train": bundle.train, "val": bundle.val}
    identity: dict[str, Any] = {"classes": len(bundle.classes)}
    files: dict[str, bool] = {}
    fingerprints: dict[str, str] = {}
    decode: dict[str, dict[str, Any]] = {}
    for name, ds in parts.items():
        if ds is None:
            continue
        cached = cfg.cache_dir is not None and cfg.cache_features is not False
        # a resumable run's digest covers every item (a resume compares it); else a quick one (data in memory:
        # 16 items; files and tensors are read whole either way)
        whole = data_fingerprint(ds) if cached or cfg.checkpoint is not None else None
        identity[name] = {"items": len(ds), "digest": whole if cfg.checkpoint is not None else quick_fingerprint(ds)}
        counts = class_counts(ds, bundle.classes) if cfg.checkpoint is not None else None
        if counts is not None:  # described, not compared: the digest covers them (`differences`)
            identity[name]["per_class"] = counts
        files[name] = hasattr(ds, "samples") and hasattr(ds, "view")  # in-memory data are decoded already
        if cached:
            fingerprints[name] = whole
        if census_decode and files[name] and spec.kind == "image" and cfg.decode_once is not False:
            augment = "none" if name == "val" else (cfg.augment or "standard")
            decode[name] = decode_census(ds, spec, augment=augment, cache_dir=cfg.cache_dir)
    weights = resolve_class_weights(cfg.class_weights, cfg.task, bundle)
    return DataFacts(kind=spec.kind, classes=tuple(bundle.classes), num_outputs=n_out, n_train=len(bundle.train),
                     n_val=len(bundle.val) if bundle.val is not None else 0, identity=identity,
                     fingerprints=fingerprints, files=files, decode=decode,
                     class_weights=tuple(weights) if weights is not None else None,
                     targets=target_summary(bundle.targets) if bundle.targets is not None else None,
                     shard_by_shard=_drawn_by_shard(bundle.train))


__all__ = ["BackboneFacts", "DataFacts", "DeviceFacts", "Facts", "FACTS_FORMAT", "Inputs", "environment", "look",
           "resolve_input_spec"]
