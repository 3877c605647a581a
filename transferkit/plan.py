"""The run plan: every decision of a fine-tuning run, resolved once from a [`FinetuneConfig`][transferkit.FinetuneConfig].

``plan(config)`` builds the backbone (a private copy when given a Backbone object: the
caller's is never changed), scans the data, builds the model and decides: device and
process rank, precision and memory layout, whether the backbone stays frozen and so
whether features are cached (and why), the head, the base learning rate and every
parameter group's lr and weight decay, augmentation, BatchNorm mode, which blocks train in
which epoch, and the seed of every rank. The plan prints as a few lines
([`RunPlan.summary`][transferkit.RunPlan.summary]), is stored in checkpoints and exports ([`RunPlan.to_dict`][transferkit.RunPlan.to_dict]),
and is what the feature-cache key ([`RunPlan.feature_key_parts`][transferkit.RunPlan.feature_key_parts]) and the resume
check (`plan_differences`) are derived from.

Example:
    >>> p = plan(FinetuneConfig(backbone="tk:small_cnn", weights=None, data="images/"))  # doctest: +SKIP
    >>> print(p.summary())  # doctest: +SKIP
"""

from __future__ import annotations

import copy
import random
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from transferkit.backbones import Backbone, InputSpec, get_backbone
from transferkit.config import FinetuneConfig, jsonable
from transferkit.data import DataBundle
from transferkit.data.audio import prepare_audio_data
from transferkit.errors import ConfigError
from transferkit.heads import resolve_head, resolve_head_norm
from transferkit.model import TransferModel, build_model
from transferkit.policies import Policy, apply_policy, param_groups
from transferkit.policies.freeze import has_batchnorm
from transferkit.train.device import resolve_device
from transferkit.train.distributed import DistInfo, init_distributed, rank_seeds
from transferkit.train.optim import default_lr
from transferkit.train.speed import SpeedConfig
from transferkit.train.tasks import make_loss, prepare_task_data, resolve_class_weights

PLAN_FORMAT = 1
# config keys that do not change what a run computes: they may differ when resuming
_OUTPUT_KEYS = {"export", "checkpoint", "resume", "log_dir", "plots_dir", "top_k", "verbose", "callbacks",
                "num_workers", "cache_dir", "device", "data", "val_data", "portable_metadata"}


_OUTPUTS = {"export": "file", "checkpoint": "file", "plots_dir": "dir", "cache_dir": "dir", "log_dir": "dir"}


def check_outputs(cfg: FinetuneConfig) -> None:
    """Every output path of the run can be written (a folder given for a file, a missing or
    read-only parent: a clear OutputError naming the setting, before anything trains)."""
    from transferkit._io import check_writable

    for key, kind in _OUTPUTS.items():
        value = getattr(cfg, key)
        if value is not None:
            check_writable(value, what=key.replace("_dir", " folder"), flag=key, kind=kind)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # seeds every CUDA device too


def resolve_input_spec(spec: InputSpec, image_size: int | None) -> InputSpec:
    """The backbone's spec at another crop size, keeping its resize-to-crop ratio."""
    if image_size is None or spec.kind == "audio":
        return spec
    resize = round(image_size * spec.resize_size / spec.image_size) if spec.resize_size else None
    return spec.replace(image_size=image_size, resize_size=resize)


@dataclass
class RunPlan:
    """Every decision of a run (see the module docstring). The live objects it resolved
    (``backbone``, ``bundle``, ``model``, ``loss_fn``) are attributes too; ``to_dict()``
    holds the decisions alone, as plain data."""

    config: FinetuneConfig
    dist: DistInfo
    speed: SpeedConfig
    feature_speed: SpeedConfig
    policy: Policy
    backbone: Backbone
    spec: InputSpec
    bundle: DataBundle
    model: TransferModel
    loss_fn: nn.Module
    num_outputs: int
    head_kind: str
    head_hidden: tuple[int, ...]
    head_norm: bool
    frozen: bool
    cache: bool  # every epoch trains the head alone on cached features
    cached_epochs: int  # leading epochs on cached features (all of them when `cache`; fine_tune:frozen=k: k)
    cache_reason: str
    augment: str
    lr: float
    class_weights: list[float] | None
    seeds: list[int]
    trainable: list[list[str]]  # blocks that train in each epoch
    data_identity: dict[str, Any]
    decode: dict[str, Any] = field(default_factory=dict)  # {"train"/"val": DecodePlan} when images are decoded once
    groups: list[dict[str, Any]] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def classes(self) -> list[str]:
        return self.bundle.classes

    @property
    def epochs(self) -> int:
        return self.config.epochs

    def param_groups(self, lr: float | None = None) -> list[dict[str, Any]]:
        """Fresh optimizer groups (``lr``: another base rate, e.g. for the lr finder)."""
        lr = self.lr if lr is None else lr
        cfg = self.config
        if self.cache:
            return param_groups(self.model.head, lr=lr, weight_decay=cfg.weight_decay, policy=self.policy)
        return param_groups(self.model, lr=lr, weight_decay=cfg.weight_decay, backbone=self.backbone,
                            policy=self.policy, epochs=cfg.epochs)

    def bn_mode(self) -> str:
        """What BatchNorm layers do in this run, in words."""
        if not has_batchnorm(self.backbone):
            return "none in the trunk"
        if self.frozen:
            return "eval statistics (the backbone is frozen)"
        return {"train": "statistics update in training blocks, eval elsewhere",
                "affine": "statistics frozen, gamma/beta train", "frozen": "frozen entirely"}[self.policy.bn]

    def bn_updates(self) -> list[list[str]]:
        """Per epoch, the blocks whose BatchNorm running statistics update (the others run in
        eval mode): the training blocks under ``bn="train"``, none under ``affine``/``frozen``."""
        if not has_batchnorm(self.backbone) or self.policy.bn != "train":
            return [[] for _ in self.trainable]
        return [[] if e < self.cached_epochs else blocks for e, blocks in enumerate(self.trainable)]

    def to_dict(self, *, portable: bool = False) -> dict[str, Any]:
        """The decisions as plain JSON data (saved in checkpoints and exports). ``portable``:
        paths reduced to file names, weight files to ``name@digest`` (for files shipped to
        other machines: no absolute paths of the training machine)."""
        s, f = self.speed, self.feature_speed
        return jsonable({
            "format": PLAN_FORMAT, "config": self.config.to_dict(portable=portable),
            "backbone": self.backbone.name, "weights": weights_identity(self.backbone.weights, portable=portable),
            "input_spec": self.spec.to_dict(),
            "task": self.config.task, "classes": self.classes, "num_outputs": self.num_outputs,
            "device": s.device.type, "world_size": self.dist.world_size, "seeds": self.seeds,
            "precision": s.precision, "feature_precision": f.precision, "channels_last": s.channels_last,
            "compile": s.compile, "policy": str(self.policy), "frozen": self.frozen, "feature_cache": self.cache,
            "cached_epochs": self.cached_epochs,
            "cache_reason": self.cache_reason, "head": self.head_kind, "head_hidden": list(self.head_hidden),
            "head_norm": self.head_norm, "augment": self.augment, "lr": self.lr, "class_weights": self.class_weights,
            "bn": self.bn_mode(), "trainable": _epoch_ranges(self.trainable),
            "bn_statistics_update": _epoch_ranges(self.bn_updates()),
            "groups": [{k: g[k] for k in ("name", "lr", "weight_decay", "params")} for g in self.groups],
            "data": self.data_identity, "decode_once": sorted(self.decode),  # memory or disk: the same pixels
        })

    def summary(self) -> str:
        """A few readable lines: what will run, and why."""
        s, f, cfg = self.speed, self.feature_speed, self.config
        n_train = len(self.bundle.train)
        n_val = len(self.bundle.val) if self.bundle.val is not None else 0
        where = f"{s.device}" + (f", rank {self.dist.rank} of {self.dist.world_size}" if self.dist.enabled else "")
        lines = [
            f"plan: {self.backbone.name} ({self.backbone.weights or 'random init'}) -> {self.head_kind} head, "
            f"{self.num_outputs} outputs ({cfg.task})",
            f"  data:     {n_train} train / {n_val} val, {len(self.classes)} classes, input {_input(self.spec)}, "
            f"augment {self.augment}",
            f"  policy:   {self.policy}; {_epoch_text(self.trainable, cfg.epochs)}; BatchNorm: {self.bn_mode()}",
            f"  features: {'cached' if self.cache else 'cached, then not' if self.cached_epochs else 'not cached'} "
            f"({self.cache_reason})" + (f"; images {self.decode['train'].reason}" if "train" in self.decode else ""),
            f"  optim:    {cfg.optimizer}, base lr {self.lr:.3g}{' (default)' if cfg.lr is None else ''}, "
            f"{cfg.schedule} schedule, {cfg.epochs} epochs x batch {cfg.batch_size}; "
            + ", ".join(f"{g['name']} lr {g['lr']:.3g} wd {g['weight_decay']:g}" for g in self.groups[:6])
            + (f", ... ({len(self.groups)} groups)" if len(self.groups) > 6 else ""),
            f"  runtime:  {where}, {'channels_last' if s.channels_last else 'contiguous'}, "
            f"seed {cfg.seed}" + (f" (ranks: {self.seeds})" if self.dist.enabled else ""),
            f"  speed:    " + "; ".join(_speed_reasons(s, f if self.cached_epochs else None)),
        ]
        return "\n".join(lines)

    def feature_key_parts(self, *, part: str, transform: Any, views: int, dataset: Any) -> dict[str, Any]:
        """Everything that changes cached features: preprocessing and trunk weights (not the
        head), the transform, precision, layout and device type, the views and their seed
        whenever the transform is random, and the data's identity."""
        from transferkit.train.features import data_fingerprint, module_fingerprint

        f = self.feature_speed
        random_views = part == "train" and self.augment != "none"
        return {"backbone": self.backbone.name, "weights": module_fingerprint(self.model.preprocess) + "/"
                + module_fingerprint(self.model.trunk), "transform": repr(transform), "precision": f.precision,
                "channels_last": f.channels_last, "device": f.device.type, "views": views,
                "seed": self.config.seed if random_views else None, "data": data_fingerprint(dataset)}


def _speed_reasons(train: SpeedConfig, features: SpeedConfig | None) -> list[str]:
    """Why each speed choice was made, in a few words each."""
    r = train.reasons
    out = []
    if features is not None:
        out.append(f"features {features.precision} ({features.reasons.get('feature_precision', 'set directly')})")
    out.append(f"training {train.precision} ({r.get('precision', 'set directly')})")
    out.append(f"layout ({r.get('channels_last', 'set directly')})")
    return out


def _input(spec: InputSpec) -> str:
    return f"{spec.sample_rate} Hz audio" if spec.kind == "audio" else f"{spec.image_size} px"


def _epoch_ranges(per_epoch: list[list[str]]) -> list[dict[str, Any]]:
    """``[{"epochs": [first, last], "blocks": [...]}, ...]`` (1-based, inclusive) from per-epoch block lists."""
    out: list[dict[str, Any]] = []
    for e, blocks in enumerate(per_epoch, start=1):
        if out and out[-1]["blocks"] == blocks:
            out[-1]["epochs"][1] = e
        else:
            out.append({"epochs": [e, e], "blocks": list(blocks)})
    return out


def _epoch_text(per_epoch: list[list[str]], epochs: int) -> str:
    parts = []
    for r in _epoch_ranges(per_epoch):
        a, b = r["epochs"]
        when = f"epoch {a}" if a == b else f"epochs {a}-{b}"
        blocks = r["blocks"]
        what = "head only" if not blocks else f"head + {len(blocks)} blocks ({blocks[0]}..{blocks[-1]})" \
            if len(blocks) > 3 else "head + " + ", ".join(blocks)
        parts.append(f"{when}: {what}")
    return "; ".join(parts) if len(parts) > 1 else parts[0].split(": ", 1)[1] + f" for {epochs} epochs"


def _own_backbone(backbone: Any, cfg: FinetuneConfig) -> Backbone:
    """A Backbone this run may change: built from the name, or a deep copy of the caller's."""
    if isinstance(backbone, Backbone):
        return copy.deepcopy(backbone)
    if not isinstance(backbone, str):
        raise ConfigError(f"finetune(): backbone must be a registered name or a Backbone, got "
                          f"{type(backbone).__name__}; see transferkit.list_backbones().")
    return get_backbone(backbone, weights=cfg.weights, **(cfg.backbone_options or {}))


def _data(cfg: FinetuneConfig, spec: InputSpec) -> tuple[DataBundle, int]:
    if spec.kind == "audio":
        bundle = prepare_audio_data(cfg.data, cfg.val_data, spec=spec, val_split=cfg.val_split, seed=cfg.seed,
                                    classes=cfg.classes, on_bad_file=cfg.on_bad_file, scan=cfg.scan,
                                    max_seconds=cfg.max_seconds)
        return bundle, len(bundle.classes)
    return prepare_task_data(cfg.data, cfg.val_data, task=cfg.task, val_split=cfg.val_split, seed=cfg.seed,
                             classes=cfg.classes, min_size=spec.resize_size or spec.image_size,
                             on_bad_file=cfg.on_bad_file, scan=cfg.scan)


def _cache_decision(cfg: FinetuneConfig, policy: Policy, frozen_epochs: int, head_kind: str) -> tuple[int, str]:
    """How many leading epochs run on cached features (all, the frozen phase, or none), and why."""
    frozen = frozen_epochs >= cfg.epochs
    if (cfg.cache_features is True or head_kind == "logistic") and not frozen:
        what = "head='logistic'" if head_kind == "logistic" else "cache_features=True"
        raise ConfigError(f"{what} needs a policy that keeps the backbone frozen; {policy} trains it. Use "
                          "policy='feature_extraction' (or cache_features='auto').")
    if frozen_epochs == 0:
        return 0, f"policy {policy} trains backbone weights from epoch 1"
    if cfg.cache_features is False:
        return 0, "cache_features=False"
    where = f"on disk in {cfg.cache_dir}" if cfg.cache_dir is not None else "in memory"
    views = f"{cfg.cache_views} augmented views" if cfg.cache_views > 1 else \
        "one view" + (" (augmented)" if cfg.augment not in (None, "none") or not frozen else "")
    if frozen:
        return cfg.epochs, f"backbone frozen for all {cfg.epochs} epochs: computed once, {views}, {where}"
    return frozen_epochs, (f"backbone frozen for the first {frozen_epochs} epoch(s): the head trains on features "
                           f"computed once ({views}, {where}), then the backbone trains end to end")


def weights_identity(weights: Any, *, portable: bool) -> Any:
    """``weights`` as recorded: as given, or (``portable``) a file's name and content digest."""
    if not portable or not isinstance(weights, (str, Path)) or not Path(weights).is_file():
        return weights
    from transferkit._io import file_digest

    return f"{Path(weights).name}@blake2b:{file_digest(weights)}"


def data_identity(bundle: DataBundle) -> dict[str, Any]:
    """Names and digests of the training and validation data (no absolute paths)."""
    from transferkit.train.features import quick_fingerprint

    out: dict[str, Any] = {"classes": len(bundle.classes)}
    for name, ds in (("train", bundle.train), ("val", bundle.val)):
        if ds is not None:
            out[name] = {"items": len(ds), "digest": quick_fingerprint(ds)}
    return out


def plan(config: FinetuneConfig) -> RunPlan:
    """Resolve every decision of the run ``config`` describes (see the module docstring).

    Example:
        >>> p = plan(FinetuneConfig(backbone="tk:small_cnn", weights=None, data="images/", epochs=2))  # doctest: +SKIP
        >>> p.cache, p.lr  # doctest: +SKIP
        (True, 0.01)
    """
    cfg = config
    info, dev = init_distributed(resolve_device(cfg.device))
    if info.is_main:
        check_outputs(cfg)  # a bad output path fails now, not after training
    seed_everything(cfg.seed)
    pol = Policy.parse(cfg.policy)
    head_kind, hidden = resolve_head(cfg.head, cfg.head_hidden)
    bb = _own_backbone(cfg.backbone, cfg)
    spec = resolve_input_spec(bb.input_spec, cfg.image_size)
    bundle, n_out = _data(cfg, spec)
    frozen_epochs = pol.frozen_phase_epochs(bb, cfg.epochs)
    frozen = frozen_epochs >= cfg.epochs
    cached_epochs, reason = _cache_decision(cfg, pol, frozen_epochs, head_kind)
    cache = cached_epochs >= cfg.epochs
    norm = resolve_head_norm(cfg.head_norm, cached=cached_epochs > 0, head_kind=head_kind)
    speed_args = dict(precision=cfg.precision, channels_last=cfg.channels_last, compile=cfg.compile, trunk=bb.trunk,
                      kind=spec.kind, image_size=spec.image_size,
                      layout_cache=Path(cfg.cache_dir) / "layouts.json" if cfg.cache_dir is not None else None)
    speed = SpeedConfig.make(dev, frozen=frozen, **speed_args)
    feature_speed = SpeedConfig.make(dev, frozen=True, **speed_args).for_features() if cached_epochs else speed
    model = build_model(bb, n_out, spec=spec, head_hidden=hidden, head_activation=cfg.head_activation,
                        head_dropout=cfg.head_dropout, head_norm=norm).to(dev)
    apply_policy(model, bb, pol, epoch=0)
    speed.prepare(model)
    seeds = rank_seeds(cfg.seed, info.world_size)
    seed_everything(seeds[info.rank])  # dropout etc. differ per rank; the model, data order and augmentation do not
    weights = resolve_class_weights(cfg.class_weights, cfg.task, bundle)
    p = RunPlan(config=cfg, dist=info, speed=speed, feature_speed=feature_speed, policy=pol, backbone=bb, spec=spec,
                bundle=bundle, model=model, loss_fn=make_loss(cfg.task, label_smoothing=cfg.label_smoothing,
                                                              class_weights=weights).to(dev),
                num_outputs=n_out, head_kind=head_kind, head_hidden=hidden, head_norm=norm, frozen=frozen, cache=cache,
                cached_epochs=cached_epochs, cache_reason=reason,
                augment=cfg.augment or ("standard" if not cache or cfg.cache_views > 1 else "none"),
                lr=default_lr(head_only=frozen) if cfg.lr is None else cfg.lr, class_weights=weights, seeds=seeds,
                trainable=pol.schedule(bb.block_names, cfg.epochs), data_identity=data_identity(bundle))
    if pol.frozen_epochs and frozen:
        warnings.warn(f"policy {pol} keeps the backbone frozen for {pol.frozen_epochs} epoch(s) but the run has "
                      f"{cfg.epochs}: the backbone never trains (this is feature extraction); raise epochs above "
                      f"{pol.frozen_epochs} to fine-tune.", stacklevel=2)
    if p.augment == "none" and cfg.cache_views > 1:
        raise ConfigError("cache_views > 1 needs random augmentation; set augment='standard' or 'flip'.")
    if head_kind != "logistic":
        p.groups = [{**g, "params": sum(t.numel() for t in g["params"])} for g in p.param_groups()]
    p.decode = _decode_decision(p)
    return p


def _decode_decision(p: RunPlan) -> dict[str, Any]:
    """Decode-once plans for the training and validation images, when the backbone trains
    end to end for 2+ epochs on image files (see `transferkit.data.decoded`)."""
    from transferkit.data.decoded import plan_decode

    cfg = p.config
    files = hasattr(p.bundle.train, "samples") and hasattr(p.bundle.train, "view")  # in-memory data are decoded
    if cfg.decode_once is False or p.spec.kind != "image" or cfg.epochs - p.cached_epochs < 2 or not files:
        return {}
    out = {"train": plan_decode(p.bundle.train, p.spec, augment=p.augment, cache_dir=cfg.cache_dir)}
    if p.bundle.val is not None and hasattr(p.bundle.val, "samples") and hasattr(p.bundle.val, "view"):
        out["val"] = plan_decode(p.bundle.val, p.spec, augment="none", cache_dir=cfg.cache_dir)
    if cfg.decode_once is True and out["train"].mode == "off":
        raise ConfigError(f"decode_once=True cannot be honoured: {out['train'].reason}.")
    return {k: d for k, d in out.items() if d.mode != "off"}


def plan_differences(saved: dict[str, Any], now: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """``{key: (saved, now)}`` for every decision two plans disagree on (a resume must agree
    on all of them; output paths, verbosity and the device may differ)."""
    diff: dict[str, tuple[Any, Any]] = {}
    for key in sorted(set(saved) | set(now)):
        if key == "config":
            a, b = saved.get("config", {}), now.get("config", {})
            for k in sorted(set(a) | set(b)):
                if k not in _OUTPUT_KEYS and a.get(k) != b.get(k):
                    diff[f"config.{k}"] = (a.get(k), b.get(k))
        elif key not in ("device",) and saved.get(key) != now.get(key):
            diff[key] = (saved.get(key), now.get(key))
    return diff
